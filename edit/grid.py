"""Save images as one PNG grid, plain or with a caption under each tile.

    save_grid(images, "grid.png")                          # (B, 3, H, W) in [0, 1]
    save_grid(renders, "grid.png", scale=4)                # uint8 numpy (B, H, W, 3)
    save_grid(images, "grid.png", labels=prompts, columns=4)

Tiles are laid out row by row with `padding` pixels between them. Small images (the bundled
toy model makes 32x32) are enlarged by an integer factor with nearest-neighbour sampling when
labelled, so the captions stay readable and the pixels stay honest.
"""

import math
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def to_pil(images) -> list[Image.Image]:
    """A batch (B, 3, H, W) or a list of (3, H, W) tensors in [0, 1], a uint8 numpy batch
    (B, H, W, 3), or PIL images -> RGB PIL."""
    if isinstance(images, np.ndarray):
        return [Image.fromarray(image).convert("RGB") for image in images]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        images = list(images)
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
            continue
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        out.append(Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()))
    return out


def make_grid(images, columns: int | None = None, labels: list[str] | None = None,
              padding: int = 2, scale: int | None = None) -> Image.Image:
    """One image holding all `images` (see to_pil), `columns` per row (default: a near square).
    labels: one caption per image, wrapped under its tile. scale: integer enlargement of each
    tile (default 1, or enough for a 128-pixel-wide tile when labelled)."""
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("no images to put in a grid")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"{len(labels)} labels for {len(tiles)} images")
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    if scale is None:
        scale = max(1, math.ceil(128 / width)) if labels else 1
    width, height = width * scale, height * scale
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)

    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    chars = max(4, width // max(1, font.getbbox("x")[2]))  # characters that fit a tile's width
    wrapped = [textwrap.wrap(label, chars) or [""] for label in labels] if labels else None
    caption = max(len(lines) for lines in wrapped) * line_height + 2 if wrapped else 0

    cell_w, cell_h = width + padding, height + caption + padding
    grid = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x = padding + (i % columns) * cell_w
        y = padding + (i // columns) * cell_h
        grid.paste(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + height + 1 + j * line_height), line, fill="black", font=font)
    return grid


def png_info(metadata: dict[str, str] | None) -> PngInfo | None:
    """PNG text chunks holding `metadata` (what made an image: prompt, seed, ...)."""
    if not metadata:
        return None
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    return info


def save_grid(images, path: str, columns: int | None = None, labels: list[str] | None = None,
              padding: int = 2, scale: int | None = None, metadata: dict[str, str] | None = None) -> str:
    """make_grid(...) written to `path` (PNG by extension), `metadata` as its text chunks;
    returns the path."""
    make_grid(images, columns, labels, padding, scale).save(path, pnginfo=png_info(metadata))
    return path

