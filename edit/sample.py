"""Text to image with our Stable Diffusion stack: DDIM, classifier-free guidance, a PNG grid.

    python -m edit.sample --prompt "a red star on the left" --num-images 4 --output grid.png
    python -m edit.sample --model sd-v1-5.safetensors --prompt "a photo of a cat" \\
        --sample-steps 25 --guidance 7.5 --size 512 --device cuda --output cats.png
    python -m edit.sample --shift runs/single/spectral_shifts.safetensors --prompt "a sks star"

Every --prompt gets one row of --num-images images. Row i, column j starts from the noise of seed
`--seed` image j, so each column shares its starting noise across prompts: a grid shows what
the prompt changes and nothing else. The default model is the bundled toy model.

Exit status 2 with one line on stderr for a model or argument it cannot use.
"""

import argparse
import sys
import time

import torch

from edit.cli import check_output_dir, check_output_file, check_range
from edit.grid import save_grid
from edit.shifts import apply_shifts, parse_shift
from ldm.checkpoint import DEFAULT_MODEL, CheckpointError, load
from ldm.model import usable_device
from ldm.schedule import PREDICTION_TYPES
from ldm.text import TOKENIZER_FILES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shift(text: str) -> tuple[str, float]:
    """--shift FILE[:WEIGHT] -> (FILE, WEIGHT), or argparse's error for a weight that is not a
    finite number."""
    try:
        return parse_shift(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edit.sample", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                       help="SD 1.x / 2.x .safetensors, .ckpt or diffusers folder "
                            "(default: the bundled toy model)")
    model.add_argument("--tokenizer", metavar="DIR",
                       help=f"folder with {TOKENIZER_FILES} (default: tokenizer/ beside the "
                            "model, else an installed CLIP BPE vocabulary)")
    model.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                       help="what the network predicts (default: decided by rule, see "
                            "python -m ldm.info)")
    model.add_argument("--shift", action="append", default=[], metavar="FILE[:WEIGHT]", type=shift,
                       help="spectral_shifts.safetensors from train.single; repeat to combine: "
                            "ReLU(sigma + w1 delta1 + w2 delta2 + ...), merged into the weights "
                            "once (WEIGHT default 1; 0.5 + 0.5 interpolates)")
    model.add_argument("--svd-cache", metavar="DIR",
                       help="where the base model's SVD is cached (default ~/.cache/svdiff/svd)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES,
                       help="default: float16 on CUDA, float32 on the CPU")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompt", action="append", required=True,
                          help="text prompt; repeat for more rows")
    sampling.add_argument("--negative-prompt", default="",
                          help="the unconditional side of guidance (default: empty)")
    sampling.add_argument("--sample-steps", type=int, default=25, metavar="N",
                          help="DDIM steps (default 25)")
    sampling.add_argument("--guidance", type=float, metavar="X",
                          help="classifier-free guidance scale; 1 disables it (default: the "
                               "model's, 7.5 for SD, 4 for the bundled toy model and its copies)")
    sampling.add_argument("--eta", type=float, default=0.0,
                          help="DDIM noise: 0 deterministic, 1 DDPM-like (default 0)")
    sampling.add_argument("--seed", type=int, default=0, metavar="N",
                          help="seed of the starting noise of each column (default 0)")
    sampling.add_argument("--num-images", type=int, default=4, metavar="N",
                          help="images per prompt (default 4)")
    sampling.add_argument("--size", type=int,
                          help="image height and width in pixels (default: the model's, e.g. "
                               "512 for SD 1.x, 32 for the toy model)")

    output = parser.add_argument_group("output")
    output.add_argument("--output", default="grid.png", metavar="FILE",
                        help="PNG grid to write (default grid.png)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file (without it, the command refuses "
                             "to write over one)")
    output.add_argument("--plain", action="store_true", help="no captions under the images")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Bad values -> ValueError with a one-line message, before any model is loaded."""
    check_range("--sample-steps", args.sample_steps, 1, 999)   # DDIM over 1000 training steps
    check_range("--num-images", args.num_images, 1)
    check_range("--guidance", args.guidance, 0)
    check_range("--eta", args.eta, 0, 1)     # beyond 1 the DDIM step takes a negative square root
    check_range("--seed", args.seed, 0, 2**64 - 1)             # torch's range of seeds
    check_range("--size", args.size, 8)
    check_output_file(args.output, args.overwrite, "--output", suffix=".png")
    if args.svd_cache:  # a folder (made when missing), not a file; what it caches is never lost
        check_output_dir(args.svd_cache, (), overwrite=True, flag="--svd-cache")
    usable_device(args.device)


def run(args: argparse.Namespace) -> str:
    """Generate the grid described by parsed arguments; returns the path written."""
    check_args(args)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if torch.device(args.device).type == "cuda" else torch.float32)
    # With shifts, load in float32 first: the base fingerprint a shift file is checked against
    # is taken on float32 weights (as in training), and the merge is done at full precision.
    model = load(args.model, tokenizer_dir=args.tokenizer, prediction_type=args.prediction_type,
                 device=args.device, dtype=torch.float32 if args.shift else dtype)
    if args.shift:
        apply_shifts(model, args.shift, cache_dir=args.svd_cache, progress=not args.quiet)
        model.to(dtype=dtype)
    guidance = model.default_guidance if args.guidance is None else args.guidance
    images, labels = [], []
    for prompt in args.prompt:
        images.append(model.generate([prompt] * args.num_images, negative_prompt=args.negative_prompt,
                                     steps=args.sample_steps, guidance=guidance, eta=args.eta,
                                     seed=args.seed, height=args.size, width=args.size,
                                     progress=not args.quiet).cpu())
        labels += [prompt] * args.num_images
    save_grid(torch.cat(images), args.output, columns=args.num_images, labels=None if args.plain else labels)
    return args.output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        path = run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(args.prompt)} x {args.num_images} images, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
