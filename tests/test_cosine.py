"""edit/cosine.py (CoSINE): the fine-tune trains only shifts on the one pair with no prior term;
DDIM inversion on the bundled model returns to the image; the sweep's columns start where the
formulas say (an independent recomputation from ldm.ddim); the grid's layout and metadata;
--shift; crop and pad; earlier edits kept unless --overwrite."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edit import cosine
from edit.shifts import apply_shifts
from ldm import checkpoint, ddim
from tiny import one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from train import core, data
from train.toy import edits as toy

PROMPT, EDIT = "a red star", "a blue star"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD 1 checkpoint with its tokenizer, an image to edit, a shared SVD cache, and one
    finished fine-tune (2 steps) whose shift file the other tests reuse."""
    root = tmp_path_factory.mktemp("cosine")
    model = tiny_model("sd1", tokenizer_dir=str(root / "tokenizer"))
    paths = {"model": str(root / "model.safetensors"), "cache": str(root / "svd"),
             "image": str(root / "photo.png"), "run": str(root / "run")}
    checkpoint.save_single_file(paths["model"], model)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths["image"])
    assert cosine.main(argv(paths, paths["run"])) == 0
    return paths


def argv(files, out, *extra):
    return ["--model", files["model"], "--image", files["image"], "--prompt", PROMPT, "--edit", EDIT,
            "--steps", "2", "--batch-size", "2", "--sample-steps", "3", "--num-images", "2",
            "--validation-every", "0", "--eval-samples", "0", "--svd-cache", files["cache"],
            "--output-dir", str(out), *extra]


def edit_image(out, setting_file: str) -> np.ndarray:
    return np.asarray(Image.open(out / "edits" / "01-a-blue-star" / setting_file), dtype=np.int16)


# --- the fine-tune --------------------------------------------------------------------------------

def test_fine_tune_is_the_diffusion_loss_on_the_one_pair_and_trains_only_shifts(files, tmp_path, monkeypatch):
    seen_pixels, per_sample, stepped = [], [], []
    encode = core.vae_moments

    def recording_encoder(model):
        inner = encode(model)
        return lambda pixels: (seen_pixels.append(pixels.clone()), inner(pixels))[1]

    loss_of = cosine.diffusion_loss

    def recording_loss(model, latents, context, t, noise):
        loss = loss_of(model, latents, context, t, noise)
        per_sample.append((context.detach().clone(), loss.detach().clone()))
        return loss
    monkeypatch.setattr(cosine.core, "vae_moments", recording_encoder)
    monkeypatch.setattr(cosine, "diffusion_loss", recording_loss)
    step = core.Run.step
    monkeypatch.setattr(core.Run, "step", lambda self, s, loss, **k: (stepped.append(loss.item()), step(self, s, loss, **k))[1])
    assert cosine.main(argv(files, tmp_path / "run", "--steps", "3")) == 0

    image = data.to_tensor(Image.open(files["image"]).convert("RGB"))
    assert len(seen_pixels) == 3 and all(torch.equal(p, image.expand(2, -1, -1, -1)) for p in seen_pixels)
    model = checkpoint.load(files["model"])
    source = model.text_encoder(model.text_encoder.tokenize([PROMPT]))
    for (context, losses), logged in zip(per_sample, stepped):
        torch.testing.assert_close(context, source.expand(2, -1, -1), rtol=0, atol=1e-6)
        assert logged == pytest.approx(losses.mean().item(), rel=1e-6)     # no prior term
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    trained = state["parameters"]
    assert trained and all(name.startswith("unet.") and name.endswith("delta") for name in trained)
    with open(tmp_path / "run" / "log.csv", newline="") as file:
        assert list(csv.DictReader(file))[0].keys() == {"step", "loss", "lr", "seconds"}


# --- inversion on the bundled model ---------------------------------------------------------------

def test_inversion_then_sampling_returns_to_the_image_on_the_bundled_model(tmp_path):
    """Guidance 1, eta 0, the same prompt, no fine-tune: DDIM inversion is first-order, so the
    latent error shrinks about as 1 / steps (measured 7.8% at 25 steps, 4.1% at 50)."""
    model = checkpoint.load(checkpoint.DEFAULT_MODEL)
    image = data.to_tensor(Image.open(toy.write_example(tmp_path / "input.png")))[None]
    source = model.encode(image)
    cond = model.encode_prompts([toy.EXAMPLE.scene.caption])
    errors = {}
    for steps in (25, 50):
        common = dict(schedule=model.schedule, steps=steps, progress=False)
        x_T = ddim.invert(model.denoise, source, cond, guidance=1.0, **common)
        back = ddim.sample(model.denoise, x_T, cond, None, guidance=1.0, **common)
        errors[steps] = float((back - source).norm() / source.norm())
    assert errors[50] < 0.08 and errors[50] < 0.7 * errors[25], errors


# --- the sweep ------------------------------------------------------------------------------------

