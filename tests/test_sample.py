"""StableDiffusion.generate and python -m edit.sample end to end on a tiny saved model."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edit import sample
from ldm import checkpoint as ckpt
from ldm import ddim
from tiny import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD 1 model saved as a single file with its tokenizer beside it."""
    folder = tmp_path_factory.mktemp("sample")
    model = tiny_model("sd1", tokenizer_dir=str(folder / "tokenizer"))
    ckpt.save_single_file(str(folder / "tiny.safetensors"), model)
    return model, folder


@torch.no_grad()
def test_generate_is_ddim_then_decode(saved):
    """generate() = noise from the seed, ddim.sample with guidance, decode, map to [0, 1]."""
    model, _ = saved
    prompts = ["a red star", "a photo of a cat"]
    images = model.generate(prompts, negative_prompt="blue", steps=3, guidance=5.0, eta=0.5,
                            seed=7, progress=False)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 4, 16, 16, generator=g)
    latents = ddim.sample(model.denoise, x_T, model.encode_prompts(prompts),
                          uncond=model.encode_prompts(["blue", "blue"]), guidance=5.0,
                          schedule=model.schedule, steps=3, eta=0.5, generator=g,
                          prediction_type=model.prediction_type, progress=False)
    expected = ((model.vae.decode_latents(latents) + 1) / 2).clamp(0, 1)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    again = model.generate(prompts, negative_prompt="blue", steps=3, guidance=5.0, eta=0.5,
                           seed=7, progress=False)
    assert torch.equal(images, again)
    other = model.generate(prompts, steps=3, guidance=1.0, seed=8, progress=False)
    assert not torch.equal(images, other)
    with pytest.raises(ValueError, match="multiple of"):
        model.generate(prompts, steps=1, height=30, width=32, progress=False)


@torch.no_grad()
@torch.no_grad()
def test_generate_in_batches_draws_them_one_after_another(saved):
    """batch_size=2 over 3 prompts: the first two, then the third, from one generator."""
    model, _ = saved
    prompts = ["a red star", "a blue circle", "a photo of a cat"]
    batched = model.generate(prompts, steps=2, seed=3, progress=False, batch_size=2)
    g = torch.Generator().manual_seed(3)
    first = model.generate(prompts[:2], steps=2, generator=g, progress=False)
    second = model.generate(prompts[2:], steps=2, generator=g, progress=False)
    assert torch.equal(batched, torch.cat([first, second]))
    assert not torch.equal(batched[2], model.generate(prompts[2:], steps=2, seed=3, progress=False)[0])


def test_generate_in_bfloat16(tmp_path):
    """Half-precision weights: contexts and latents follow the UNet's dtype, the sampler and
    the returned images stay float32."""
    model = tiny_model("sd2", tokenizer_dir=str(tmp_path / "tokenizer"))
    full = model.generate(["a red star"], steps=2, seed=1, progress=False)
    model.to(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    half = model.generate(["a red star"], steps=2, seed=1, progress=False)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (half - full).abs().mean() < 0.05


def test_cli_writes_grid_of_the_right_size(saved, tmp_path):
    model, folder = saved
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "edit.sample", "--model", str(folder / "tiny.safetensors"),
         "--prompt", "a red star", "--prompt", "a photo of a cat", "--num-images", "3", "--sample-steps", "2",
         "--seed", "3", "--output", str(out), "--plain", "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3)  # 2 rows, 3 columns, padding 2
    # the top-left tile is what the API gives for the first prompt with the same seed
    images = model.generate(["a red star"] * 3, steps=2, seed=3, progress=False)
    tile = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    # (within one level of 255: another process may run another number of threads, which
    # changes float summation order and so, rarely, the rounding of a pixel)
    assert np.abs(grid[2:34, 2:34].astype(int) - tile.astype(int)).max() <= 1


def test_cli_captions(saved, tmp_path):
    _, folder = saved
    out = tmp_path / "captioned.png"
    assert sample.main(["--model", str(folder / "tiny.safetensors"), "--prompt", "a red star",
                        "--num-images", "2", "--sample-steps", "1", "--output", str(out), "--quiet"]) == 0
    width, height = Image.open(out).size
    assert width == 2 * (128 + 2) + 2 and height > 128 + 2  # tiles enlarged x4, caption below


def test_cli_replaces_an_existing_grid_only_with_overwrite(saved, tmp_path, capsys):
    _, folder = saved
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier result")
    argv = ["--model", str(folder / "tiny.safetensors"), "--prompt", "a red star", "--num-images", "1",
            "--sample-steps", "1", "--output", str(out), "--quiet"]
    with pytest.raises(SystemExit) as refused:
        sample.main(argv)
    assert refused.value.code == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier result"
    assert sample.main(argv + ["--overwrite"]) == 0
    assert Image.open(out).size[0] == 128 + 4


def test_cli_bad_inputs(saved, tmp_path, capsys):
    """A bad value: argparse's usage line and one error line, before the model is loaded; what
    only the model can tell (a file that is no checkpoint, a size it cannot take): one line."""
    _, folder = saved
    model = str(folder / "tiny.safetensors")
    bad_values = {
        "--sample-steps must be": ["--sample-steps", "0"],
        "--num-images must be": ["--num-images", "0"],
        "--eta must be at most 1, got 2.0": ["--eta", "2"],
        "no such folder": ["--output", str(tmp_path / "a/b.png")],
        ".png": ["--output", str(tmp_path / "grid.jpg")],
        "--device: unknown device 'gpu0'": ["--device", "gpu0"],
    }
    bad_models = {
        "no such file": ["--model", str(tmp_path / "none.ckpt")],
        "multiple of": ["--size", "34", "--sample-steps", "1"],
        "not a checkpoint": ["--model", str(folder / "tokenizer" / "vocab.json")],
    }
    for message, extra in [*bad_values.items(), *bad_models.items()]:
        argv = ["--model", model, "--prompt", "x", "--output", str(tmp_path / "g.png"), *extra, "--quiet"]
        try:
            code = sample.main(argv)
        except SystemExit as error:
            code = error.code
        err = capsys.readouterr().err
        assert code == 2, message
        if message in bad_values:
            usage, _, last = err.rstrip("\n").rpartition("\n")
            assert usage.startswith("usage: ") and last.startswith("python -m edit.sample: error: "), err
        else:
            last = err.rstrip("\n")
            assert err.startswith("error: ") and err.count("\n") == 1, err
        assert message in last, err


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "edit.sample", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m edit.sample")
    for action in sample.build_parser()._actions:
        assert all(flag in result.stdout for flag in action.option_strings), action.option_strings


def test_grid_takes_tensors_pil_and_uint8_arrays_alike():
    """The same pixels as a float batch in [0, 1], PIL images or a uint8 (B, H, W, 3) array give
    the same grid, tile i at its row-major place, enlarged by nearest neighbour."""
    from edit.grid import make_grid
    pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    grids = [np.asarray(make_grid(images, columns=3, padding=4, scale=2))
             for images in (pixels, [Image.fromarray(p) for p in pixels], as_tensor)]
    assert (grids[0] == grids[1]).all() and (grids[0] == grids[2]).all()
    assert grids[0].shape == (2 * (12 + 4) + 4, 3 * (14 + 4) + 4, 3)
    top, left = 4 + 16, 4 + 18                                   # tile 4: row 1, column 1
    assert (grids[0][top:top + 12:2, left:left + 14:2] == pixels[4]).all()
