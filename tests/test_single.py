"""train/single.py on a tiny random SD checkpoint written to a temporary folder: the loss, the
files a run writes, the shift file's binding to its base model, exact --resume, bad inputs."""

import csv
import dataclasses
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import spectral
from edit.shifts import apply_shifts
from ldm import checkpoint
from ldm.vae import AutoencoderKL
from tiny import one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from train import lora, single
from train.trainable import SpectralShifts



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two different tiny SD 1 checkpoints (with tokenizers), the subject's images (in odd sizes
    and modes, plus a file that is not an image), and a shared SVD cache."""
    root = tmp_path_factory.mktemp("single")
    paths = {}
    for name, seed in (("base", 0), ("other", 1)):
        folder = root / name
        model = tiny_model("sd1", tokenizer_dir=str(folder / "tokenizer"), seed=seed)
        paths[name] = str(folder / "model.safetensors")
        checkpoint.save_single_file(paths[name], model)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (24, 40, 4), dtype=np.uint8), "RGBA").save(images / "b.png")
    Image.fromarray(rng.integers(0, 255, (50, 36), dtype=np.uint8), "L").save(images / "c.jpg")
    (images / "notes.txt").write_text("not an image")
    paths["images"] = str(images)
    paths["cache"] = str(root / "svd-cache")
    paths["class"] = str(root / "class-images")
    return paths


def argv(files, out, *extra):
    return ["--model", files["base"], "--instance-dir", files["images"],
            "--instance-prompt", "a sks star", "--class-prompt", "a star",
            "--class-dir", files["class"], "--num-class-images", "2", "--batch-size", "1",
            "--sample-steps", "2", "--validation-every", "0", "--eval-samples", "0",
            "--svd-cache", files["cache"], "--output-dir", str(out), *extra]


def test_class_images_are_shared_only_by_runs_that_would_make_the_same_ones(files, tmp_path):
    """The default class folder's name and settings.json hold what shapes the images: besides
    the run's settings, the base, the VAE, the prediction type and the prompt's token ids."""
    config = single.parse_args(argv(files, tmp_path))
    model = tiny_model("sd1")

    def settings(m, prompt="a star"):
        return single.class_image_settings(prompt, config, m, m.base_fingerprint())

    def folder(m):
        return single.default_class_dir("a star", config, m, m.base_fingerprint(), tmp_path)

    base = settings(model)
    ids = model.text_encoder.tokenize(["a star"])[0].tolist()
    assert base["token_ids"] == ids[:len(base["token_ids"])] and len(base["token_ids"]) < len(ids)
    assert settings(model, "a big star")["token_ids"] != base["token_ids"]
    v_model = dataclasses.replace(model, prediction_type="v_prediction")
    other_vae = dataclasses.replace(model, vae=tiny_model("sd1", seed=1).vae)
    assert settings(v_model)["prediction_type"] == "v_prediction" != base["prediction_type"]
    assert settings(other_vae)["vae_fingerprint"] != base["vae_fingerprint"]
    assert len({folder(model), folder(v_model), folder(other_vae)}) == 3
    assert folder(model) == folder(tiny_model("sd1"))               # the same model: shared


def read_log(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# --- the loss -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_float64_formula_and_decreases(prediction_type, tmp_path):
    cache = tmp_path / "svd"
    torch.manual_seed(0)
    model = tiny_model("sd1", prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    context = model.encode_prompts(["a sks star", "a star"]).detach()

    # oracle: the same loss from alphas_cumprod by hand, in float64, on the plain base model
    a = model.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    z, e = latents.double(), noise.double()
    x_t = a.sqrt() * z + (1 - a).sqrt() * e
    target = e if prediction_type == "epsilon" else a.sqrt() * e - (1 - a).sqrt() * z
    with torch.no_grad():
        out = model.unet(x_t.float(), t, context).double()
        expected = (out - target).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(single.diffusion_loss(model, latents, context, t, noise),
                                   expected.float(), rtol=1e-5, atol=1e-6)

    # zero shifts are the base model; a few AdamW steps on this fixed batch lower the loss
    trainable = SpectralShifts(model, text_encoder=False, svd_cache=str(cache))
    optimizer = torch.optim.AdamW(trainable.param_groups(lr=1e-2, lr_1d=1e-6))
    losses = []
    for _ in range(15):
        loss = single.diffusion_loss(model, latents, context, t, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0]


# --- a run, its files, the shift file ---------------------------------------------------------

def test_run_writes_its_files_and_the_shift_file_fits_only_its_base(files, tmp_path, capsys):
    out = tmp_path / "run"
    trained = single.train(single.parse_args(argv(files, out, "--steps", "3")))
    err = capsys.readouterr().err
    assert "skipping notes.txt: not an image" in err
    for name in ("spectral_shifts.safetensors", "checkpoint.pt", "log.csv", "loss.png",
                 "samples/step-00000.png", "samples/step-00003.png"):
        assert (out / name).is_file(), name
    for name in ("spectral_shifts.safetensors", "checkpoint.pt"):   # as readable as the rest
        assert (out / name).stat().st_mode & 0o777 == (out / "log.csv").stat().st_mode & 0o777, name
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["prior_loss"]) > 0 for r in rows)

    # the file applied to a fresh copy of the base as edit.sample --shift does reproduces the
    # trained (merged) model
    base = checkpoint.load(files["base"])
    deltas, metadata = spectral.load_shifts(out / "spectral_shifts.safetensors",
                                            expect_fingerprint=base.base_fingerprint())
    assert metadata["instance_prompt"] == "a sks star" and metadata["step"] == 3
    assert any(d.abs().max() > 0 for d in deltas.values())  # training moved the shifts
    apply_shifts(base, [(str(out / "spectral_shifts.safetensors"), 1.0)], cache_dir=files["cache"],
                 progress=False)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([5, 500])
    context = base.encode_prompts(["a sks star", "a star"])
    with torch.no_grad():
        torch.testing.assert_close(base.unet(x, t, context), trained.unet(x, t, context),
                                   rtol=1e-4, atol=1e-5)

    other = checkpoint.load(files["other"])
    with pytest.raises(spectral.ShiftFileError, match="trained on another base model"):
        spectral.load_shifts(out / "spectral_shifts.safetensors",
                             expect_fingerprint=other.base_fingerprint())


def run_recording_the_loss(files, out, monkeypatch, *flags):
    """A 2-step run; returns what each loss call saw: autocast state, UNet checkpointing."""
    seen = []
    real_loss = single.diffusion_loss

    def recording(model, *a):
        seen.append({"autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                     "checkpointing": model.unet.gradient_checkpointing and model.unet.training})
        return real_loss(model, *a)

    monkeypatch.setattr(single, "diffusion_loss", recording)
    assert single.main(argv(files, out, "--steps", "2", *flags)) == 0
    assert all(math.isfinite(float(r["loss"])) for r in read_log(out / "log.csv"))
    return seen


@pytest.mark.parametrize("text_encoder", [False, True])
def test_train_text_encoder_adds_text_shifts(files, tmp_path, monkeypatch, text_encoder):
    out = tmp_path / "run"
    run_recording_the_loss(files, out, monkeypatch, *(["--train-text-encoder"] if text_encoder else []))
    deltas, metadata = spectral.load_shifts(out / "spectral_shifts.safetensors")
    assert any(k.startswith("text.") for k in deltas) == text_encoder
    assert any(d.abs().max() > 0 for k, d in deltas.items() if k.startswith("text.")) == text_encoder
    assert metadata["training_args"]["train_text_encoder"] == text_encoder


@pytest.mark.parametrize("flags, autocast, checkpointing", [
    ([], False, False),
    (["--mixed-precision", "bf16", "--prior-loss-weight", "0"], torch.bfloat16, False),
    # the bundled model's default: the text encoder's shifts too, its embedding tables included
    (["--mixed-precision", "bf16", "--prior-loss-weight", "0", "--train-text-encoder"], torch.bfloat16, False),
    (["--gradient-checkpointing"], False, True)])
def test_mixed_precision_and_checkpointing_reach_the_loss(files, tmp_path, monkeypatch, flags,
                                                          autocast, checkpointing):
    seen = run_recording_the_loss(files, tmp_path / "run", monkeypatch, *flags)
    assert seen == [{"autocast": autocast, "checkpointing": checkpointing}] * 2


def test_cache_latents_encodes_each_image_once(files, tmp_path, monkeypatch):
    batches = []
    real_encode = AutoencoderKL.encode

    def counting(self, x):
        batches.append(len(x))
        return real_encode(self, x)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    run_recording_the_loss(files, tmp_path / "cached", monkeypatch, "--cache-latents")
    # 3 subject images and 2 class images, each encoded once with its mirror; no step encodes
    assert batches == [2] * 5
    batches.clear()
    run_recording_the_loss(files, tmp_path / "plain", monkeypatch)
    assert batches == [1, 1, 1, 1]     # each step encodes its crops: 1 subject + 1 prior, 2 steps


def test_method_full_trains_every_unet_weight_and_writes_no_shift_file(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_recording_the_loss(files, out, monkeypatch, "--method", "full", "--lr", "1e-3")
    assert not (out / "spectral_shifts.safetensors").exists()
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["parameters"]
    base = checkpoint.load(files["base"]).unet.state_dict()
    assert trained.keys() == {f"unet.{name}" for name in base}
    assert all(not torch.equal(trained[f"unet.{n}"], w) for n, w in base.items() if n.endswith("weight"))


def test_method_lora_trains_only_adapters_and_its_file_reproduces_the_trained_model(files, tmp_path):
    """--method lora: the checkpoint holds only the adapters' A and B (UNet and text encoder's
    attention projections); the file, merged into a fresh base as edit.sample --lora does,
    gives the trained (merged) model's UNet and text encoder; weight 0 gives the base."""
    out = tmp_path / "run"
    trained = single.train(single.parse_args(argv(files, out, "--steps", "3", "--method", "lora",
                                                  "--lora-rank", "2", "--lr", "1e-2",
                                                  "--train-text-encoder")))
    assert not (out / "spectral_shifts.safetensors").exists()
    parameters = torch.load(out / "checkpoint.pt", weights_only=True)["parameters"]
    assert parameters and all(re.search(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\."
                                        r"(q|k|v|out)_proj)\.lora_[AB]$", name) for name in parameters)
    assert any(name.startswith("text.") for name in parameters)
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in parameters.values())

    ids = trained.text_encoder.tokenize(["a sks star", "a star"])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([5, 500])
    for weight, expected in ((1.0, trained), (0.0, checkpoint.load(files["base"]))):
        model = checkpoint.load(files["base"])
        lora.merge_file(model, out / lora.RESULT_NAME, weight)
        with torch.no_grad():
            context = model.text_encoder(ids)
            torch.testing.assert_close(context, expected.text_encoder(ids), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.unet(x, t, context), expected.unet(x, t, context),
                                       rtol=1e-4, atol=1e-5)
    with pytest.raises(spectral.ShiftFileError, match="trained on another base model"):
        lora.merge_file(checkpoint.load(files["other"]), out / lora.RESULT_NAME)


