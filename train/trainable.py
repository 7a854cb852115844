"""What a fine-tuning run trains, as one choice (--method): the method or a baseline.

Each kind freezes the base model, then makes its own trainable part, behind one interface:

    trainable = make_trainable(model, config)    # METHODS[config.method], with what it needs
    optimizer = torch.optim.AdamW(trainable.param_groups(lr, lr_1d))
    trainable.save(path, metadata)      # the result file, for the kinds with a result_name
    trainable.merge()                   # plain weights again: sampling at the base model's cost

- SpectralShifts (the method, spectral/): every weight W = U diag(sigma) V^T of the UNet (and
  the text encoder) keeps its singular vectors and trains only delta,
  W_delta = U diag(ReLU(sigma + delta)) V^T; norm scales get an additive shift at lr_1d.
  Result: spectral_shifts.safetensors, about 1.7 MB for SD 1.5.
- FullFinetune (baseline): every UNet weight is trained as it is (DreamBooth). No result file
  besides the checkpoint: it is there to compare fidelity and drift with.

- LoRA (baseline, train/lora.py): rank-r adapters (alpha = r) on the attention projections of
  the UNet (and the text encoder), as diffusers' DreamBooth-LoRA trainer places them. Result:
  pytorch_lora_weights.safetensors in diffusers' PEFT layout; rank 4 on SD 1.5 is 3.2 MB.
"""

from __future__ import annotations

import torch
from torch import nn

import spectral
from ldm.model import StableDiffusion
from train import lora
from train.data import DataError


def freeze(model: StableDiffusion) -> None:
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)


class SpectralShifts:
    result_name = "spectral_shifts.safetensors"

    def __init__(self, model: StableDiffusion, text_encoder: bool, svd_cache: str | None):
        freeze(model)
        self.components: dict[str, nn.Module] = {"unet": model.unet}
        if text_encoder:
            self.components["text"] = model.text_encoder
        self.shifts = {name: spectral.attach(module, cache_dir=svd_cache)
                       for name, module in self.components.items()}

    def param_groups(self, lr: float, lr_1d: float) -> list[dict]:
        """Singular-value shifts at lr, norm-scale shifts at the far smaller lr_1d; UNet before
        text encoder within each group (gradient clipping sums norms in this order)."""
        matrices = [p for s in self.shifts.values() for p in s.matrices]
        norms = [p for s in self.shifts.values() for p in s.norms]
        return [{"params": matrices, "lr": lr}, {"params": norms, "lr": lr_1d}]

    def named_deltas(self) -> dict[str, torch.Tensor]:
        """The shift file's entries: "unet.<module path>", "text.<module path>" -> delta."""
        return {f"{component}.{name}": delta for component, s in self.shifts.items()
                for name, delta in s.named_deltas().items()}

    def save(self, path: str, metadata: dict) -> None:
        spectral.save_shifts(path, self.named_deltas(), metadata)

    def merge(self) -> None:
        """W_delta written into plain weights, so sampling costs what the base model costs."""
        for module in self.components.values():
            spectral.merge(module)


class FullFinetune:
    result_name = None  # no result file: its checkpoint.pt holds the weights, and save is never called

    def __init__(self, model: StableDiffusion, text_encoder: bool, svd_cache: str | None):
        if text_encoder:
            raise DataError("--method full trains the UNet only; leave out --train-text-encoder")
        freeze(model)
        self.unet = model.unet.requires_grad_(True)

    def param_groups(self, lr: float, lr_1d: float) -> list[dict]:
        return [{"params": list(self.unet.parameters()), "lr": lr}]

    def merge(self) -> None:
        """The weights are trained in place: nothing to merge."""


class LoRA:
    result_name = lora.RESULT_NAME

    def __init__(self, model: StableDiffusion, text_encoder: bool, rank: int, seed: int):
        freeze(model)
        self.unet_config = model.unet.config
        self.components: dict[str, nn.Module] = {"unet": model.unet}
        if text_encoder:
            self.components["text"] = model.text_encoder
        targets = {"unet": lora.UNET_TARGETS, "text": lora.TEXT_TARGETS}
        generator = torch.Generator().manual_seed(seed)   # A's init: the run's seed decides
        self.adapted = {name: lora.attach(module, rank, targets[name], generator)
                        for name, module in self.components.items()}

    def param_groups(self, lr: float, lr_1d: float) -> list[dict]:
        """A and B of every adapter at lr (LoRA has no 1-d parameters)."""
        layers = [layer for adapted in self.adapted.values() for layer in adapted.values()]
        return [{"params": [p for layer in layers for p in (layer.lora_A, layer.lora_B)], "lr": lr}]

    def save(self, path: str, metadata: dict) -> None:
        lora.save(path, self.adapted, self.unet_config, metadata)

    def merge(self) -> None:
        """W + (alpha / r) B A written into plain Linears: sampling at the base model's cost."""
        for module in self.components.values():
            lora.merge(module)


METHODS = {"spectral": SpectralShifts, "full": FullFinetune, "lora": LoRA}


def make_trainable(model: StableDiffusion, config) -> SpectralShifts | FullFinetune | LoRA:
    """The trainable part config.method names, for a run's resolved config."""
    if config.method == "lora":
        return LoRA(model, config.train_text_encoder, config.lora_rank, config.seed)
    return METHODS[config.method](model, config.train_text_encoder, config.svd_cache)
