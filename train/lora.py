"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), the baseline
the paper compares spectral shifts with (SVDiff sec. 4.5). The project's one LoRA.

Each adapted nn.Linear W (m, n) stays frozen and gets a trained low-rank update:

    y = W x + b + (alpha / r) B A x        A (r, n) ~ nn.Linear's init, B (m, r) = 0

so an untrained adapter is exactly the base model, and merged, W + (alpha / r) B A is a plain
Linear again: sampling at the base model's cost. alpha = r (scale 1), as diffusers' DreamBooth
LoRA trainer sets lora_alpha = rank.

Adapted layers: those diffusers' DreamBooth-LoRA trainer adapts, the attention projections of
every UNet transformer block (to_q, to_k, to_v, to_out.0 of attn1 and attn2); with the text
encoder, its self-attention q_proj, k_proj, v_proj, out_proj.

File names: diffusers' PEFT layout (what diffusers' load_lora_weights reads),
    unet.<diffusers module path>.lora_A.weight (r, n) / .lora_B.weight (m, r)
    text_encoder.text_model.<path>.lora_A.weight / .lora_B.weight
with our CompVis module paths renamed (`diffusers_name`; ldm/diffusers_layout.py renames back).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ldm.diffusers_layout import diffusers_unet_name_to_compvis
from ldm.unet import UNetConfig

UNET_TARGETS = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_TARGETS = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha / rank) B A; `base` keeps the original layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's own init, as PEFT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + self.scale * update.to(x.dtype)

    def merged(self) -> nn.Linear:
        """The plain Linear holding W + scale B A."""
        with torch.no_grad():
            self.base.weight += (self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def count(model: nn.Module, rank: int, targets: re.Pattern) -> int:
    """Trained values of rank-`rank` adapters on `model`'s layers matching `targets`: r (m + n)
    per Linear (m, n). Works on meta-device models."""
    return sum(rank * (module.in_features + module.out_features) for path, module in model.named_modules()
               if type(module) is nn.Linear and targets.search("." + path))


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def attach(model: nn.Module, rank: int, targets: re.Pattern) -> dict[str, LoRALinear]:
    """Freeze `model` and replace every nn.Linear whose module path matches `targets` (searched
    in "." + path) by a LoRALinear of `rank`, in place; returns them by module path."""
    model.requires_grad_(False)
    adapted = {}
    for path, module in list(model.named_modules()):
        if type(module) is nn.Linear and targets.search("." + path):
            parent, name = _parent(model, path)
            adapted[path] = LoRALinear(module, rank)
            setattr(parent, name, adapted[path])
    if not adapted:
        raise ValueError("no layer to adapt: the model has no attention projections LoRA knows")
    return adapted


def merge(model: nn.Module) -> None:
    """Every LoRALinear in `model` back to a plain nn.Linear holding W + scale B A, in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, name = _parent(model, path)
            setattr(parent, name, module.merged())


# ----------------------------------------------------------------------------- file names

def diffusers_unet_name(path: str, config: UNetConfig) -> str:
    """Our (CompVis) path of a transformer-block layer -> diffusers' UNet2DConditionModel path:
    input_blocks.k.1 -> down_blocks.i.attentions.j (k = 1 + i(n + 1) + j), middle_block.1 ->
    mid_block.attentions.0, output_blocks.k.1 -> up_blocks.i.attentions.j (k = i(n + 1) + j)."""
    n = config.num_res_blocks
    found = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d+)?(\..*)$", path)
    if not found:
        raise ValueError(f"no diffusers name for UNet layer {path!r}")
    block, k, inner, rest = found.groups()
    if block == "middle_block":
        return "mid_block.attentions.0" + rest
    k = int(k)
    if block == "input_blocks":
        return f"down_blocks.{(k - 1) // (n + 1)}.attentions.{(k - 1) % (n + 1)}{rest}"
    return f"up_blocks.{k // (n + 1)}.attentions.{k % (n + 1)}{rest}"


def file_name(component: str, path: str, config: UNetConfig) -> str:
    """The PEFT-layout prefix of an adapted layer: "unet.<diffusers path>" or
    "text_encoder.text_model.<path>" (our text encoder's `transformer` is CLIP's text_model)."""
    if component == "unet":
        return "unet." + diffusers_unet_name(path, config)
    return "text_encoder." + re.sub(r"^transformer\.", "text_model.", path)


def our_name(name: str, config: UNetConfig) -> tuple[str, str]:
    """The inverse of file_name: (component, our module path)."""
    component, _, path = name.partition(".")
    if component == "unet":
        return "unet", diffusers_unet_name_to_compvis(path, config)
    if component == "text_encoder":
        return "text", re.sub(r"^text_model\.", "transformer.", path)
    raise ValueError(f"{name}: not a UNet or text-encoder LoRA layer")


def state_dict(adapted: dict[str, dict[str, LoRALinear]], config: UNetConfig) -> dict[str, torch.Tensor]:
    """{component ("unet", "text"): {our path: layer}} -> the file's tensors."""
    tensors = {}
    for component, layers in adapted.items():
        for path, layer in layers.items():
            prefix = file_name(component, path, config)
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
    return tensors
