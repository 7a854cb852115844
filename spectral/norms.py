"""The paper's 1-D case: a norm layer's scale vector gets a full additive shift.

    GroupNorm / LayerNorm:  y = (x - mean) / sqrt(var + eps) * (gamma + delta) + beta
    gamma, beta (c,) frozen;  delta (c,) trained, float32, 0 at attach

A scale vector has no singular values worth shifting (as a 1 x c matrix it has one, |gamma|), so
SVDiff shifts the whole vector, with a much smaller learning rate than the singular values
(about 1e-6 against 1e-3). This is what brings an SD 1.5 shift file to the paper's ~1.7 MB.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = (nn.GroupNorm, nn.LayerNorm)


class ShiftedNorm(nn.Module):
    """GroupNorm / LayerNorm whose scale is gamma + delta: frozen gamma (c,), trainable delta (c,).

    What is normalized keeps torch's names: a LayerNorm's `normalized_shape` (the trailing dims),
    a GroupNorm's `num_groups` (channels in groups); the other one is None.
    """

    def __init__(self, layer: nn.GroupNorm | nn.LayerNorm):
        super().__init__()
        layer_norm = isinstance(layer, nn.LayerNorm)
        self.normalized_shape = tuple(layer.normalized_shape) if layer_norm else None
        self.num_groups = None if layer_norm else layer.num_groups
        self.eps = layer.eps
        self.register_buffer("weight", layer.weight.detach())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())
        self.delta = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        # the scale the merged layer (to_plain) holds, in gamma's dtype: under autocast the op then
        # casts it as it would the plain layer's (no early rounding of a float32 gamma to half)
        scale = (self.weight + self.delta).to(self.weight.dtype)
        if self.num_groups is None:
            return F.layer_norm(x, self.normalized_shape, scale, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, scale, self.bias, self.eps)

    def to_plain(self, shifted: bool) -> nn.Module:
        if self.num_groups is None:
            layer = nn.LayerNorm(self.normalized_shape, self.eps, bias=self.bias is not None, device="meta")
        else:
            layer = nn.GroupNorm(self.num_groups, self.weight.numel(), self.eps, device="meta")
        scale = (self.weight + self.delta.detach()).to(self.weight.dtype) if shifted else self.weight
        layer.weight = nn.Parameter(scale, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias, requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        if self.num_groups is None:
            return f"LayerNorm({self.normalized_shape}, eps={self.eps})"
        return f"GroupNorm({self.num_groups}, {self.weight.numel()}, eps={self.eps})"
