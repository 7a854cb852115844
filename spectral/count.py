"""How big is a spectral shift?  python -m spectral.count --family sd15|sd21

    W_delta = U diag(ReLU(sigma + delta)) Vh: delta (r,), r = min(m, n), per weight W (m, n)

Builds the UNet and the CLIP text encoder at full size on the meta device (no memory, no
weights) and counts what attach would train: min(m, n) singular values per weight matrix
(Linear, Conv as c_out x (c_in*kh*kw), Embedding) plus, for each GroupNorm / LayerNorm, either
its whole scale vector (our full-vector shift, as in the paper) or a single scalar (what
mkshing/svdiff-pytorch trains: a norm scale as a 1 x c matrix has one singular value).
Sizes are float32 payload in MB of 10^6 bytes, and the size of the shift file save_shifts
writes for the full-vector case (names and metadata included).
"""

import argparse
import math
import os
import sys
import tempfile

import torch
from torch import nn

from spectral.io import save_shifts
from spectral.layers import targets
from spectral.norms import NORMS


def delta_size(module: nn.Module) -> int:
    """Number of trained shift values of one layer: min(m, n) for a weight matrix, the size of
    the scale vector for a norm."""
    shape = module.weight.shape
    if isinstance(module, NORMS):
        return math.prod(shape)
    return min(shape[0], math.prod(shape[1:]))


def count(model: nn.Module) -> dict[str, int]:
    """{"layers", "matrices", "norm_vectors", "norm_scalars"} for every layer attach would shift."""
    layers = targets(model)
    norms = [m for m in layers.values() if isinstance(m, NORMS)]
    return {"layers": len(layers),
            "matrices": sum(delta_size(m) for m in layers.values() if not isinstance(m, NORMS)),
            "norm_vectors": sum(delta_size(m) for m in norms),
            "norm_scalars": len(norms)}


def build(family: str) -> dict[str, nn.Module]:
    """UNet and text encoder of the family, on the meta device."""
    from transformers import CLIPTextModel
    from ldm.family import sd1_text_config, sd2_text_config
    from ldm.unet import UNetConfig, UNetModel
    sd15 = family == "sd15"
    with torch.device("meta"):
        return {"UNet": UNetModel(UNetConfig.sd15() if sd15 else UNetConfig.sd21()),
                "text encoder": CLIPTextModel(sd1_text_config() if sd15 else sd2_text_config())}


def megabytes(values: int) -> float:
    return 4 * values / 1e6


def file_megabytes(models: dict[str, nn.Module]) -> float:
    """Size of a save_shifts file with zero deltas for every layer ("unet."/"text." names)."""
    prefixes = {"UNet": "unet.", "text encoder": "text.transformer."}
    deltas = {prefixes[component] + name: torch.zeros(delta_size(module))
              for component, model in models.items() for name, module in targets(model).items()}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "shift.safetensors")
        save_shifts(path, deltas)
        return os.path.getsize(path) / 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spectral.count", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="How big is a spectral shift? Counts what attach would train on the full-size UNet "
                    "and text encoder, built on the meta device (no weights needed).")
    parser.add_argument("--family", choices=["sd15", "sd21"], default="sd15",
                        help="model family: sd15 (SD 1.x, CLIP ViT-L/14 text) or sd21 (SD 2.x, OpenCLIP "
                             "ViT-H/14 text)")
    return parser


def main(argv=None) -> int:
    """The command line; 0 on success (a bad argument: argparse's message and exit status 2)."""
    args = build_parser().parse_args(argv)
    models = build(args.family)
    counts = {name: count(model) for name, model in models.items()}
    counts["both"] = {key: sum(c[key] for c in counts.values()) for key in next(iter(counts.values()))}
    print(f"spectral shifts of {args.family} (float32; MB = 10^6 bytes)")
    print(f"{'':14s} {'layers':>6s} {'matrix values':>13s} {'norm vectors':>12s} {'MB':>6s}"
          f"   {'norm scalars':>12s} {'MB':>6s}")
    for name, c in counts.items():
        print(f"{name:14s} {c['layers']:6d} {c['matrices']:13,d} {c['norm_vectors']:12,d} "
              f"{megabytes(c['matrices'] + c['norm_vectors']):6.2f}   {c['norm_scalars']:12,d} "
              f"{megabytes(c['matrices'] + c['norm_scalars']):6.2f}")
    print(f"shift file for both, full-vector norms: {file_megabytes(models):.2f} MB")
    print_lora(models)
    return 0


LORA_RANKS = (1, 4, 16)


def print_lora(models: dict[str, nn.Module]) -> None:
    """For comparison: LoRA (train/lora.py: the attention projections diffusers' DreamBooth-LoRA
    trainer adapts) at the ranks of the paper's comparison, float32 values."""
    from train import lora   # the baseline, not the method: only for this comparison
    targets = {"UNet": lora.UNET_TARGETS, "text encoder": lora.TEXT_TARGETS}
    print("LoRA for comparison (attention projections; float32 MB)")
    for rank in LORA_RANKS:
        values = {name: lora.count(model, rank, targets[name]) for name, model in models.items()}
        print(f"  rank {rank:2d}: UNet {values['UNet']:10,d} values {megabytes(values['UNet']):6.2f} MB, "
              f"+ text encoder {megabytes(sum(values.values())):6.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
