"""Text to image with our Stable Diffusion stack: DDIM, classifier-free guidance, a PNG grid.

    python -m edit.sample --prompt "a red star on the left" --num-images 4 --output grid.png
    python -m edit.sample --model sd-v1-5.safetensors --prompt "a photo of a cat" \\
        --sample-steps 25 --guidance 7.5 --size 512 --device cuda --output cats.png
    python -m edit.sample --shift runs/single/spectral_shifts.safetensors --prompt "a sks star"
    python -m edit.sample --interpolate A.safetensors B.safetensors --alpha 0,0.5,1 --prompt "..."
    python -m edit.sample --mix A.safetensors B.safetensors --mix-layers coarse --prompt "..."
    python -m edit.sample --lora runs/lora/pytorch_lora_weights.safetensors --prompt "a sks star"

Every --prompt gets one row of --num-images images (with --interpolate, one row per alpha and
prompt). Row i, column j starts from the noise of seed
`--seed` image j, so each column shares its starting noise across prompts: a grid shows what
the prompt changes and nothing else. The default model is the bundled toy model.

Exit status 2 with one line on stderr for a model or argument it cannot use.
"""

import argparse
import sys
import time

import torch

from edit.cli import check_output_dir, check_output_file, check_range, numbers, usage_errors
from edit.grid import save_grid
import spectral
from edit.shifts import GROUPS, apply_deltas, combined_deltas, layer_chooser, parse_shift, read_deltas
from ldm.checkpoint import DEFAULT_MODEL, CheckpointError, load
from ldm.model import usable_device
from ldm.schedule import PREDICTION_TYPES
from ldm.text import TOKENIZER_FILES
from train import lora

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def file_and_weight(text: str) -> tuple[str, float]:
    """--shift / --lora FILE[:WEIGHT] -> (FILE, WEIGHT), or argparse's error for a weight that
    is not a finite number."""
    try:
        return parse_shift(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def alphas(text: str) -> tuple[float, ...]:
    """--alpha 0,0.5,1 -> (0.0, 0.5, 1.0), each a number in [0, 1]."""
    values = numbers(float)(text)
    for value in values:
        if not 0 <= value <= 1:   # nan fails this too
            raise argparse.ArgumentTypeError(f"each alpha must be in [0, 1], got {value}")
    return values


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
    model.add_argument("--shift", action="append", default=[], metavar="FILE[:WEIGHT]", type=file_and_weight,
                       help="spectral_shifts.safetensors from train.single; repeat to combine: "
                            "ReLU(sigma + w1 delta1 + w2 delta2 + ...), merged into the weights "
                            "once (WEIGHT default 1; 0.5 + 0.5 interpolates)")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", type=file_and_weight,
                       help="pytorch_lora_weights.safetensors from a trainer's --method lora; "
                            "repeat to add several: W + w1 B1 A1 + ..., merged into the weights "
                            "once, after any shifts (WEIGHT default 1)")
    model.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                       help="two shift files: one grid row per --alpha, ReLU(sigma + alpha "
                            "delta_A + (1 - alpha) delta_B) (default: none)")
    model.add_argument("--alpha", type=alphas, metavar="X,X,...",
                       help="with --interpolate: the weights of A, each in [0, 1] "
                            f"(default: {','.join(f'{a:g}' for a in ALPHAS)})")
    model.add_argument("--mix", nargs=2, metavar=("A", "B"),
                       help="two shift files: the layers --mix-layers names from A, every "
                            "other layer from B (style mixing; default: none)")
    model.add_argument("--mix-layers", metavar="GROUPS",
                       help=f"with --mix: comma-separated groups ({', '.join(GROUPS)}; see "
                            "edit/shifts.py for their layers) or globs over layer names, e.g. "
                            "'unet.output_blocks.*' (default: none; required with --mix)")
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
    if sum(map(bool, (args.shift, args.interpolate, args.mix))) > 1:
        raise ValueError("give one way of combining shifts: --shift, --interpolate or --mix")
    if args.alpha is not None and not args.interpolate:
        raise ValueError("--alpha weighs the two files of --interpolate: give --interpolate A B")
    if bool(args.mix) != bool(args.mix_layers):
        raise ValueError("--mix A B and --mix-layers GROUPS go together (the layers named come from A)")


def variants(model, args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(row label, combined deltas or None for the base model) per model to sample."""
    if args.shift:
        return [("", combined_deltas(model, args.shift))]
    if args.interpolate:
        first, second = read_deltas(model, args.interpolate)
        return [(f"alpha {alpha:g}", spectral.interpolate(first, second, alpha))
                for alpha in args.alpha or ALPHAS]
    if args.mix:
        chooser = layer_chooser(args.mix_layers, model.unet.config)
        first, second = read_deltas(model, args.mix)
        if not any(chooser(name) for name in {**first, **second}):
            raise ValueError(f"--mix-layers {args.mix_layers} names no layer of the files: all would come from B")
        return [(f"{args.mix_layers} from A", spectral.mix(first, second, chooser))]
    return [("", None)]


def run(args: argparse.Namespace) -> str:
    """Generate the grid described by parsed and checked arguments; returns the path written."""
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if torch.device(args.device).type == "cuda" else torch.float32)
    combining = bool(args.shift or args.interpolate or args.mix or args.lora)
    # With shifts or LoRA files, load in float32 first: the base fingerprint a file is checked
    # against is taken on float32 weights (as in training), and the merge is done at full precision.
    model = load(args.model, tokenizer_dir=args.tokenizer, prediction_type=args.prediction_type,
                 device=args.device, dtype=torch.float32 if combining else dtype)
    if args.mix_layers:   # a bad group is refused before any file is read
        layer_chooser(args.mix_layers, model.unet.config)
    rows = variants(model, args)
    fingerprint = model.base_fingerprint() if args.lora else None   # before anything is merged
    base = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model.unet, model.text_encoder)] \
        if len(rows) > 1 else None
    guidance = model.default_guidance if args.guidance is None else args.guidance
    images, labels = [], []
    for number, (label, deltas) in enumerate(rows):
        if number:        # back to the base weights, then the next combination merged once
            model.to(dtype=torch.float32)
            for module, state in zip((model.unet, model.text_encoder), base):
                module.load_state_dict(state)
        if deltas is not None:
            apply_deltas(model, deltas, cache_dir=args.svd_cache, progress=not args.quiet)
        for path, weight in args.lora:   # after the shifts: their SVD is of the base weights
            lora.merge_file(model, path, weight, fingerprint)
        model.to(dtype=dtype)
        for prompt in args.prompt:
            images.append(model.generate([prompt] * args.num_images, negative_prompt=args.negative_prompt,
                                         steps=args.sample_steps, guidance=guidance, eta=args.eta,
                                         seed=args.seed, height=args.size, width=args.size,
                                         progress=not args.quiet).cpu())
            labels += [f"{label}: {prompt}" if label else prompt] * args.num_images
    save_grid(torch.cat(images), args.output, columns=args.num_images, labels=None if args.plain else labels)
    return args.output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):   # a bad value: the usage line and one error line, exit 2
        check_args(args)
    start = time.perf_counter()
    try:
        path = run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
