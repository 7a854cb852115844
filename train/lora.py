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
with our CompVis module paths renamed (`file_name`; `our_name` renames back).
The file's metadata (JSON strings, as shift files') adds format "svdiff-lora/1", rank, alpha
and the base model's fingerprint; diffusers ignores it.

    save(path, {"unet": layers, "text": layers}, unet_config, metadata)   what a trainer writes
    merge_file(model, path, weight)        W += weight (alpha / r) B A, for edit.sample --lora
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.diffusers_layout import diffusers_unet_name_to_compvis
from ldm.files import describe_mismatch
from ldm.unet import UNetConfig
from spectral.io import ShiftFileError, read_safetensors

FORMAT = "svdiff-lora/1"
RESULT_NAME = "pytorch_lora_weights.safetensors"   # the name diffusers' load_lora_weights(folder) looks for

UNET_TARGETS = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_TARGETS = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha / rank) B A; `base` keeps the original layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        a = torch.empty(rank, base.in_features)
        # nn.Linear's init, PEFT's default (diffusers' DreamBooth-LoRA script asks for gaussian)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

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


def attach(model: nn.Module, rank: int, targets: re.Pattern,
           generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Freeze `model` and replace every nn.Linear whose module path matches `targets` (searched
    in "." + path) by a LoRALinear of `rank`, in place; returns them by module path. A is drawn
    from `generator` (a run's seed: the same run starts from the same A), else torch's global RNG."""
    model.requires_grad_(False)
    adapted = {}
    for path, module in list(model.named_modules()):
        if type(module) is nn.Linear and targets.search("." + path):
            parent, name = _parent(model, path)
            adapted[path] = LoRALinear(module, rank, generator=generator)
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


# ----------------------------------------------------------------------------- files

def save(path: str | os.PathLike, adapted: dict[str, dict[str, LoRALinear]], config: UNetConfig,
         metadata: dict) -> None:
    """Write the adapters as a PEFT-layout safetensors file; `metadata` (the base fingerprint,
    the training args) is stored as JSON beside format, rank and alpha."""
    layer = next(layer for layers in adapted.values() for layer in layers.values())
    rank = layer.lora_A.shape[0]
    header = {**metadata, "format": FORMAT, "rank": rank, "alpha": layer.scale * rank}
    tensors = state_dict(adapted, config)
    save_file(tensors, path, metadata={k: json.dumps(v, default=str) for k, v in header.items()})


def read(path: str | os.PathLike, expect_fingerprint: str) -> dict[str, torch.Tensor]:
    """A LoRA file written by `save` -> {PEFT layer name: (alpha / r) B A}, r each layer's
    rank (lora_A's rows). A shift file, another tool's file, a damaged one or one trained on
    another base model: ShiftFileError, one line."""
    tensors, raw = read_safetensors(path, what="LoRA file")
    found = raw.get("format", "").strip('"')   # JSON strings here; other tools write plain ones
    if found != FORMAT:
        if found.startswith("svdiff-shifts"):
            raise ShiftFileError(f"{path}: a spectral shift file, not a LoRA: give it with --shift")
        raise ShiftFileError(f"{path}: not a LoRA file of this project (format {found!r}, "
                             f"this version reads {FORMAT!r})")
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as error:
        raise ShiftFileError(f"{path}: metadata is not JSON ({error})") from None
    fingerprint = metadata.get("base_fingerprint")
    if not fingerprint:
        raise ShiftFileError(f"{path}: names no base model (no base_fingerprint in its metadata)")
    if fingerprint != expect_fingerprint:
        raise ShiftFileError(f"{path} was trained on another base model (fingerprint "
                             f"{str(fingerprint)[:16]}, this model {expect_fingerprint[:16]})")
    names = {name.rsplit(".lora_", 1)[0] for name in tensors}
    if not names:
        raise ShiftFileError(f"{path}: holds no LoRA layers")
    try:
        pairs = {name: (tensors[f"{name}.lora_A.weight"].float(), tensors[f"{name}.lora_B.weight"].float())
                 for name in names}
        return {name: (metadata.get("alpha") or len(a)) / len(a) * (b @ a) for name, (a, b) in pairs.items()}
    except (KeyError, RuntimeError, TypeError, ZeroDivisionError):
        raise ShiftFileError(f"{path}: its lora_A / lora_B entries do not pair up (damaged file?)") from None


def merge_file(model: nn.Module, path: str | os.PathLike, weight: float = 1.0,
               base_fingerprint: str | None = None) -> None:
    """Add weight (alpha / r) B A of a LoRA file to the weights of a StableDiffusion `model`,
    in place (its float32 weights: the merge is exact to float32 rounding). The file must
    have been trained on `base_fingerprint`: the model's own unless something (another file,
    a shift) is merged into it already."""
    updates = read(path, base_fingerprint or model.base_fingerprint())
    components = {"unet": model.unet, "text": model.text_encoder}
    targets = {}
    for name in updates:
        try:
            component, module_path = our_name(name, model.unet.config)
            targets[name] = components[component].get_submodule(module_path)
        except (ValueError, AttributeError):
            targets[name] = None
        if not isinstance(targets[name], nn.Linear):
            raise ShiftFileError(f"{path}: layer {name} is not a Linear layer of this model")
    problem = describe_mismatch({n: tuple(u.shape) for n, u in updates.items()},
                                {n: tuple(m.weight.shape) for n, m in targets.items()})
    if problem:
        raise ShiftFileError(f"{path} does not fit this model: {problem}")
    with torch.no_grad():
        for name, module in targets.items():
            module.weight += (weight * updates[name]).to(module.weight)
