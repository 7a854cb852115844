"""train/multi.py: Cut-Mix geometry and captions (read back by the toy world's reader), the unmix
loss against its formula, its gradient (under gradient checkpointing too), train.multi without
cut-mixing equal to train.single, exact --resume, the files a run writes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import spectral
from edit import sample
from ldm import checkpoint
from ldm.unet import BasicTransformerBlock
from tiny import one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from train import lora, multi, single
from train.data import ImageSet, step_generator
from train.toy import reader, world
from train.trainable import SpectralShifts



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD 1 checkpoint, two subjects' images (random pixels), an SVD cache."""
    root = tmp_path_factory.mktemp("multi")
    model = tiny_model("sd1", tokenizer_dir=str(root / "tokenizer"))
    paths = {"base": str(root / "model.safetensors"), "cache": str(root / "svd"),
             "class": str(root / "class-images")}
    checkpoint.save_single_file(paths["base"], model)
    rng = np.random.default_rng(0)
    for name in ("dog", "cat"):
        folder = root / name
        folder.mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths[name] = str(folder)
    return paths


def argv(files, out, *extra):
    return ["--model", files["base"], "--subject", files["dog"], "a sks star", "a star",
            "--subject", files["cat"], "a zwx star", "a star", "--num-class-images", "2",
            "--batch-size", "2", "--sample-steps", "2", "--validation-every", "0",
            "--eval-samples", "0", "--svd-cache", files["cache"], "--class-images", files["class"],
            "--output-dir", str(out), *extra]


