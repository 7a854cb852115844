"""Generating with trained spectral shifts: read shift files, weight and add them, merge once.

A shift file (written by train.single) holds "unet.<module path>" and "text.<module path>"
deltas. Several files combine by the paper's addition rule, each scaled by its weight:

    W = U diag(ReLU(sigma + w_1 delta_1 + w_2 delta_2 + ...)) V^T

(interpolation is the case w_1 = alpha, w_2 = 1 - alpha). The combined shift is attached only
to the layers the files name, then merged into plain weights, so sampling afterwards costs
exactly what the base model costs.
"""

import math
import os

import torch

import spectral
from ldm.model import StableDiffusion


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


def combined_deltas(model: StableDiffusion, shifts: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """sum_i w_i delta_i over the files, each checked against this base model's fingerprint
    (a file trained on another base is refused with spectral.ShiftFileError)."""
    base = model.base_fingerprint()
    weighted = []
    for path, weight in shifts:
        deltas, _ = spectral.load_shifts(path, expect_fingerprint=base)
        weighted.append({name: weight * delta for name, delta in deltas.items()})
    return spectral.add(*weighted)


def apply_shifts(model: StableDiffusion, shifts: list[tuple[str, float]], cache_dir=None,
                 progress: bool = True) -> None:
    """Merge the weighted sum of the shift files into the model's weights, in place."""
    deltas = combined_deltas(model, shifts)
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
