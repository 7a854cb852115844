"""What is in a Stable Diffusion checkpoint, without loading its weights.

    python -m ldm.info PATH [--tokenizer DIR] [--prediction-type epsilon|v_prediction]

PATH: a single file (.safetensors, .ckpt) or a diffusers folder. Prints the family, the program
that made it (when the file says), the prediction type and image size with the rule that
decided each, parameter counts per component, dtype and size on disk, the configs, and where
the tokenizer comes from (it must fit the text encoder's token table).

Safetensors files are read header only (a 4 GB file in well under a second) and the models are
built on the meta device; .ckpt pickles are memory-mapped (torch.load(weights_only=True)).
Anything it cannot or will not read exits with status 2 and one line on stderr.
"""

import argparse
import os
import sys
from collections import Counter

from ldm.checkpoint import CheckpointError, file_format, is_diffusers_folder, load
from ldm.family import FAMILIES, SUPPORTED
from ldm.schedule import PREDICTION_TYPES
from ldm.text import TOKENIZER_FILES


def _size_on_disk(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _millions(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def describe(path: str, tokenizer_dir: str | None = None,
             prediction_type: str | None = None) -> list[tuple[str, str]]:
    """(label, text) rows describing the checkpoint at `path`; raises CheckpointError."""
    model = load(path, tokenizer_dir=tokenizer_dir, prediction_type=prediction_type,
                 device="meta", dtype=None)
    why = model.decided_by
    kind = "diffusers folder" if is_diffusers_folder(path) else file_format(path)
    dtypes = Counter(str(p.dtype).removeprefix("torch.")
                     for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
    unet, vae = model.unet.config, model.vae.config
    text = model.text_encoder.transformer.config
    total = sum(sum(p.numel() for p in m.parameters())
                for m in (model.unet, model.vae, model.text_encoder))
    rows = [
        ("file", f"{path} ({kind}, {_size_on_disk(path) / 2 ** 20:.1f} MiB)"),
        ("family", f"{FAMILIES[model.family].display_name}   <- {why['family']}"),
        ("made by", f"{model.made_by}   <- {why['made_by']}" if model.made_by else why["made_by"]),
        ("prediction", f"{model.prediction_type}   <- {why['prediction_type']}"),
        ("image size", f"{model.image_size}   <- {why['image_size']}"),
        ("dtype", ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common())),
        ("parameters", f"UNet {_millions(model.unet)} | VAE {_millions(model.vae)} | "
                       f"text {_millions(model.text_encoder)} | total {total / 1e6:.2f} M"),
        ("unet", f"model_channels {unet.model_channels}, channel_mult {unet.channel_mult}, "
                 f"num_res_blocks {unet.num_res_blocks}, attention_resolutions "
                 f"{unet.attention_resolutions}, {unet.heads_text()}, "
                 f"context_dim {unet.context_dim}, "
                 f"{'linear' if unet.use_linear_in_transformer else 'conv'} proj, "
                 f"depth {unet.transformer_depth}   <- {why['unet_config']}"),
        ("vae", f"ch {vae.ch}, ch_mult {vae.ch_mult}, num_res_blocks {vae.num_res_blocks}, "
                f"z_channels {vae.z_channels}, scale_factor {vae.scale_factor}   <- "
                f"{why['vae_config']}"),
        ("text", f"CLIP {text.hidden_size} wide, {text.num_hidden_layers} layers, "
                 f"{text.num_attention_heads} heads, {text.hidden_act}, vocab {text.vocab_size}"
                 f"   <- {why['text_config']}"),
        ("pad token", f"id {model.text_encoder.pad_token_id}   <- {why['pad_token']}"),
        ("tokenizer", why["tokenizer"]),
    ]
    rows += [(key, why[key]) for key in ("weights", "ignored") if key in why]
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of python -m ldm.info; every argument's help says its default."""
    parser = argparse.ArgumentParser(
        prog="python -m ldm.info", description=__doc__.split("\n\n")[0],
        epilog=f"Supported: {SUPPORTED} text-to-image checkpoints (CompVis/A1111/ComfyUI single "
               "files and diffusers folders). Exit status 2 on a file it refuses.")
    parser.add_argument("path", help="a .safetensors / .ckpt file or a diffusers folder "
                                     "(required, no default)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help=f"folder with {TOKENIZER_FILES} (default: tokenizer/ beside "
                             "the weights, else an installed CLIP BPE vocabulary)")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                        help="override what the network predicts (default: by rule: file "
                             "metadata, a CompVis .yaml beside the file, a .ckpt's training step, "
                             "else the family's convention; the output names the rule)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = describe(args.path, args.tokenizer, args.prediction_type)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
