"""Our UNet's forward time over diffusers' UNet2DConditionModel, same weights, same inputs.

    python bench/unet_forward.py [--size 16] [--batch 2] [--repeats 5] [--threads N]

SD 1.5 widths (860 M parameters, about 3.4 GB in fp32, held once: diffusers' model is built on
the meta device and given our very tensors). Runs alternate between the two models so that load
from other processes hits both alike; the ratio of medians is printed as a one-line table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import UNET_PREFIX, checkpoint_state_dict, convert_unet, diffusers_unet_config  # noqa: E402

from ldm.unet import UNetConfig, UNetModel  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = UNetConfig.sd15()
    torch.manual_seed(0)
    ours = UNetModel(config).eval()
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**diffusers_unet_config(config))
    theirs.load_state_dict(convert_unet(checkpoint_state_dict(ours, UNET_PREFIX), config),
                           strict=True, assign=True)  # shares our tensors: no second copy
    theirs.eval()

    x = torch.randn(args.batch, 4, args.size, args.size)
    t = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, config.context_dim)
    runs = {"ours": lambda: ours(x, t, context),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample}
    times = {name: [] for name in runs}
    with torch.no_grad():
        a, b = runs["ours"](), runs["diffusers"]()  # warmup, and a parity check for free
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"| SD 1.5 UNet forward, batch {args.batch}, latent {args.size}x{args.size}, context 77x768, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} "
          f"| ours {ours_s:.3f} s | diffusers {theirs_s:.3f} s | ratio {ours_s / theirs_s:.3f}x "
          f"| max abs diff {(a - b).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
