"""Run configurations: one frozen dataclass per command, whose fields are its flags.

    @dataclass(frozen=True)
    class SingleConfig(RunConfig):
        instance_dir: str | None = option(None, "the subject's images")

    parser = build_parser(SingleConfig, prog="python -m train.single", description="...")
    config = parse(parser, SingleConfig, argv)

`option` attaches the help text and the valid range to a field; `build_parser` turns the fields
into argparse flags (`batch_size` -> `--batch-size`; bool -> a switch, `bool | None` ->
--x / --no-x, a tuple -> a repeatable flag); `parse` checks every range (exit 2 with argparse's
usage line) and returns the config. A trainer then resolves the defaults that depend on the
model once, with `dataclasses.replace`, into a new complete value that no later code changes:
that value is what checkpoints and shift files record.

`RunConfig` holds the flags every trainer shares: the model, what is trained, the optimizer,
the schedule of saves and sample grids, where things go.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field

import torch

from edit.cli import check_output_dir, check_range, numbers, usage_errors
from ldm.checkpoint import DEFAULT_MODEL
from ldm.model import usable_device
from ldm.schedule import PREDICTION_TYPES
from ldm.text import TOKENIZER_FILES


def option(default, help: str, *, minimum: float | None = None, maximum: float | None = None,
           below: float | None = None, choices: tuple | None = None, metavar: str | None = None,
           same_on_resume: bool = True):
    """A config field: its default, its --help text, its valid range (minimum <= value <=
    maximum, value < below), its choices, the name of its value in --help (default: N for
    integers, X for numbers, TEXT for strings). same_on_resume=False marks settings that do not
    change the trained values (where to write, how often to sample), which may differ when a
    run is resumed."""
    return field(default=default, metadata={"help": help, "range": (minimum, maximum, below),
                                            "choices": choices, "metavar": metavar,
                                            "same_on_resume": same_on_resume})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    """The help text with the default appended, unless the text already says it (defaults
    that depend on the model are explained in words)."""
    text = f.metadata["help"]
    if "default" in text or f.default is False:
        return text.replace("%", "%%")
    default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    return f"{text} (default: {default})".replace("%", "%%")


def build_parser(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    """argparse flags from the dataclass fields, in field order."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind, meta = hints[f.name], f.metadata
        kwargs = {"help": _help(f), "default": f.default}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif kind == bool | None:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (tuple[int, ...], tuple[float, ...]):  # lists: --channel-mult 2,2,2
            number = typing.get_args(kind)[0]
            kwargs.update(type=numbers(number), default=",".join(map(str, f.default)),
                          metavar="N,N,..." if number is int else "X,X,...")
        elif any(typing.get_origin(t) is tuple for t in (kind, *typing.get_args(kind))):
            kwargs.update(action="append", metavar=meta["metavar"] or "TEXT")
            if isinstance(meta["metavar"], tuple):  # several values per use: --subject DIR P C
                kwargs["nargs"] = len(meta["metavar"])
        else:
            value_type = next(t for t in (*typing.get_args(kind), kind) if t is not type(None))
            kwargs["type"] = value_type
            kwargs["metavar"] = meta["metavar"] or {int: "N", float: "X", str: "TEXT"}[value_type]
        if meta["choices"]:
            kwargs.update(choices=meta["choices"], metavar=None)
        parser.add_argument(flag(f.name), **{k: v for k, v in kwargs.items() if v is not None})
    return parser


def check(parser: argparse.ArgumentParser, config) -> None:
    """Every number finite and in its range; a run's device usable. argparse's error (exit 2)
    otherwise, before anything is loaded."""
    with usage_errors(parser):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            for number in value if isinstance(value, tuple) else (value,):  # lists: each value
                if isinstance(number, (int, float)):
                    check_range(flag(f.name), number, *f.metadata["range"])
        if isinstance(config, RunConfig):
            if config.lora_rank is not None and config.method != "lora":
                raise ValueError("--lora-rank is the rank of --method lora's adapters: give "
                                 "--method lora, or leave --lora-rank out")
            usable_device(config.device)
            if config.svd_cache:
                check_output_dir(config.svd_cache, (), True, flag="--svd-cache")


def to_config(parser: argparse.ArgumentParser, config_class, values: dict):
    """The config holding parsed `values` (repeated flags' lists as tuples), range-checked."""
    config = config_class(**{k: as_tuples(v) for k, v in values.items()})
    check(parser, config)
    return config


def as_tuples(value):
    """Lists, nested ones too, as tuples (a frozen config's values stay unchangeable)."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def parse(parser: argparse.ArgumentParser, config_class, argv):
    """The config for a command line (argv None: sys.argv)."""
    return to_config(parser, config_class, vars(parser.parse_args(argv)))


def changed_on_resume(config, saved: dict) -> list[str]:
    """The fields whose value differs from a checkpoint's saved config and would change the
    trained values (those marked same_on_resume)."""
    now = as_dict(config)
    return [f.name for f in dataclasses.fields(config)
            if f.metadata["same_on_resume"] and saved.get(f.name) != now[f.name]]


def as_dict(config) -> dict:
    """The config as JSON-ready values (tuples, nested ones too, as lists: as JSON reads them
    back)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass(frozen=True)