# --- resume ------------------------------------------------------------------------------------

class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in train() handles it."""


def stop_in_call(monkeypatch, n, error):
    """The n-th diffusion_loss call raises `error` (a kill, a Ctrl-C); undo() restores it."""
    calls = {"n": 0}
    real_loss = single.diffusion_loss

    def stopping(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real_loss(*a, **k)

    monkeypatch.setattr(single, "diffusion_loss", stopping)
    return lambda: monkeypatch.setattr(single, "diffusion_loss", real_loss)


def assert_same_shifts(first, second):
    a, _ = spectral.load_shifts(first / "spectral_shifts.safetensors")
    b, metadata = spectral.load_shifts(second / "spectral_shifts.safetensors")
    assert a.keys() == b.keys() and metadata["step"] == 6
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_result(first, second):
    """The result files hold the same tensors (the shift file's, or the LoRA file's)."""
    if (first / lora.RESULT_NAME).exists():
        a, b = (safetensors.torch.load_file(folder / lora.RESULT_NAME) for folder in (first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    else:
        assert_same_shifts(first, second)


@pytest.mark.parametrize("method", [[], ["--method", "lora", "--lr", "1e-2"]], ids=["spectral", "lora"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(files, tmp_path, monkeypatch, method):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("--steps", "6", "--save-every", "3", *method)
    assert single.main(argv(files, whole, *common)) == 0
    undo = stop_in_call(monkeypatch, 5, Killed())
    with pytest.raises(Killed):
        single.main(argv(files, killed, *common))
    undo()
    assert [int(r["step"]) for r in read_log(killed / "log.csv")] == [1, 2, 3, 4]
    assert single.main(argv(files, killed, *common, "--resume")) == 0
    assert_same_result(whole, killed)
    assert ([r["loss"] for r in read_log(whole / "log.csv")] ==
            [r["loss"] for r in read_log(killed / "log.csv")])


def test_ctrl_c_names_the_last_save_and_resume_continues_exactly(files, tmp_path, monkeypatch, capsys):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    common = ("--steps", "6", "--save-every", "3", "--prior-loss-weight", "0")
    assert single.main(argv(files, whole, *common)) == 0
    undo = stop_in_call(monkeypatch, 5, KeyboardInterrupt())
    capsys.readouterr()
    assert single.main(argv(files, stopped, *common)) == 130
    assert error_line(capsys) == (f"interrupted at step 5; the last save is step 3 "
                                  f"({stopped / 'checkpoint.pt'}); continue with the same command "
                                  "and --resume")
    undo()
    assert single.main(argv(files, stopped, *common, "--resume")) == 0
    assert_same_shifts(whole, stopped)


def test_an_earlier_run_is_refused_then_replaced_with_overwrite(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert single.main(argv(files, out, "--steps", "2", "--prior-loss-weight", "0")) == 0
    (out / "samples" / "step-00099.png").write_bytes(b"an old grid")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert single.main(argv(files, out, "--steps", "1", "--prior-loss-weight", "0")) == 2
    assert "holds an earlier run's files" in error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert single.main(argv(files, out, "--steps", "1", "--prior-loss-weight", "0", "--overwrite")) == 0
    assert not (out / "samples" / "step-00099.png").exists()
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1]
    assert spectral.load_shifts(out / "spectral_shifts.safetensors")[1]["step"] == 1
    # another --method's run replaces it whole: no shift file left to pass for this run's result
    assert single.main(argv(files, out, "--steps", "1", "--prior-loss-weight", "0", "--method", "full")) == 2
    assert single.main(argv(files, out, "--steps", "1", "--prior-loss-weight", "0", "--method", "full",
                            "--overwrite")) == 0
    assert not (out / "spectral_shifts.safetensors").exists() and (out / "checkpoint.pt").exists()


def test_resume_in_fp16_from_a_run_saved_without_it_warns_and_continues(files, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--prior-loss-weight", "0", "--save-every", "1")
    assert single.main(argv(files, out, "--steps", "1", *common)) == 0
    capsys.readouterr()
    resumed = argv(files, out, "--steps", "2", *common, "--resume", "--mixed-precision", "fp16")
    assert single.main(resumed) == 0
    assert "--mixed-precision differ from the checkpoint's" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2]


def test_defaults_follow_what_the_model_is_not_where_it_is(files, tmp_path):
    """A byte-identical copy of the bundled model elsewhere gets the bundled model's defaults;
    a model made otherwise gets SD's."""
    import shutil
    from train import core
    bundled = os.path.dirname(checkpoint.DEFAULT_MODEL)
    shutil.copy(checkpoint.DEFAULT_MODEL, tmp_path / "copy.safetensors")
    shutil.copytree(os.path.join(bundled, "tokenizer"), tmp_path / "tokenizer")
    for path, expected in ((str(tmp_path / "copy.safetensors"), (1e-2, 4.0, 8, 1, True)),
                           (files["base"], (1e-3, 7.5, 4, None, False))):
        config = single.parse_args(["--model", path])
        model = checkpoint.load(path)
        defaults = core.model_defaults(config, model)
        assert tuple(defaults[k] for k in ("lr", "guidance", "batch_size", "threads",
                                           "train_text_encoder")) == expected, path