def read_log(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# --- Cut-Mix ---------------------------------------------------------------------------------------

def centered_render(name, seed):
    scene = world.subject_scene(name, np.random.default_rng(seed), position="center")
    return world.render(scene)


def pixels_as_latents(pixels):
    """An 'encoder' that hands the pixels through (std 0): composed latents are then images."""
    return pixels, torch.zeros_like(pixels)


class Renders(ImageSet):
    """An ImageSet of fixed renders (no augmentation), for reading composed images back."""
    def __init__(self, renders):
        super().__init__([Image.fromarray(r) for r in renders], world.SIZE, augment=False)


def test_cut_mix_takes_the_central_half_of_each_side():
    left = torch.arange(32.0).expand(1, 3, 32, 32)
    right = 100 + torch.arange(32.0).expand(1, 3, 32, 32)
    mixed = multi.cut_mix(left, right)
    assert mixed.shape == left.shape
    assert torch.equal(mixed[..., :16], left[..., 8:24]) and torch.equal(mixed[..., 16:], right[..., 8:24])
    odd = multi.cut_mix(torch.arange(5.0).expand(1, 5), 10 + torch.arange(5.0).expand(1, 5))
    assert odd.tolist() == [[1.0, 2.0, 11.0, 12.0, 13.0]]    # 2 columns, then 3, each centered


@pytest.mark.parametrize("right_first", [False, True])
def test_each_subject_lands_on_the_side_its_caption_names(right_first):
    """Composed examples, read by the reader: the subject the caption puts on the left is the one
    drawn on the left; prior images are mixed the same way, with the class prompts."""
    names = ["striped_star", "checker_star"]
    subjects = [Renders([centered_render(n, seed) for seed in range(3)]) for n in names]
    prompts = [f"a {world.SUBJECTS[n].token} star" for n in names]
    layouts = [multi.Layout(0, 1, right_first), multi.Layout(1, 0, right_first), multi.Layout(1)]
    images, captions = multi.compose(layouts, subjects, prompts, step_generator(0, 1),
                                     pixels_as_latents, 1.0)
    assert captions[2] == "a zwx star"
    for layout, caption, seen in zip(layouts[:2], captions, reader.read(((images[:2] + 1) * 127.5)
                                                                        .round().byte().permute(0, 2, 3, 1).numpy())):
        left, right = prompts[layout.left], prompts[layout.right]
        expected = (f"{right} on the right and {left} on the left" if right_first
                    else f"{left} on the left and {right} on the right")
        assert caption == expected
        assert [(o["position"], o["pattern"]) for o in seen] == \
               [("left", names[layout.left]), ("right", names[layout.right])]
    plain = Renders([world.render(world.Scene((world.Object("star", "center", 16 + dx, 16, 12, color="red"),),
                                              "white", "")) for dx in (-1, 1)])
    prior, prior_captions = multi.compose(layouts, [plain, plain], ["a star", "a star"],
                                          step_generator(0, 1), pixels_as_latents, 1.0)
    assert prior_captions[0] == ("a star on the right and a star on the left" if right_first
                                 else "a star on the left and a star on the right")
    seen = reader.read(((prior[:2] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    assert [[(o["position"], o["shape"], o["color"]) for o in r] for r in seen] == \
           [[("left", "star", "red"), ("right", "star", "red")]] * 2


def test_examples_are_cut_mixed_with_the_asked_probability():
    generator = torch.Generator().manual_seed(0)
    layouts = multi.draw_examples(4000, 3, 0.6, generator)
    mixed = [l for l in layouts if l.right is not None]
    assert abs(len(mixed) / 4000 - 0.6) < 0.03
    assert all(l.left != l.right for l in mixed)
    assert {(l.left, l.right) for l in mixed} == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert 0.45 < np.mean([l.right_first for l in mixed]) < 0.55
    assert {l.left for l in layouts if l.right is None} == {0, 1, 2}
    assert all(l.right is None for l in multi.draw_examples(200, 2, 0.0, generator))


# --- Unmix -----------------------------------------------------------------------------------------

def test_unmix_loss_is_zero_inside_each_half_and_the_formula_outside():
    rows, cols = 4, 6                       # a layer at ds 2 of an 8x12 latent
    attention = torch.zeros(1, rows * cols, 77)
    grid = attention[0].view(rows, cols, 77)
    grid[:, :3, 2] = 0.4                    # the left subject's token (position 2) on the left half
    grid[:, 3:, 5] = 0.3                    # the right subject's token on the right half
    grid[:, 3:, 9] = 0.9                    # a token no subject owns may look anywhere
    targets = [(0, [2], "right"), (0, [5], "left")]
    assert multi.unmix_loss([attention], targets, (8, 12)).item() == 0
    grid[1, 4, 2] = 0.5                     # the left subject's token strays into the right half
    expected = (0.5 ** 2 / 12 + 0) / 2      # mean over 12 wrong-half positions, then over targets
    assert multi.unmix_loss([attention], targets, (8, 12)).item() == pytest.approx(expected)
    # identifiers of several tokens: their attention summed per position
    grid[1, 4, 3] = 0.25
    two_tokens = [(0, [2, 3], "right"), (0, [5], "left")]
    assert multi.unmix_loss([attention], two_tokens, (8, 12)).item() == pytest.approx((0.75 ** 2 / 12) / 2)


@pytest.mark.parametrize("identifier", ["sks", "zwxq"])       # one token; several pieces
def test_unmix_targets_point_at_each_identifier_and_the_side_it_must_avoid(identifier):
    model = tiny_model("sd1")
    subjects = [multi.Subject("", f"a {identifier} star", "a star"), multi.Subject("", "a qvr star", "a star")]
    identifiers = [multi.identifier_pieces(model.text_encoder, s) for s in subjects]
    captions = [f"a {identifier} star", f"a qvr star on the right and a {identifier} star on the left",
                f"a qvr star on the left and a {identifier} star on the right"]
    layouts = [multi.Layout(0), multi.Layout(0, 1, right_first=True), multi.Layout(1, 0)]
    token_ids = model.text_encoder.tokenize(captions)
    targets = multi.unmix_targets(layouts, token_ids, identifiers)
    assert [(b, avoid) for b, _, avoid in targets] == [(1, "right"), (1, "left"), (2, "right"), (2, "left")]
    tokenizer = model.text_encoder.tokenizer
    for b, positions, avoid in targets:
        word = tokenizer.decode(token_ids[b, positions]).strip()
        subject = layouts[b].left if avoid == "right" else layouts[b].right
        assert word == subjects[subject].identifier[0], (b, positions)


def test_unmix_loss_equals_a_float64_loop_over_layers_targets_and_positions():
    """Two layers of different resolution over an odd-width latent (the middle column belongs
    to neither half), targets in two examples, identifiers of one and two tokens."""
    generator = torch.Generator().manual_seed(0)
    size = (6, 10)                           # ds 1: 6 x 10 maps; ds 2: 3 x 5 (middle column 2)
    maps = [torch.softmax(torch.randn(3, 60, 77, generator=generator, dtype=torch.float64), -1),
            torch.softmax(torch.randn(3, 15, 77, generator=generator, dtype=torch.float64), -1)]
    targets = [(1, [4], "right"), (1, [7, 8], "left"), (2, [4], "left"), (2, [7, 8], "right")]
    expected = []
    for attention in maps:
        rows, cols = {60: (6, 10), 15: (3, 5)}[attention.shape[1]]
        for b, tokens, avoid in targets:
            values = []
            for r in range(rows):
                for c in range(cols):
                    other = c >= cols - cols // 2 if avoid == "right" else c < cols // 2
                    if other:
                        values.append(sum(float(attention[b, r * cols + c, k]) for k in tokens) ** 2)
            expected.append(sum(values) / len(values))
    loss = multi.unmix_loss(maps, targets, size)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def unmix_gradients(model, checkpointing):
    """The unmix loss of one forward pass and the gradient of every trained tensor."""
    model.unet.gradient_checkpointing = checkpointing
    model.unet.train()
    maps = multi.CrossAttentionMaps(model.unet)
    calls = []
    record = maps.record
    maps.record = lambda module, probs: (calls.append(maps.recording), record(module, probs))
    for block in model.unet.modules():
        if isinstance(block, BasicTransformerBlock):
            block.attn2.attention_probe = maps.record
    caption = "a sks star on the left and a zwx star on the right"
    subjects = [multi.Subject("", "a sks star", "a star"), multi.Subject("", "a zwx star", "a star")]
    identifiers = [multi.identifier_pieces(model.text_encoder, s) for s in subjects]
    targets = multi.unmix_targets([multi.Layout(0, 1)], model.text_encoder.tokenize([caption]), identifiers)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    with maps.forward_pass():
        model.unet(x, torch.tensor([500]), model.text_encoder(model.text_encoder.tokenize([caption])))
    loss = multi.unmix_loss(maps.maps, targets, (16, 16))
    trained = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
    return loss, dict(zip(trained, grads)), calls, len(maps.maps)


def test_unmix_gradient_reaches_the_shifts_before_the_maps_and_survives_checkpointing(tmp_path):
    model = tiny_model("sd1")
    SpectralShifts(model, text_encoder=False, svd_cache=str(tmp_path))
    with torch.no_grad():     # shifts away from 0, so that every path carries gradient
        for p in model.unet.parameters():
            if p.requires_grad:
                p.copy_(0.01 * torch.randn(p.shape))
    loss, grads, calls, layers = unmix_gradients(model, checkpointing=False)
    transformers = sum(isinstance(m, BasicTransformerBlock) for m in model.unet.modules())
    assert loss > 0 and layers == transformers and calls == [True] * transformers
    # the keys and queries of the cross-attention make the maps: their shifts get gradient
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if "attn2.to_k" in n)
    # the output convolution comes after every map: no gradient can reach it
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if n.startswith("out."))
    # checkpointing runs each block again in backward; the probe then fires unrecorded, and
    # loss and gradients are those of the plain forward pass
    loss_c, grads_c, calls_c, layers_c = unmix_gradients(model, checkpointing=True)
    assert layers_c == transformers and calls_c == [True] * transformers + [False] * transformers
    assert torch.equal(loss, loss_c)
    for name, g in grads.items():
        assert (g is None) == (grads_c[name] is None), name
        if g is not None:
            torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-8)


def test_no_probe_and_no_unmix_term_with_weight_zero(files, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(multi, "CrossAttentionMaps", lambda unet: made.append(unet))
    assert multi.main(argv(files, tmp_path / "run", "--steps", "2", "--unmix-weight", "0")) == 0
    assert made == []
    assert all(float(r["unmix_loss"]) == 0 for r in read_log(tmp_path / "run" / "log.csv"))


# --- runs ------------------------------------------------------------------------------------------

def test_without_cut_mixing_one_subjects_examples_train_as_train_single(files, tmp_path, monkeypatch):
    """Every example from subject 1, none cut-mixed, and the draw of examples taking nothing
    from the step's generator: train.multi then makes exactly train.single's batches, loss
    and shifts (both generate and share the class images of runs/class-images/). The unmix
    loss off: with it on, the cross-attention runs as an explicit softmax, not the fused
    kernel, and its gradients round differently."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(multi, "draw_examples", lambda count, *rest: [multi.Layout(0)] * count)
    steps = ("--steps", "3", "--seed", "5")
    multi_argv = argv(files, tmp_path / "multi", *steps, "--unmix-weight", "0")
    at = multi_argv.index("--class-images")
    del multi_argv[at:at + 2]
    assert multi.main(multi_argv) == 0
    assert single.main(["--model", files["base"], "--instance-dir", files["dog"],
                        "--instance-prompt", "a sks star", "--class-prompt", "a star",
                        "--num-class-images", "2", "--batch-size", "2",
                        "--sample-steps", "2", "--validation-every", "0", "--eval-samples", "0",
                        "--svd-cache", files["cache"], "--output-dir", str(tmp_path / "single"),
                        *steps]) == 0
    assert len(list((tmp_path / "runs" / "class-images").iterdir())) == 1
    multi_log, single_log = read_log(tmp_path / "multi" / "log.csv"), read_log(tmp_path / "single" / "log.csv")
    assert [r["loss"] for r in multi_log] == [r["loss"] for r in single_log]
    a, _ = spectral.load_shifts(tmp_path / "multi" / "spectral_shifts.safetensors")
    b, _ = spectral.load_shifts(tmp_path / "single" / "spectral_shifts.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_its_files_and_logs_every_loss(files, tmp_path):
    out = tmp_path / "run"
    model = multi.train(multi.parse_args(argv(files, out, "--steps", "4", "--cut-mix-prob", "0.9")))
    # the probes are gone: what the run returns samples with the fused attention kernel
    assert all(m.attention_probe is None for m in model.unet.modules() if hasattr(m, "attention_probe"))
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert sum(int(r["cut_mixed"]) for r in rows) > 0
    assert all(float(r["unmix_loss"]) > 0 for r in rows if int(r["cut_mixed"]))
    deltas, metadata = spectral.load_shifts(out / "spectral_shifts.safetensors")
    assert [s["instance_prompt"] for s in json.loads(metadata["subjects"])] == ["a sks star", "a zwx star"]
    assert metadata["training_args"]["cut_mix_prob"] == 0.9
    assert (out / "samples" / "step-00004.png").exists() and (out / "loss.png").exists()
    # the result samples like any shift file, with a phrasing training never used
    grid = tmp_path / "pair.png"
    assert sample.main(["--model", files["base"], "--shift", str(out / "spectral_shifts.safetensors"),
                        "--prompt", "a sks star sitting beside a zwx star", "--num-images", "1",
                        "--sample-steps", "2", "--svd-cache", files["cache"], "--quiet",
                        "--output", str(grid)]) == 0
    assert np.asarray(Image.open(grid)).std() > 0


def test_method_lora_trains_with_the_unmix_loss_and_samples_with_edit_sample(files, tmp_path):
    """--method lora in train.multi: the same loop and unmix loss, a LoRA file whose adapters
    moved, and edit.sample --lora draws with it."""
    out = tmp_path / "run"
    multi.train(multi.parse_args(argv(files, out, "--steps", "3", "--cut-mix-prob", "0.9",
                                      "--method", "lora", "--lora-rank", "2", "--lr", "1e-2")))
    rows = read_log(out / "log.csv")
    assert all(float(r["unmix_loss"]) > 0 for r in rows if int(r["cut_mixed"]))
    assert not (out / "spectral_shifts.safetensors").exists()
    tensors = safetensors.torch.load_file(out / lora.RESULT_NAME)
    assert any(t.abs().max() > 0 for name, t in tensors.items() if name.endswith("lora_B.weight"))
    assert any(int(r["cut_mixed"]) for r in rows)
    for name, extra in (("base", []), ("lora", ["--lora", str(out / lora.RESULT_NAME)])):
        assert sample.main(["--model", files["base"], *extra, "--prompt", "a sks star sitting beside a zwx star",
                            "--num-images", "1", "--sample-steps", "2", "--quiet",
                            "--output", str(tmp_path / f"{name}.png")]) == 0
    assert not np.array_equal(*(np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "lora")))


def test_validation_prompts_show_pairs_in_new_phrasings_each_alone_and_the_classes():
    subjects = [multi.Subject("", f"a {t} star", "a star") for t in ("sks", "zwx", "qvr")]
    assert multi.validation_prompts(subjects) == [
        "a sks star beside a zwx star", "a zwx star next to a qvr star",
        "a sks star", "a zwx star", "a qvr star", "a star"]


@pytest.mark.parametrize("flags", [(), ("--gradient-checkpointing", "--mixed-precision", "bf16")])
def test_resume_after_a_kill_gives_the_uninterrupted_result(files, tmp_path, monkeypatch, flags):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("--steps", "6", "--save-every", "3", *flags)
    assert multi.main(argv(files, whole, *common)) == 0
    calls = {"n": 0}
    real_loss = multi.diffusion_loss

    class Killed(BaseException):
        pass

    def stopping(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed()
        return real_loss(*a, **k)

    monkeypatch.setattr(multi, "diffusion_loss", stopping)
    with pytest.raises(Killed):
        multi.main(argv(files, killed, *common))
    monkeypatch.setattr(multi, "diffusion_loss", real_loss)
    assert multi.main(argv(files, killed, *common, "--resume")) == 0
    a, _ = spectral.load_shifts(whole / "spectral_shifts.safetensors")
    b, metadata = spectral.load_shifts(killed / "spectral_shifts.safetensors")
    assert metadata["step"] == 6 and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(whole / "log.csv")] == [r["loss"] for r in read_log(killed / "log.csv")]


def test_a_concepts_list_trains_as_the_same_subject_flags(files, tmp_path):
    flags = argv(files, tmp_path / "flags", "--steps", "2")
    class_dir = str(tmp_path / "class-for-both")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_data_dir": files[name], "instance_prompt": prompt, "class_prompt": "a star",
         "class_data_dir": class_dir} for name, prompt in (("dog", "a sks star"), ("cat", "a zwx star"))]))
    listed = [a for a in flags]
    start = listed.index("--subject")
    listed[start:start + 8] = ["--concepts-list", str(concepts)]
    listed[listed.index(str(tmp_path / "flags"))] = str(tmp_path / "list")
    assert multi.main(listed) == 0
    assert multi.main(flags) == 0
    assert [r["loss"] for r in read_log(tmp_path / "list" / "log.csv")] == \
           [r["loss"] for r in read_log(tmp_path / "flags" / "log.csv")]
    assert len(list(Path(class_dir).glob("class-*.png"))) == 2
