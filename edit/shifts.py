"""Generating with trained spectral shifts: read shift files, combine them, merge once.

A shift file (written by train.single) holds "unet.<module path>" and "text.<module path>"
deltas. Files combine by the paper's rules (spectral/combine.py), the ReLU applied after:

    add:          W = U diag(ReLU(sigma + w_1 delta_1 + w_2 delta_2 + ...)) V^T
    interpolate:  W = U diag(ReLU(sigma + alpha delta_A + (1 - alpha) delta_B)) V^T
    mix:          per layer, delta_A where the layer is in the chosen groups, delta_B elsewhere

The combined shift is attached only to the layers the files name, then merged into plain
weights, so sampling afterwards costs exactly what the base model costs.

Named layer groups for mixing (CompVis module paths; L = len(channel_mult) resolution levels,
level 0 the finest; SD 1.5: L = 4, latents 64, 32, 16, 8; the bundled model: L = 3, 16, 8, 4):

    down              unet.input_blocks.*       (the encoder half)
    mid               unet.middle_block.*
    up                unet.output_blocks.*      (the decoder half)
    coarse            input and output blocks at levels >= L // 2, and the middle block
    fine              input and output blocks at levels < L // 2, and unet.out
    cross-attention   every unet.*.attn2.* (where the text enters)
    text              the text encoder, text.*

(unet.time_embed works at no resolution: it is in no group, so it comes from B unless named.)
"""

import math
import os
import re
from typing import Callable

import torch

import spectral
from ldm.model import StableDiffusion
from ldm.unet import UNetConfig
from spectral.layers import matches

GROUPS = ("down", "mid", "up", "coarse", "fine", "cross-attention", "text")


def parse_shift(text: str) -> tuple[str, float]:
    """"FILE" or "FILE:WEIGHT" -> (FILE, WEIGHT); the weight defaults to 1 and must be a finite
    number (ValueError otherwise). A ':' belongs to the path when no weight can follow it: the
    whole text names an existing file, or a folder separator comes after it (C:\\...)."""
    path, sep, weight = text.rpartition(":")
    if not sep or not path or os.path.isfile(text) or "/" in weight or "\\" in weight:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"{text}: the weight after the last ':' is not a number ({weight!r})") from None
    if not math.isfinite(value):  # nan or inf would turn every merged weight into nan
        raise ValueError(f"{text}: the weight must be a finite number, got {weight}")
    return path, value


def read_deltas(model: StableDiffusion, paths: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each file's deltas, checked against this base model's fingerprint (a file trained on
    another base is refused with spectral.ShiftFileError)."""
    base = model.base_fingerprint()
    return [spectral.load_shifts(path, expect_fingerprint=base)[0] for path in paths]


def combined_deltas(model: StableDiffusion, shifts: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """sum_i w_i delta_i over the files."""
    deltas = read_deltas(model, [path for path, _ in shifts])
    return spectral.add(*({name: weight * d for name, d in each.items()}
                          for each, (_, weight) in zip(deltas, shifts)))


def unet_level(name: str, config: UNetConfig) -> int | None:
    """The resolution level (0: finest) of a UNet input / output block's layer, else None."""
    found = re.match(r"unet\.(input|output)_blocks\.(\d+)\.", name)
    if not found:
        return None
    levels, per_level = len(config.channel_mult), config.num_res_blocks
    index = int(found.group(2))
    if found.group(1) == "input":   # conv_in; per level its res blocks, then a downsampler (not last)
        blocks = [0] + [level for level in range(levels)
                        for _ in range(per_level + (level < levels - 1))]
    else:                           # deepest first, one more block per level than going down
        blocks = [level for level in reversed(range(levels)) for _ in range(per_level + 1)]
    return blocks[index]


def in_group(name: str, group: str, config: UNetConfig) -> bool:
    """Whether a shift-file layer name ("unet.<path>", "text.<path>") is in a named group."""
    level, coarse_from = unet_level(name, config), len(config.channel_mult) // 2
    return {"down": name.startswith("unet.input_blocks."),
            "mid": name.startswith("unet.middle_block."),
            "up": name.startswith("unet.output_blocks."),
            "coarse": (level is not None and level >= coarse_from) or name.startswith("unet.middle_block."),
            "fine": (level is not None and level < coarse_from) or name.startswith("unet.out."),
            "cross-attention": name.startswith("unet.") and ".attn2." in name,
            "text": name.startswith("text.")}[group]


def layer_chooser(spec: str, config: UNetConfig) -> Callable[[str], bool]:
    """--mix-layers "coarse,text" or "unet.output_blocks.*": whether a layer name is in any of
    the comma-separated groups (GROUPS) or glob patterns. ValueError for a word that is
    neither."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    for part in parts:
        if part not in GROUPS and not any(c in part for c in "*?[."):
            raise ValueError(f"--mix-layers: unknown group {part!r} (groups: {', '.join(GROUPS)}; "
                             "or a glob over layer names, e.g. 'unet.output_blocks.*')")
    if not parts:
        raise ValueError("--mix-layers: name the groups or layers that come from the first file")
    return lambda name: any(in_group(name, part, config) if part in GROUPS
                            else matches(name, part) for part in parts)


def apply_shifts(model: StableDiffusion, shifts: list[tuple[str, float]], cache_dir=None,
                 progress: bool = True) -> None:
    """Merge the weighted sum of the shift files into the model's weights, in place."""
    apply_deltas(model, combined_deltas(model, shifts), cache_dir, progress)


def apply_deltas(model: StableDiffusion, deltas: dict[str, torch.Tensor], cache_dir=None,
                 progress: bool = True) -> None:
    """Merge combined deltas ({"unet.<path>" / "text.<path>": delta}) into the weights, in place."""
    components = {"unet": model.unet, "text": model.text_encoder}
    unknown = sorted({name.split(".", 1)[0] for name in deltas} - set(components))
    if unknown:
        raise spectral.ShiftFileError(f"shift entries for unknown components: {', '.join(unknown)}")
    for component, module in components.items():
        prefix = component + "."
        own = {name[len(prefix):]: d for name, d in deltas.items() if name.startswith(prefix)}
        if not own:
            continue
        spectral.attach(module, include=list(own), cache_dir=cache_dir, progress=progress)
        spectral.load_deltas(module, own)
        spectral.merge(module)