def test_ctrl_c_outside_training_is_one_line_too(files, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(single, "read_data", interrupted)   # while class images are made, say
    assert single.main(argv(files, tmp_path / "out", "--steps", "2")) == 130
    assert error_line(capsys).startswith("interrupted outside training; what was written so far")


def test_resume_trains_at_the_learning_rates_given_now(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert single.main(argv(files, out, "--steps", "2", "--prior-loss-weight", "0")) == 0
    assert single.main(argv(files, out, "--steps", "3", "--prior-loss-weight", "0", "--resume",
                            "--lr", "0.5", "--lr-1d", "0.25")) == 0
    assert "--lr, --lr-1d differ from the checkpoint's" in capsys.readouterr().err
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.5, 0.25]


# --- bad input: one line each, exit code 2 (1 for a diverged run) ------------------------------

def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such directory"),
    ("empty", "the directory is empty"),
    ("junk", "none of its 1 files is a readable image"),
])
def test_bad_instance_dirs(files, tmp_path, capsys, case, expected):
    directory = tmp_path / case
    if case != "missing":
        directory.mkdir()
    if case == "junk":
        (directory / "x.jpg").write_bytes(b"not a jpeg")
    args = argv(files, tmp_path / "out", "--steps", "1")
    args[args.index("--instance-dir") + 1] = str(directory)
    assert single.main(args) == 2
    line = error_line(capsys)
    assert line.startswith("error: --instance-dir") and expected in line


