"""Combining trained shifts: plain functions on {name: delta} dicts (paper section 4.3).

Each delta (r,) shifts a layer's singular values, W_delta = U diag(ReLU(sigma + delta)) Vh with
U (m, r), sigma (r,), Vh (r, n) (a norm's delta (c,) shifts its scale: gamma + delta). The
shifts act through ReLU(sigma + delta), and the ReLU is applied where the weights are built
(forward or merge), after combining, never inside these functions:

    add:          ReLU(sigma + delta_1 + delta_2 + ...)            several subjects / edits at once
    interpolate:  ReLU(sigma + alpha delta_1 + (1 - alpha) delta_2)   0 <= alpha <= 1
    mix:          layer by layer, delta_1 where a name matches, delta_2 elsewhere
                  (e.g. coarse layers from one shift, fine layers from another)

A layer missing from one dict counts as an unshifted layer (delta = 0) there; the result holds
every name of its inputs. The same name with different shapes is refused.
"""

from typing import Callable, Mapping

import torch
from torch import Tensor

from spectral.layers import Patterns, matches

Deltas = Mapping[str, Tensor]


def _union(*deltas: Deltas) -> dict[str, Tensor]:
    """Every name with one of its tensors, checking that the inputs agree on shapes."""
    found = {}
    for d in deltas:
        for name, t in d.items():
            if found.setdefault(name, t).shape != t.shape:
                raise ValueError(f"cannot combine {name}: shapes {tuple(found[name].shape)} and {tuple(t.shape)}")
    return found


def _get(d: Deltas, name: str, like: Tensor) -> Tensor:
    """d[name] in float32, or zeros (no shift) when d does not have the layer."""
    return d[name].float() if name in d else torch.zeros_like(like, dtype=torch.float32)


def add(*deltas: Deltas) -> dict[str, Tensor]:
    """delta_1 + delta_2 + ... per layer."""
    found = _union(*deltas)
    return {name: sum(_get(d, name, like) for d in deltas) for name, like in found.items()}


def interpolate(first: Deltas, second: Deltas, alpha: float) -> dict[str, Tensor]:
    """alpha * first + (1 - alpha) * second per layer, 0 <= alpha <= 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    found = _union(first, second)
    return {name: alpha * _get(first, name, like) + (1 - alpha) * _get(second, name, like)
            for name, like in found.items()}


def mix(first: Deltas, second: Deltas, take_from_first: Patterns | Callable[[str], bool]) -> dict[str, Tensor]:
    """Per layer: first's delta where take_from_first(name) (or the name matches the globs /
    regexes given), second's elsewhere."""
    chosen = take_from_first if callable(take_from_first) else (lambda name: matches(name, take_from_first))
    found = _union(first, second)
    return {name: _get(first if chosen(name) else second, name, like) for name, like in found.items()}