def test_sweep_columns_start_where_the_formulas_say(files, tmp_path):
    """slerp 0: sample(invert(z*, c')) recomputed here from ldm.ddim on the merged model, and the
    source-prompt column likewise under the source prompt; slerp 1: the fresh-noise start of the
    same seed (--no-invert)."""
    shift = f"{files['run']}/spectral_shifts.safetensors"
    sweep, fresh = tmp_path / "sweep", tmp_path / "fresh"
    assert cosine.main(argv(files, sweep, "--shift", shift, "--slerp", "0,1")) == 0
    assert cosine.main(argv(files, fresh, "--shift", shift, "--no-invert")) == 0
    for j in range(2):
        assert np.abs(edit_image(sweep, f"inversion-slerp-1-eta-0-image-{j}.png")
                      - edit_image(fresh, f"fresh-noise-eta-0-image-{j}.png")).max() <= 1

    model = checkpoint.load(files["model"])
    apply_shifts(model, [(shift, 1.0)], cache_dir=files["cache"], progress=False)
    source = model.encode(data.to_tensor(Image.open(files["image"]).convert("RGB"))[None])
    for prompt, made in ((EDIT, lambda j: edit_image(sweep, f"inversion-eta-0-image-{j}.png")),
                         (PROMPT, lambda j: np.asarray(Image.open(sweep / "edits" / f"source-prompt-image-{j}.png"),
                                                       dtype=np.int16))):
        cond, uncond = model.encode_prompts([prompt]), model.encode_prompts([""])
        common = dict(schedule=model.schedule, steps=3, progress=False)
        x_T = ddim.invert(model.denoise, source, cond, guidance=1.0, **common)
        expected = model.decode(ddim.sample(model.denoise, x_T, cond, uncond, guidance=7.5, **common))
        expected = (expected[0] * 255).round().permute(1, 2, 0).numpy()
        for j in range(2):   # eta 0: every image of the batch is the same
            assert np.abs(made(j) - expected).max() <= 1, prompt


def test_the_grid_holds_input_source_prompt_and_sweep_with_their_settings(files, tmp_path):
    shift = f"{files['run']}/spectral_shifts.safetensors"
    out = tmp_path / "out"
    assert cosine.main(argv(files, out, "--shift", shift, "--eta", "0,1", "--slerp", "0,0.5")) == 0
    grid = Image.open(out / "edits" / "01-a-blue-star.png")
    assert grid.text["edit_prompt"] == EDIT and grid.text["source_prompt"] == PROMPT
    tile, padding, columns, rows = 128, 2, 2 + 4, 2           # 32 pixels enlarged 4x under a label
    assert grid.width == columns * (tile + padding) + padding
    cell = (grid.height - padding) / rows
    pixels = np.asarray(grid.convert("RGB"))
    photo = np.asarray(Image.open(files["image"]).convert("RGB"))
    for row in range(rows):
        top = padding + round(row * cell)
        np.testing.assert_array_equal(pixels[top:top + tile:4, padding:padding + tile:4], photo)
        unedited = pixels[top:top + tile:4, 2 * padding + tile:2 * padding + 2 * tile:4]
        np.testing.assert_array_equal(unedited, np.asarray(Image.open(out / "edits" / f"source-prompt-image-{row}.png")))
    files_written = sorted(p.name for p in (out / "edits" / "01-a-blue-star").iterdir())
    assert len(files_written) == 4 * 2
    for name in files_written:
        text = Image.open(out / "edits" / "01-a-blue-star" / name).text
        eta, slerp, j = float(text["eta"]), float(text["slerp"]), int(text["image"])
        label = cosine.Setting(eta, slerp).label(True)
        assert name == f"{label.replace(' + ', '-').replace(', ', '-').replace(' ', '-')}-image-{j}.png"


def test_shift_file_gives_the_fine_tunes_own_edits(files, tmp_path):
    out = tmp_path / "again"
    assert cosine.main(argv(files, out, "--shift", f"{files['run']}/spectral_shifts.safetensors")) == 0
    for j in range(2):
        name = f"inversion-eta-0-image-{j}.png"
        assert np.abs(edit_image(out, name) - edit_image(Path(files["run"]), name)).max() <= 1


def test_earlier_edits_are_kept_unless_overwrite(files, tmp_path, capsys):
    shift = f"{files['run']}/spectral_shifts.safetensors"
    out = tmp_path / "out"
    assert cosine.main(argv(files, out, "--shift", shift, "--edit", "a red circle")) == 0
    second = out / "edits" / "02-a-red-circle.png"
    before = second.read_bytes()
    assert cosine.main(argv(files, out, "--shift", shift)) == 2
    assert "holds an earlier run's edits" in capsys.readouterr().err
    assert second.read_bytes() == before
    assert cosine.main(argv(files, out, "--shift", shift, "--overwrite")) == 0
    assert not second.exists() and (out / "edits" / "01-a-blue-star.png").exists()


# --- the input ------------------------------------------------------------------------------------

def test_crop_keeps_the_middle_and_pad_keeps_everything():
    """A 60x36 image: red, blue, green columns of 12, 36, 12 pixels; its centre square is blue."""
    pixels = np.zeros((36, 60, 3), dtype=np.uint8)
    pixels[:, :12], pixels[:, 12:48], pixels[:, 48:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    image = Image.fromarray(pixels)
    cropped = np.asarray(cosine.fit(image, 32, "crop")).astype(int)
    assert cropped.shape == (32, 32, 3)
    assert np.abs(cropped[:, 1:-1] - (0, 0, 255)).max() < 10   # the edge columns blend in scaling
    padded = np.asarray(cosine.fit(image, 32, "pad")).astype(int)
    assert padded.shape == (32, 32, 3)
    assert np.abs(padded[16, 1] - (255, 0, 0)).max() < 10       # the red and green sides stay
    assert np.abs(padded[16, -2] - (0, 255, 0)).max() < 10
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).mean(0)
    np.testing.assert_allclose(padded[0, 16], border, atol=0.5)  # the band above: the border's mean


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90' in its EXIF is edited as seen: portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6                                    # Orientation: rotate 90 clockwise to view
    Image.new("RGB", (40, 24), "red").save(tmp_path / "phone.jpg", exif=exif)
    assert cosine.read_image(str(tmp_path / "phone.jpg")).size == (24, 40)
