"""train/data.py: reading the user's images, augmentation, latent batches, class images."""

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataError, ImageSet, ensure_class_images, read_images, to_rgb


def write_png(path, size=(20, 12), mode="RGB", color=(200, 10, 10)):
    Image.new(mode, size, color).save(path)


# --- reading ----------------------------------------------------------------------------------

def test_missing_empty_and_unreadable_dirs(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        read_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_images(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a picture")
    (tmp_path / "junk" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DataError, match="none of its 2 files is a readable image"):
        read_images(tmp_path / "junk")


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, capsys):
    write_png(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored silently
    images = read_images(tmp_path)
    assert len(images) == 1 and images[0].mode == "RGB" and images[0].size == (20, 12)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipping a.txt" in err and "DS_Store" not in err


def test_an_image_tripping_the_decompression_bomb_guard_is_skipped_with_a_warning(tmp_path, capsys,
                                                                                  monkeypatch):
    write_png(tmp_path / "huge.png", size=(64, 64))
    write_png(tmp_path / "fine.png", size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 64 x 64 is over twice that: an error
    images = read_images(tmp_path)
    assert [im.info["source"] for im in images] == ["fine.png"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipping huge.png" in err and "decompression bomb" in err


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))          # transparent -> white background
    assert [to_rgb(rgba).getpixel((x, 0)) for x in (0, 1)] == [(10, 20, 30), (255, 255, 255)]
    gray = to_rgb(Image.new("L", (3, 3), 77))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([5, 6, 7] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (5, 6, 7)
    deep = Image.fromarray(np.full((2, 2), 40000, np.uint16))  # 16-bit gray: scaled, not saturated
    assert to_rgb(deep).getpixel((0, 0)) == (156, 156, 156)


# --- augmentation and latents -----------------------------------------------------------------

def gradient_image(width, height):
    """A horizontal ramp: each column has its own value, so crops and flips are identifiable."""
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8)[None, :, None], (height, 1, 3))
    return Image.fromarray(ramp)


def test_odd_sizes_are_resized_and_cropped_square():
    images = ImageSet([gradient_image(60, 30), gradient_image(30, 30)], resolution=16)
    assert [im.size for im in images.images] == [(32, 16), (16, 16)]
    centre = images.crop(0, None)
    assert centre.shape == (3, 16, 16) and -1 <= centre.min() and centre.max() <= 1
    # the centre crop of a wide ramp is its middle: columns 8..23 of the 32 resized ones
    full = torch.from_numpy(np.asarray(images.images[0], np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(centre, full[:, :, 8:24])
    seen = set()
    for seed in range(40):
        crop = images.crop(0, torch.Generator().manual_seed(seed))
        matches = [o for o in range(17) if torch.equal(crop, full[:, :, o:o + 16])]
        flipped = [o for o in range(17) if torch.equal(crop, full[:, :, o:o + 16].flip(-1))]
        assert len(matches) + len(flipped) >= 1  # every crop is a window, maybe mirrored
        seen.add((bool(matches), (matches or flipped)[0]))
    assert len(seen) > 10  # offsets and flips both vary


def test_small_images_are_upscaled_with_a_warning(capsys):
    ImageSet([Image.new("RGB", (8, 8))], resolution=16)
    assert "smaller than --resolution 16" in capsys.readouterr().err


def fake_encode(pixels):
    """Stand-in VAE: mean = 2x2 average pool of the first channel repeated to 4, std 0.5."""
    mean = torch.nn.functional.avg_pool2d(pixels[:, :1], 2).repeat(1, 4, 1, 1)
    return mean, torch.full_like(mean, 0.5)


def test_latent_batches_are_a_function_of_the_generator():
    images = ImageSet([gradient_image(40, 32), gradient_image(32, 32), gradient_image(32, 50)], 32)
    batch = lambda seed: images.latents(4, torch.Generator().manual_seed(seed), fake_encode, 0.18)
    a, b, c = batch(1), batch(1), batch(2)
    assert a.shape == (4, 4, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latent_cache_holds_centre_crop_and_mirror():
    images = ImageSet([gradient_image(48, 32)], 32)
    images.build_cache(fake_encode)
    centre = images.crop(0, None)[None]
    plain, mirrored = images.cache[0]
    torch.testing.assert_close(plain.mean, fake_encode(centre)[0][0])
    torch.testing.assert_close(mirrored.mean, fake_encode(centre.flip(-1))[0][0])
    latents = images.latents(8, torch.Generator().manual_seed(0), fake_encode, 1.0)
    # every latent is one of the two cached means plus 0.5 * N(0, 1) noise
    for latent in latents:
        distances = [(latent - m.mean).abs().mean() for m in (plain, mirrored)]
        assert min(distances) < 0.6


def test_without_augmentation_every_latent_is_the_centre_crop_unmirrored():
    """edit.cosine's single image: a mirror would move what its prompt places, cache or not."""
    images = ImageSet([gradient_image(48, 32)], 32, augment=False)
    centre = fake_encode(images.crop(0, None)[None])[0][0]
    plain = images.latents(64, torch.Generator().manual_seed(0), fake_encode, 1.0)
    images.build_cache(fake_encode)
    cached = images.latents(64, torch.Generator().manual_seed(0), fake_encode, 1.0)
    for latents in (plain, cached):   # mean + 0.5 * N(0, 1): over 64 samples, about the mean
        torch.testing.assert_close(latents.mean(0), centre, rtol=0, atol=0.3)
    assert (centre - centre.flip(-1)).abs().mean() > 0.3      # a mirror would be told apart


# --- class images -----------------------------------------------------------------------------

def test_class_images_are_generated_once_and_reused(tmp_path):
    calls = []

    def generate(prompts, seeds):
        calls.append(list(seeds))
        return [Image.new("RGB", (8, 8), (s, 0, 0)) for s in seeds]

    star = {"prompt": "a star", "sample_steps": 25}
    images = ensure_class_images(tmp_path, 3, star, generate, batch_size=2, seed=10, progress=False)
    assert calls == [[10, 11], [12, 13]] and len(images) == 3      # whole aligned batches
    assert ensure_class_images(tmp_path, 3, star, generate, 2, 10, False) and len(calls) == 2
    images = ensure_class_images(tmp_path, 5, star, generate, 2, 10, False)
    assert calls[2:] == [[12, 13], [14, 15]]
    assert [im.getpixel((0, 0))[0] for im in images] == [10, 11, 12, 13, 14]
    assert not list(tmp_path.glob(".*tmp"))
    # images made with other settings would teach another prior: refused, and left as they are
    before = sorted(p.read_bytes() for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="made with prompt 'a star', this run uses 'a dog'"):
        ensure_class_images(tmp_path, 3, {**star, "prompt": "a dog"}, generate, 2, 10, False)
    with pytest.raises(DataError, match="made with sample_steps 25, this run uses 2"):
        ensure_class_images(tmp_path, 3, {**star, "sample_steps": 2}, generate, 2, 10, False)
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == before and len(calls) == 4
    (tmp_path / "settings.json").unlink()     # images of unknown making: refused too
    with pytest.raises(DataError, match=r"made with prompt '\(not recorded\)'"):
        ensure_class_images(tmp_path, 3, star, generate, 2, 10, False)
    with pytest.raises(DataError, match="is a file, not a directory"):
        ensure_class_images(tmp_path / "class-00000.png", 3, star, generate, 2, 10, False)


def test_image_i_does_not_depend_on_how_the_folder_was_filled(tmp_path):
    """Like the trainers' generator, this one draws a batch's noise from its first seed only, so
    image i depends on where its batch starts; batches must therefore always be the same."""
    def generate(prompts, seeds):
        return [Image.new("RGB", (8, 8), (seeds[0], k, 0)) for k in range(len(prompts))]

    star = {"prompt": "a star"}
    def pixels(folder):
        return [(folder / f"class-{i:05d}.png").read_bytes() for i in range(7)]

    ensure_class_images(tmp_path / "at-once", 7, star, generate, 4, 10, False)
    ensure_class_images(tmp_path / "in-steps", 2, star, generate, 4, 10, False)      # a first run
    ensure_class_images(tmp_path / "in-steps", 5, star, generate, 4, 10, False)      # an interruption
    (tmp_path / "in-steps" / "class-00001.png").unlink()                              # a deleted file
    images = ensure_class_images(tmp_path / "in-steps", 7, star, generate, 4, 10, False)
    assert pixels(tmp_path / "in-steps") == pixels(tmp_path / "at-once") and len(images) == 7
    assert images[5].getpixel((0, 0)) == (14, 1, 0)


# --- the helpers shared with train.toy ---------------------------------------------------------

def test_to_tensor_of_an_image_and_of_a_batch():
    """One function for a PIL image and a uint8 batch, with the values and layouts each caller
    had before it was shared (the toy pretraining's layout decides its rounding)."""
    from train.data import to_tensor
    pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    one = to_tensor(Image.fromarray(pixels[0]))
    assert one.shape == (3, 6, 7) and one.is_contiguous()
    assert torch.equal(one, torch.from_numpy(pixels[0].astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
    ends = to_tensor(np.array([[[0, 255, 0]]], dtype=np.uint8))      # one pixel: (1, 1, 3)
    assert ends.shape == (3, 1, 1) and ends.flatten().tolist() == [-1.0, 1.0, -1.0]
    batch = to_tensor(pixels, memory_format=torch.channels_last)
    before = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1   # pretrain's old formula
    assert torch.equal(batch, before) and batch.stride() == before.stride()
    assert torch.equal(to_tensor(pixels)[0], one) and to_tensor(pixels).is_contiguous()


def test_step_generator_streams():
    from train.data import step_generator
    assert step_generator(3, 7).initial_seed() == 3 * 1_000_003 + 7
    assert step_generator(3, 7, stream=2).initial_seed() == 3 * 1_000_003 + 2 * 100_000 + 7
    first = torch.rand(4, generator=step_generator(0, 5, stream=1))
    assert torch.equal(first, torch.rand(4, generator=step_generator(0, 5, stream=1)))
