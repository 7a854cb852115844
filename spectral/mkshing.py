"""Reading mkshing/svdiff-pytorch's shift files into ours.

Their files hold, per layer, the shift delta of W_delta = U diag(ReLU(sigma + delta)) Vh, with
W (m, n) a weight matrix (conv kernels as c_out x (c_in*kh*kw)), U (m, r), sigma and delta (r,),
Vh (r, n), r = min(m, n): the same parametrization as ours, under diffusers' / transformers' module
names. Only their norm layers differ (a scale vector treated as a 1 x c matrix, one scalar each):
load_mkshing converts those to our full-vector shift.
"""

import os
from typing import Callable

import torch
from torch import Tensor, nn

from ldm.files import first_names
from spectral.io import ShiftFileError, read_safetensors
from spectral.norms import NORMS, ShiftedNorm


def load_mkshing(path: str | os.PathLike, rename: Callable[[str], str],
                 model: nn.Module | None = None) -> dict[str, Tensor]:
    """Read mkshing/svdiff-pytorch's spectral_shifts(_te).safetensors -> {our module path: delta}.

    Their keys are "<module path>.delta" in diffusers' UNet2DConditionModel names
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.delta", "conv_in.delta",
    "down_blocks.0.resnets.0.norm1.delta") or transformers' CLIPTextModel names
    ("text_model.encoder.layers.0.self_attn.q_proj.delta", "text_model.final_layer_norm.delta").
    `rename` maps such a module path (without ".delta") to ours.

    Matrix deltas carry over as they are: the same thin SVD of the same (c_out, c_in*kh*kw)
    matrix, singular values in descending order. Their norm layers are 1 x c matrices with one
    singular value |gamma|, so their delta is one scalar d that rescales the whole scale vector,
        gamma' = U ReLU(|gamma| + d) Vh = gamma * ReLU(|gamma| + d) / |gamma|,
    which is our full-vector additive shift gamma' - gamma. Converting it needs gamma: pass the
    `model` (plain or attached) the names refer to; it also checks that every name exists.
    """
    tensors, _ = read_safetensors(path)
    not_delta = [name for name in tensors if not name.endswith(".delta")]
    if not_delta:
        raise ShiftFileError(f"{path}: not an mkshing shift file (keys like {first_names(not_delta)})")
    modules = dict(model.named_modules()) if model is not None else None
    deltas = {}
    for key, delta in tensors.items():
        name = rename(key[: -len(".delta")])
        delta = delta.float()
        if modules is not None and name not in modules:
            raise ShiftFileError(f"{path}: {key} maps to {name!r}, which is not a module of the model")
        if modules is not None and isinstance(modules[name], (*NORMS, ShiftedNorm)):   # scalar -> vector
            gamma = modules[name].weight.detach().float()
            norm = gamma.norm()
            delta = gamma * (torch.relu(norm + delta) / norm - 1)
        elif modules is None and delta.shape == (1,):
            raise ShiftFileError(f"{path}: {key} looks like a per-norm scalar shift; pass model= to convert it")
        deltas[name] = delta
    return deltas
