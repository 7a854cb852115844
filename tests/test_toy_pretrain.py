"""train.toy.pretrain at an even smaller width: a few steps write a checkpoint that loads through
the same path as a real SD file; resuming continues exactly. And the bundled weights load and
sample."""
import os

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import DEFAULT_MODEL, load
from train.toy.pretrain import PretrainConfig, pretrain, start

TINY = dict(num_images=64, vae_ch=32, vae_ch_mult=(1, 2), vae_res_blocks=1, vae_steps=2,
            vae_batch_size=4, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
            num_res_blocks=1, num_heads=2, text_width=32, text_layers=1, text_heads=2,
            batch_size=4, save_every=1, sample_every=1000, sample_steps=2, threads=1)


def run(tmp_path, name, steps, resume=False, overwrite=False):
    config = PretrainConfig(output_dir=str(tmp_path / name), work_dir=str(tmp_path / name / "work"),
                            steps=steps, **TINY)
    return pretrain(config, resume=resume, overwrite=overwrite)


@pytest.mark.slow
def test_smoke_writes_a_loadable_checkpoint_and_resumes_exactly(tmp_path):
    path = run(tmp_path, "a", steps=3)
    model = load(path)          # tokenizer/ beside the file, config from the metadata
    assert model.family == "sd1" and model.prediction_type == "epsilon"
    assert model.unet.config.model_channels == 32 and model.image_size == 32
    assert os.path.exists(tmp_path / "a" / "pretrain_log.csv")
    assert os.path.exists(tmp_path / "a" / "work" / "samples" / "step_000003.png")
    images = model.generate(["a red star"], steps=2, guidance=3.0, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # interrupted after 2 steps, resumed to 3: the same weights as the uninterrupted run
    run(tmp_path, "b", steps=2)
    resumed = run(tmp_path, "b", steps=3, resume=True, overwrite=True)   # replaces b's result
    a, b = load_file(path), load_file(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_an_earlier_run_is_continued_replaced_or_refused(tmp_path):
    """start(): a fresh run into a work dir holding a run is refused; --resume continues it,
    --overwrite removes it (state, log, latents, grids); a damaged or foreign state.pt is refused
    in one line; results in the output dir are replaced with --overwrite only."""
    config = PretrainConfig(output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    work = tmp_path / "work"
    (work / "samples").mkdir(parents=True)
    for name in ("log.csv", "latents.pt", "samples/step_000500.png"):
        (work / name).write_text("earlier")
    torch.save({"stage": "unet", "step": 7}, work / "state.pt")
    with pytest.raises(ValueError, match="continue that run with --resume, or replace it with"):
        start(config)
    assert start(config, resume=True)["step"] == 7
    assert len(list(work.rglob("*.*"))) == 4                    # continuing removes nothing
    assert start(config, overwrite=True) == {}
    assert not list(work.rglob("*.*"))
    with pytest.raises(ValueError, match="holds no state.pt"):
        start(config, resume=True)
    for content, message in ((b"\x00" * 64, "not a PyTorch file"), (None, "not a state written by")):
        if content is None:
            torch.save({"step": 7}, work / "state.pt")
        else:
            (work / "state.pt").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            start(config, resume=True)
    (tmp_path / "out" / "tokenizer").mkdir(parents=True)
    (tmp_path / "out" / "tokenizer" / "vocab.json").write_text("{}")
    torch.save({"stage": "unet", "step": 7}, work / "state.pt")
    assert start(config, resume=True)["step"] == 7     # the tokenizer is the resumed run's own
    (tmp_path / "out" / "toy-sd.safetensors").write_text("earlier")
    with pytest.raises(ValueError, match=r"\(toy-sd.safetensors\); replace them with --overwrite"):
        start(config, resume=True)
    assert start(config, resume=True, overwrite=True)["step"] == 7
    assert (tmp_path / "out" / "toy-sd.safetensors").read_text() == "earlier"   # until the end


def test_bundled_weights_load_and_sample():
    model = load(DEFAULT_MODEL)
    assert model.family == "sd1" and model.image_size == 32
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.path.dirname(DEFAULT_MODEL)) for f in files)
    assert size <= 20 * 2**20
    images = model.generate(["a red star on the left and a blue circle on the right"], steps=2,
                            guidance=4.0, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