class RunConfig:
    """What every trainer takes. None means: decided from the model when the run starts."""
    # the base model
    model: str = option(DEFAULT_MODEL, "base model: a single .safetensors / .ckpt file or a "
                        "diffusers folder (default: the bundled tiny model)", metavar="PATH",
                        same_on_resume=False)   # the base fingerprint decides, not the path
    tokenizer: str | None = option(None, f"folder with {TOKENIZER_FILES} (default: tokenizer/ "
                                   "beside the model, else an installed CLIP BPE vocabulary)", metavar="DIR")
    prediction_type: str | None = option(None, "what the network predicts (default: decided by "
                                         "rule, see python -m ldm.info)", choices=PREDICTION_TYPES)
    # what is trained, and how
    method: str = option("spectral", "what is trained: spectral shifts (the method); or, as "
                         "baselines for comparison, every UNet weight (full; writes no result "
                         "file besides checkpoint.pt) or LoRA adapters on the attention "
                         "projections (lora; writes pytorch_lora_weights.safetensors)",
                         choices=("spectral", "full", "lora"))
    lora_rank: int | None = option(None, "with --method lora: the adapters' rank r (alpha = r); "
                                   "default: 4", minimum=1)
    train_text_encoder: bool | None = option(None, "train the text encoder too (its spectral "
                                             "shifts or LoRA adapters); default: off, on for "
                                             "the bundled tiny model")
    lr: float | None = option(None, "learning rate of the singular-value shifts; default: 1e-3 "
                              "(the paper's), 1e-2 on the bundled tiny model. With --method full, "
                              "of the weights: 5e-6, 5e-4 on the bundled model; with --method "
                              "lora, of the adapters: 1e-4, 5e-3 on the bundled model", minimum=0)
    lr_1d: float = option(1e-6, "learning rate of the norm-scale shifts (spectral shifts only)", minimum=0)
    steps: int = option(500, "optimizer steps (a resumed run may be given more)", minimum=1,
                        same_on_resume=False)
    batch_size: int | None = option(None, "images per step (with prior preservation, as many "
                                    "prior images again); default: 4, 8 for the bundled tiny "
                                    "model", minimum=1)
    resolution: int | None = option(None, "training image size; default: the model's (32 for the "
                                    "bundled model, 512 for SD 1.x)", minimum=1)
    seed: int = option(0, "seeds data order, augmentation, t, noise and samples", minimum=0,
                       maximum=2**40)  # step_generator's seeds must stay below 2**64
    mixed_precision: str = option("no", "autocast the forward; the trained values and the "
                                  "optimizer stay fp32", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward: less "
                                          "memory, ~30% more time")
    cache_latents: bool = option(False, "encode each image once (centre crop, and its mirror "
                                 "where the trainer mirrors) instead of every step; turns off "
                                 "the random crop")
    # samples and saves
    validation_prompt: tuple[str, ...] | None = option(
        None, "prompt for the sample grids, repeatable; default: the run's own prompts",
        same_on_resume=False)
    validation_every: int = option(100, "sample grid every N steps (also before and after "
                                   "training); 0: before and after only", minimum=0,
                                   same_on_resume=False)
    sample_steps: int = option(25, "DDIM steps for class images, grids, evaluation (and "
                               "edit.cosine's inversion and edits)", minimum=1,
                               maximum=999,
                               same_on_resume=False)
    guidance: float | None = option(None, "classifier-free guidance scale for sampling; default: "
                                    "7.5, 4 on the bundled tiny model (what it was tuned for)",
                                    minimum=0, same_on_resume=False)
    eval_samples: int = option(50, "with the bundled example: samples per prompt (per edit and "
                               "setting in edit.cosine) for the final measurement by the toy "
                               "world's reader; 0 skips it", minimum=0,
                               same_on_resume=False)
    save_every: int = option(50, "write the result and checkpoint every N steps", minimum=1,
                             same_on_resume=False)
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint.pt, with the same "
                          "settings; the result equals an uninterrupted run", same_on_resume=False)
    overwrite: bool = option(False, "replace the results of an earlier run in --output-dir "
                             "(without it, a run refuses to write over them)", same_on_resume=False)
    output_dir: str = option("runs/single", "where everything is written", metavar="DIR", same_on_resume=False)
    svd_cache: str | None = option(None, "directory caching the SVD of the base weights (computed "
                                   "once per base model; spectral shifts only); default: "
                                   "~/.cache/svdiff/svd",
                                   metavar="DIR", same_on_resume=False)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ...",
                         metavar="DEVICE")
    # CPU reductions depend on the thread count: another one changes the last bits
    threads: int | None = option(None, "CPU threads; default: torch's, 1 for the bundled tiny "
                                 "model", minimum=1)


@dataclass(frozen=True)
class SubjectConfig(RunConfig):
    """What the subject trainers (train.single, train.multi) add: prior preservation."""
    num_class_images: int = option(32, "prior images per class prompt (DreamBooth: 100-200 on SD)",
                                   minimum=1)
    prior_loss_weight: float = option(1.0, "lambda; 0 disables prior preservation", minimum=0)