def test_instance_prompt_without_the_class_word(files, tmp_path, capsys):
    args = argv(files, tmp_path / "out", "--steps", "1", "--instance-prompt", "a sks")
    assert single.main(args) == 2
    assert "lacks the class word(s) star" in error_line(capsys)
    args = argv(files, tmp_path / "out", "--steps", "1", "--instance-prompt", "a sks",
                "--prior-loss-weight", "0", "--validation-prompt", "a sks")
    assert single.main(args) == 0  # without prior preservation there is no class to keep


def test_resume_on_another_base_model_or_without_checkpoint(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert single.main(argv(files, out, "--steps", "1", "--prior-loss-weight", "0")) == 0
    args = argv(files, out, "--steps", "2", "--prior-loss-weight", "0", "--resume")
    args[args.index("--model") + 1] = files["other"]
    capsys.readouterr()
    assert single.main(args) == 2
    assert "trained on another base model" in error_line(capsys)
    args = argv(files, out, "--steps", "2", "--prior-loss-weight", "0", "--resume", "--train-text-encoder")
    assert single.main(args) == 2
    assert "holds other trained tensors than this run makes" in error_line(capsys)
    monkeypatch.setattr(single.core, "load_model", None)    # refused before the model is loaded
    assert single.main(argv(files, tmp_path / "fresh", "--resume")) == 2
    line = error_line(capsys)
    assert line.startswith("error: --resume:") and "no checkpoint there" in line
    assert not (tmp_path / "fresh").exists()


def test_bad_numbers(files, tmp_path, capsys):
    assert single.main(argv(files, tmp_path / "out", "--resolution", "18")) == 2
    assert "--resolution 18: must be a multiple of 4" in error_line(capsys)
    with pytest.raises(SystemExit) as exit:
        single.main(argv(files, tmp_path / "out", "--save-every", "0"))
    assert exit.value.code == 2 and "--save-every must be at least 1, got 0" in error_line(capsys)


@pytest.mark.parametrize("device, message", [("gpu0", "--device: unknown device 'gpu0'"),
                                             ("cuda", "--device cuda, but no CUDA device is available")])
def test_bad_device(files, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # also on a machine with a GPU
    with pytest.raises(SystemExit) as exit:
        single.main(argv(files, tmp_path / "out", "--device", device))
    assert exit.value.code == 2 and message in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_model_file(files, tmp_path, capsys):
    args = argv(files, tmp_path / "out")
    args[args.index("--model") + 1] = str(tmp_path / "nope.safetensors")
    assert single.main(args) == 2
    assert error_line(capsys).startswith("error: ")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys, monkeypatch):
    real_loss = single.diffusion_loss
    calls = {"n": 0}

    def nan_in_step_3(*a, **k):
        calls["n"] += 1
        loss = real_loss(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(single, "diffusion_loss", nan_in_step_3)
    out = tmp_path / "run"
    assert single.main(argv(files, out, "--steps", "5", "--save-every", "2")) == 1
    line = error_line(capsys)
    assert "loss is nan at step 3" in line and "the last good save is step 2" in line
    _, metadata = spectral.load_shifts(out / "spectral_shifts.safetensors")
    assert metadata["step"] == 2


def test_help_lists_every_flag():
    result = subprocess.run([sys.executable, "-m", "train.single", "--help"],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.startswith("usage: python -m train.single")
    for field in dataclasses.fields(single.SingleConfig):
        assert "--" + field.name.replace("_", "-") in result.stdout, field.name
