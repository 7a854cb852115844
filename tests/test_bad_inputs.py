"""Bad inputs, every command: each case asserts the exit code, one message line (argparse's usage
block and "warning:" lines aside), no traceback, that every file on disk before the command
is byte-identical after it (nothing lost) and that no file was added.

A case is (command, argv, exit code, a piece of the message). argv may name the workspace's
files with {placeholders} (see `workspace`). Commands run in this process, through their
`main(argv)`, so an uncaught exception (a traceback) fails the case.
"""

import hashlib
import importlib
import json
import os
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import checkpoint
from tiny import tiny_model


@dataclass(frozen=True)
class Case:
    command: str            # a module with main(argv)
    argv: tuple[str, ...]   # {placeholders}: the workspace's paths
    exit: int
    message: str            # a piece of the last line on stderr
    label: str              # what the case tries, for pytest's test id

    def __str__(self):
        return self.label


def case(command, argv, exit, message, label=None):
    """argv as a shell would split it: quote arguments with spaces."""
    return Case(command, tuple(shlex.split(argv)), exit, message, label or f"{command} {argv}")


# --------------------------------------------------------------------------- the workspace

class Evil:
    """A pickle payload: unpickling it would run code."""
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD 1 model with its tokenizer, the subject's images, an earlier finished run,
    damaged checkpoints, and a few plain files: {name: path} for the cases' placeholders."""
    root = tmp_path_factory.mktemp("bad-inputs")
    paths = {"root": str(root)}
    model = tiny_model("sd1", tokenizer_dir=str(root / "tokenizer"))
    paths["model"] = str(root / "model.safetensors")
    checkpoint.save_single_file(paths["model"], model)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    paths["images"], paths["svd"] = str(images), str(root / "svd")
    paths["file"] = str(root / "notes.txt")
    (root / "notes.txt").write_text("a plain file\n")
    paths["empty"] = str(root / "empty")
    (root / "empty").mkdir()
    # an earlier run, finished; and runs whose checkpoint.pt is damaged or foreign
    from train import single
    paths["run"] = str(root / "run")
    assert single.main(train_argv(paths, "{run}", "--steps", "2")) == 0
    paths["lora_run"] = str(root / "lora-run")
    assert single.main(train_argv(paths, "{lora_run}", "--steps", "1", "--method", "lora")) == 0
    damaged = {"truncated": (root / "run" / "checkpoint.pt").read_bytes()[:1000],
               "random": rng.integers(0, 255, 5000, dtype=np.uint8).tobytes(),
               "payload": pickle.dumps({"x": Evil()}), "foreign": None}
    for name, content in damaged.items():
        folder = root / f"run-{name}"
        folder.mkdir()
        if content is None:
            torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "checkpoint.pt")
        else:
            (folder / "checkpoint.pt").write_bytes(content)
        paths[f"run_{name}"] = str(folder)
    # train.multi's concepts lists that are JSON but not a list of subjects
    paths["concepts_object"] = str(root / "concepts-object.json")
    (root / "concepts-object.json").write_text('{"instance_data_dir": "x"}')
    paths["concepts_no_prompt"] = str(root / "concepts-no-prompt.json")
    (root / "concepts-no-prompt.json").write_text(json.dumps([
        {"instance_data_dir": paths["images"], "instance_prompt": "a sks star", "class_prompt": "a star"},
        {"instance_data_dir": paths["images"], "class_prompt": "a star"}]))
    paths["broken_png"] = str(root / "broken.png")   # a PNG cut short: its decoder fails
    (root / "broken.png").write_bytes((images / "0.png").read_bytes()[:80])
    # ldm.info's cases: an empty file, a truncated .safetensors, a LoRA file
    from safetensors.torch import load_file, save_file
    paths.update({name: str(root / f) for name, f in (("empty_file", "empty.ckpt"),
                  ("truncated", "truncated.safetensors"), ("lora", "lora.safetensors"))})
    (root / "empty.ckpt").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes(Path(paths["model"]).read_bytes()[:100_000])
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              paths["lora"])
    paths["lora_unbound"] = str(root / "lora-unbound.safetensors")   # ours, but its metadata lost the base
    tensors = load_file(Path(paths["lora_run"]) / "pytorch_lora_weights.safetensors")
    save_file(tensors, paths["lora_unbound"], metadata={"format": '"svdiff-lora/1"'})
    return paths


def train_argv(paths, output, *extra):
    """train.single on the tiny model and the workspace's images: quick settings."""
    return ["--model", paths["model"], "--instance-dir", paths["images"],
            "--instance-prompt", "a sks star", "--class-prompt", "a star", "--prior-loss-weight", "0",
            "--batch-size", "1", "--sample-steps", "1", "--validation-every", "0",
            "--eval-samples", "0", "--svd-cache", paths["svd"], "--threads", "1",
            "--output-dir", output.format(**paths), *extra]


# --------------------------------------------------------------------------- the cases

TRAIN = "--model {model} --instance-dir {images} --instance-prompt 'a sks star' --prior-loss-weight 0 " \
        "--batch-size 1 --sample-steps 1 --eval-samples 0 --svd-cache {svd} --threads 1"


def train(extra, exit, message, output="{root}/new"):
    return case("train.single", f"{TRAIN} --output-dir {output} {extra}", exit, message,
                label=f"train.single {extra} [--output-dir {output}]")


TRAIN_SINGLE = [
    train("", 2, "holds an earlier run", output="{run}"),
    train("--resume --overwrite", 2, "give one of them", output="{run}"),
    train("--overwrite --model {file}", 2, "not a checkpoint", output="{run}"),  # the run stays
    train("--seed 100000000000000000000000", 2, "--seed must be at most"),
    train("--seed -1", 2, "--seed must not be negative"),
    train("--sample-steps 5000", 2, "--sample-steps must be at most 999"),
    train("--svd-cache {file}", 2, "--svd-cache {file}: is a file, not a directory"),
    train("--resume --steps 1", 2, "past --steps 1; give --steps 2 or more", output="{run}"),
    train("--lora-rank 4", 2, "--lora-rank is the rank of --method lora's adapters"),
    train("--method lora --lora-rank 0", 2, "--lora-rank must be at least 1"),
    train("--method lora --resume", 2, "holds other trained tensors than this run makes", output="{run}"),
    train("--resume", 2, "unreadable PyTorch file (RuntimeError", output="{run_truncated}"),
    train("--resume", 2, "not a PyTorch file", output="{run_random}"),
    train("--resume", 2, "it was not unpickled", output="{run_payload}"),
    train("--resume", 2, "not a checkpoint written by a trainer", output="{run_foreign}"),
    train("--resume", 2, "no checkpoint there", output="{empty}"),
    train("", 2, "--output-dir {file}: is a file", output="{file}"),
    train("--prior-loss-weight 1 --class-prompt 'a star' --class-dir {file}", 2, "is a file"),
    train("--threads -1", 2, "--threads must be at least 1, got -1"),
    train("--threads 0", 2, "--threads must be at least 1, got 0"),
    train("--resolution -32", 2, "--resolution must be at least 1"),
    train("--resolution 0", 2, "--resolution must be at least 1"),
    train("--resolution 18", 2, "--resolution 18: must be a multiple of 4"),
    train("--lr nan", 2, "--lr must be a finite number, got nan"),
    train("--lr inf", 2, "--lr must be a finite number, got inf"),
    train("--lr -0.001", 2, "--lr must not be negative"),
    train("--lr-1d nan", 2, "--lr-1d must be a finite number"),
    train("--guidance nan", 2, "--guidance must be a finite number"),
    train("--guidance -1", 2, "--guidance must not be negative"),
    train("--prior-loss-weight inf", 2, "--prior-loss-weight must be a finite number"),
    train("--steps 0", 2, "--steps must be at least 1, got 0"),
    train("--steps x", 2, "invalid int value: 'x'"),
    train("--batch-size 0", 2, "--batch-size must be at least 1"),
    train("--save-every 0", 2, "--save-every must be at least 1"),
    train("--sample-steps 0", 2, "--sample-steps must be at least 1"),
    train("--validation-every -1", 2, "--validation-every must not be negative"),
    train("--num-class-images 0", 2, "--num-class-images must be at least 1"),
    train("--mixed-precision fp8", 2, "invalid choice: 'fp8'"),
    train("--method dora", 2, "invalid choice: 'dora'"),
    train("--method full --train-text-encoder", 2, "--method full trains the UNet only"),
    train("--device gpu0", 2, "--device: unknown device 'gpu0'"),
    train("--tokenizer {empty}", 2, "no tokenizer.json or vocab.json + merges.txt"),
    train("--instance-dir {empty}", 2, "the directory is empty"),
    train("--instance-dir {root}/missing", 2, "no such directory"),
    train("--instance-dir {file}", 2, "not a directory"),
    train("--model {file}", 2, "not a checkpoint"),
    train("--model {root}/missing.safetensors", 2, "no such file"),
    train("--prior-loss-weight 1 --class-prompt 'a dog'", 2, "lacks the class word(s) dog"),
]
MULTI = "--model {model} --batch-size 1 --sample-steps 1 --eval-samples 0 --prior-loss-weight 0 " \
        "--svd-cache {svd} --threads 1 --output-dir {root}/multi"
SKS = "--subject {images} 'a sks star' 'a star'"
TRAIN_MULTI = [         # train.multi: (flags after quick settings, message)
    *(case("train.multi", f"{MULTI} {extra}", 2, message, label=f"train.multi {extra}")
      for extra, message in [
          (SKS, "1 subject given; train.multi needs two or more"),
          (f"{SKS} --subject {{images}} 'a sks star' 'a star'", "uses the token 'sks' of subject 1"),
          (f"{SKS} --subject {{images}} 'a star' 'a star'", "has no token of its own beside its class "
                                                           "prompt 'a star'"),
          (f"{SKS} --subject {{images}} 'a zwx dog' 'a star'", "lacks the class word(s) star"),
          (f"{SKS} --subject {{images}} '' 'a star'", "must not be empty"),
          (f"{SKS} --subject {{images}} 'a sks toy' 'a toy'", "uses the token 'sks' of subject 1"),
          (f"--subject {{images}} 'a sks dog' 'a dog' --subject {{images}} 'a dog toy' 'a toy'",
           "subject 2's token 'dog' is also a word of subject 1's prompt 'a sks dog'"),
          (f"{SKS} --subject {{images}} 'a zwx star{' very' * 40}' 'a star'",
           "is longer than the text encoder's 77 tokens and loses a subject's token"),
          (f"{SKS} --subject {{images}} 'a zwx star'", "expected 3 arguments"),
          (f"{SKS} --subject {{empty}} 'a zwx star' 'a star'", "the directory is empty"),
          (f"{SKS} --subject {{root}}/missing 'a zwx star' 'a star'", "no such directory"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --cut-mix-prob 1",
           "--cut-mix-prob 1: with every example cut-mixed the model never sees a subject alone"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --cut-mix-prob 1.5",
           "--cut-mix-prob must be at most 1"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --cut-mix-prob -0.1",
           "--cut-mix-prob must not be negative"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --cut-mix-prob nan",
           "--cut-mix-prob must be a finite number"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --unmix-weight -1",
           "--unmix-weight must not be negative"),
          (f"{SKS} --subject {{images}} 'a zwx star' 'a star' --cache-latents",
           "--cache-latents needs --cut-mix-prob 0"),
          (f"{SKS} --concepts-list {{file}}", "give the subjects with --subject or with --concepts-list"),
          ("--concepts-list {root}/missing.json", "--concepts-list {root}/missing.json: no such file"),
          ("--concepts-list {file}", "not a readable JSON file"),
          ("--concepts-list {model}", "not a readable JSON file"),
          ("--concepts-list {empty}", "not a readable JSON file"),
          ("--concepts-list {concepts_object}", "expected a JSON list of objects, one per subject"),
          ("--concepts-list {concepts_no_prompt}", "subject 2 lacks instance_prompt (text)"),
      ]),
]
EDIT_SAMPLE = [         # edit.sample: (flags after quick settings, message); the last --output counts
    *(case("edit.sample", "--model {model} --prompt 'a red star' --sample-steps 1 --num-images 1 "
           f"--quiet --svd-cache {{svd}} --output {{root}}/new.png {extra}", 2, message,
           label=f"edit.sample {extra}")
      for extra, message in [
          ("--output {images}/0.png", "--output: {images}/0.png exists; replace it with --overwrite"),
          ("--output {empty}", "--output {empty}: is a directory"),
          ("--output {root}/missing/grid.png", "--output: no such folder {root}/missing"),
          ("--output {file}", "--output must name a .png file"),
          ("--guidance nan", "--guidance must be a finite number, got nan"),
          ("--guidance inf", "--guidance must be a finite number, got inf"),
          ("--guidance -1", "--guidance must not be negative"),
          ("--eta nan", "--eta must be a finite number"),
          ("--eta -0.5", "--eta must not be negative"),
          ("--eta 2", "--eta must be at most 1, got 2.0"),
          ("--size 0", "--size must be at least 8, got 0"),
          ("--size -32", "--size must be at least 8"),
          ("--size 34", "image size must be a multiple of"),
          ("--num-images 0", "--num-images must be at least 1, got 0"),
          ("--num-images -1", "--num-images must be at least 1"),
          ("--sample-steps 0", "--sample-steps must be at least 1"),
          ("--sample-steps 1000", "--sample-steps must be at most 999"),
          ("--seed -1", "--seed must not be negative, got -1"),
          ("--seed 18446744073709551616", "--seed must be at most 18446744073709551615"),
          ("--seed x", "invalid int value: 'x'"),
          ("--shift {run}/spectral_shifts.safetensors:nan", "the weight must be a finite number, got nan"),
          ("--shift {run}/spectral_shifts.safetensors:inf", "the weight must be a finite number, got inf"),
          ("--shift {run}/spectral_shifts.safetensors:abc", "the weight after the last ':' is not a number"),
          ("--shift {root}/missing.safetensors", "no such shift file"),
          ("--shift {file}", "not a readable safetensors file"),
          ("--shift {run}/checkpoint.pt", "not a readable safetensors file"),
          ("--shift {model}", "metadata is not JSON"),    # a checkpoint, not a shift file
          ("--shift {run}/spectral_shifts.safetensors --svd-cache {file}", "--svd-cache {file}: is a file"),
          ("--interpolate {run}/spectral_shifts.safetensors {run}/spectral_shifts.safetensors --alpha 0,2",
           "each alpha must be in [0, 1], got 2.0"),
          ("--interpolate {run}/spectral_shifts.safetensors {root}/missing.safetensors", "no such shift file"),
          ("--interpolate {run}/spectral_shifts.safetensors", "expected 2 arguments"),
          ("--alpha 0.5", "--alpha weighs the two files of --interpolate"),
          ("--mix {run}/spectral_shifts.safetensors {run}/spectral_shifts.safetensors",
           "--mix A B and --mix-layers GROUPS go together"),
          ("--mix {run}/spectral_shifts.safetensors {run}/spectral_shifts.safetensors --mix-layers top",
           "--mix-layers: unknown group 'top'"),
          ("--mix {run}/spectral_shifts.safetensors {run}/spectral_shifts.safetensors --mix-layers coarse "
           "--shift {run}/spectral_shifts.safetensors", "give one way of combining shifts"),
          ("--shift {lora_run}/pytorch_lora_weights.safetensors",
           "a LoRA file, not a spectral shift file (edit.sample reads it with --lora)"),
          ("--lora {run}/spectral_shifts.safetensors", "a spectral shift file, not a LoRA: give it with --shift"),
          ("--lora {lora}", "not a LoRA file of this project"),          # kohya's names, no metadata
          ("--lora {lora_unbound}", "names no base model"),
          ("--lora {root}/missing.safetensors", "no such LoRA file"),
          ("--lora {file}", "not a readable safetensors file"),
          ("--lora {lora_run}/pytorch_lora_weights.safetensors:nan", "the weight must be a finite number"),
          ("--model {root}/missing.safetensors", "no such file"),
          ("--model {file}", "not a checkpoint"),
          ("--model {run}/checkpoint.pt", "no Stable Diffusion UNet keys"),
          ("--model {empty}", "not a diffusers folder"),
          ("--tokenizer {empty}", "no tokenizer.json or vocab.json + merges.txt"),
          ("--device gpu0", "--device: unknown device 'gpu0'"),
          ("--dtype float8", "invalid choice: 'float8'"),
      ]),
    # the run's shift fits {model}, not the default (bundled) model
    case("edit.sample", "--prompt 'a red star' --quiet --output {root}/new.png "
         "--shift {run}/spectral_shifts.safetensors", 2, "was trained on another base model"),
    case("edit.sample", "--prompt 'a red star' --quiet --output {root}/new.png "
         "--lora {lora_run}/pytorch_lora_weights.safetensors", 2, "was trained on another base model"),
]
COSINE = "--model {model} --image {images}/0.png --prompt 'a red star' --edit 'a blue star' " \
         "--steps 1 --batch-size 1 --sample-steps 1 --num-images 1 --eval-samples 0 " \
         "--validation-every 0 --svd-cache {svd} --threads 1 --output-dir {root}/cosine"
EDIT_COSINE = [         # edit.cosine: (flags after quick settings, message)
    *(case("edit.cosine", f"{COSINE} {extra}", 2, message, label=f"edit.cosine {extra}")
      for extra, message in [
          ("--image {root}/missing.png", "--image {root}/missing.png: no such file"),
          ("--image {file}", "--image {file}: not an image"),
          ("--image {empty}", "--image {empty}: is a directory, not an image file"),
          ("--image {broken_png}", "--image {broken_png}: "),
          ("--image {model}", "--image {model}: not an image"),
          ("--prompt ''", "--prompt: give the source prompt"),
          ("--prompt '   '", "--prompt: give the source prompt"),
          ("--edit ''", "--edit: an empty target prompt"),
          ("--edit 'a red star'", "--edit 'a red star' is the source prompt: an edit must change it"),
          ("--edit 'A  red star'", "--edit 'A  red star' is the source prompt"),
          ("--edit 'a blue  star'", "--edit 'a blue  star' is given twice"),
          ("--eta 1.5", "--eta must be at most 1, got 1.5"),
          ("--eta 0,-1", "--eta must not be negative, got -1.0"),
          ("--eta 0,x", "expected numbers separated by commas, got '0,x'"),
          ("--slerp nan", "--slerp must be a finite number"),
          ("--slerp 0,2", "--slerp must be at most 1, got 2.0"),
          ("--no-invert --slerp 0,0.5", "--slerp mixes the inversion with fresh noise: it needs --invert"),
          ("--num-images 0", "--num-images must be at least 1"),
          ("--steps 0", "--steps must be at least 1"),
          ("--fit stretch", "invalid choice: 'stretch'"),
          ("--shift {run}/spectral_shifts.safetensors --resume", "--shift skips the fine-tune"),
          ("--shift {run}/spectral_shifts.safetensors --method full", "--shift skips the fine-tune"),
          ("--shift {root}/missing.safetensors", "no such shift file"),
          ("--shift {file}", "not a readable safetensors file"),
          ("--output-dir {run}", "holds an earlier run's files"),
          ("--output-dir {file}", "--output-dir {file}: is a file"),
          ("--method full --train-text-encoder", "--method full trains the UNet only"),
      ]),
    case("edit.cosine", "--image {images}/0.png --prompt 'a red star' --edit 'a blue star' "
         "--output-dir {root}/cosine --shift {run}/spectral_shifts.safetensors", 2,
         "was trained on another base model", label="edit.cosine --shift FILE (of another base)"),
    case("edit.cosine", "--image {images}/0.png --edit 'a blue star'", 2,
         "--prompt: give the source prompt", label="edit.cosine --image without --prompt"),
    case("edit.cosine", "--prompt 'a red star' --output-dir {root}/cosine", 2,
         "--prompt describes your --image: give --image too", label="edit.cosine --prompt without --image"),
    case("edit.cosine", f"{COSINE} --output-dir {{file}} --shift {{run}}/spectral_shifts.safetensors", 2,
         "--output-dir {file}: is a file", label="edit.cosine --shift FILE --output-dir (a file)"),
]
LDM_INFO = [           # ldm.info
    case("ldm.info", "", 2, "the following arguments are required: path"),
    case("ldm.info", "{model} {model}", 2, "unrecognized arguments"),
    case("ldm.info", "{root}/missing.safetensors", 2, "{root}/missing.safetensors: no such file"),
    case("ldm.info", "{empty}", 2, "is a directory, not a diffusers folder"),
    case("ldm.info", "{root}", 2, "is a directory, not a diffusers folder"),
    case("ldm.info", "{file}", 2, "not a checkpoint (neither safetensors nor a PyTorch file)"),
    case("ldm.info", "{empty_file}", 2, "{empty_file}: empty file"),
    case("ldm.info", "{run_random}/checkpoint.pt", 2, "not a checkpoint"),
    case("ldm.info", "{run_truncated}/checkpoint.pt", 2, "unreadable PyTorch file"),
    case("ldm.info", "{run_payload}/checkpoint.pt", 2, "it was not unpickled"),
    case("ldm.info", "{run_foreign}/checkpoint.pt", 2, "no Stable Diffusion UNet keys"),
    case("ldm.info", "{run}/checkpoint.pt", 2, "no Stable Diffusion UNet keys"),
    case("ldm.info", "{run}/spectral_shifts.safetensors", 2, "no Stable Diffusion UNet keys: a "
         "spectral-shift file (trained deltas), not a base model; apply it with python -m edit.sample "
         "--shift FILE"),
    case("ldm.info", "{truncated}", 2, "truncated safetensors file"),
    case("ldm.info", "{lora}", 2, "a LoRA file"),
    case("ldm.info", "{model} --prediction-type bogus", 2, "invalid choice: 'bogus'"),
    case("ldm.info", "{model} --prediction-type", 2, "expected one argument"),
    case("ldm.info", "{model} --tokenizer {empty}", 2, "no tokenizer.json or vocab.json + merges.txt"),
    case("ldm.info", "{model} --tokenizer {file}", 2, "no tokenizer.json or vocab.json + merges.txt"),
    case("ldm.info", "{model} --tokenizer " + shlex.quote(os.path.dirname(checkpoint.DEFAULT_MODEL))
         + "/tokenizer", 2,
         "has 622 tokens but the text encoder's token table has", label="ldm.info {model} --tokenizer "
         "weights/tokenizer (the bundled model's)"),
]
SPECTRAL_COUNT = [     # spectral.count
    case("spectral.count", "--family bogus", 2, "invalid choice: 'bogus'"),
    case("spectral.count", "--family", 2, "expected one argument"),
    case("spectral.count", "sd15", 2, "unrecognized arguments: sd15"),
]
TOY_COMMANDS = [        # train.toy.pretrain, train.toy.reader, train.toy.world, train.toy.tokenizer
    # pretrain refused before its first step, never into weights/ or runs/ (the last flag counts)
    *(case("train.toy.pretrain", f"--output-dir {{root}}/toy --work-dir {{root}}/toy-work {extra}",
           2, message, label=f"train.toy.pretrain {extra}")
      for extra, message in [
          ("--work-dir {run}", "holds an earlier run's files (log.csv); continue that run with "
                               "--resume, or replace it with --overwrite"),
          ("--output-dir {root}", "holds an earlier run's files (tokenizer/vocab.json, tokenizer/"
                                  "merges.txt); replace them with --overwrite, or give another --output-dir"),
          ("--output-dir {file}", "--output-dir {file}: is a file, not a directory"),
          ("--work-dir {file}", "--work-dir {file}: is a file, not a directory"),
          ("--resume --work-dir {empty}", "holds no state.pt to continue"),
          ("--steps 0", "--steps must be at least 1, got 0"),
          ("--lr nan", "--lr must be a finite number, got nan"),
          ("--vae-lr -1", "--vae-lr must not be negative"),
          ("--kl-weight inf", "--kl-weight must be a finite number"),
          ("--warmup 0", "--warmup must be at least 1"),
          ("--ema 1", "--ema must be below 1, got 1.0"),
          ("--ema -0.5", "--ema must not be negative"),
          ("--p-uncond 1.5", "--p-uncond must be at most 1, got 1.5"),
          ("--guidance nan", "--guidance must be a finite number"),
          ("--sample-steps 1000", "--sample-steps must be at most 999"),
          ("--seed -1", "--seed must not be negative"),
          ("--num-images 1", "--num-images must be at least 2"),
          ("--threads -1", "--threads must not be negative"),
          ("--channel-mult 2,0", "--channel-mult must be at least 1, got 0"),
          ("--vae-ch 16", "the VAE / UNet settings do not fit together"),
          ("--text-heads 3", "--text-width 64 must be a multiple of --text-heads 3"),
      ]),
    case("train.toy.reader", "--eval-samples 0", 2, "--eval-samples must be at least 1, got 0"),
    case("train.toy.reader", "--sample-steps 0", 2, "--sample-steps must be at least 1"),
    case("train.toy.reader", "--guidance nan", 2, "--guidance must be a finite number"),
    case("train.toy.reader", "--seed -1", 2, "--seed must not be negative"),
    case("train.toy.reader", "--output-dir {file}", 2, "--output-dir {file}: is a file"),
    case("train.toy.reader", "--train-reader", 2, "evaluator.safetensors exists; replace it with --overwrite"),
    case("train.toy.reader", "--model {root}/missing.safetensors", 2, "no such file"),
    case("train.toy.reader", "--model {file}", 2, "not a checkpoint"),
    case("train.toy.reader", "--model {run}/spectral_shifts.safetensors", 2, "no Stable Diffusion UNet keys"),
    case("train.toy.reader", "--model {model} --tokenizer {empty}", 2, "no tokenizer.json"),
    case("train.toy.world", "--output {images}/0.png", 2, "exists; replace it with --overwrite"),
    case("train.toy.world", "--output {empty}", 2, "--output {empty}: is a directory"),
    case("train.toy.world", "--output {root}/missing/world.png", 2, "no such folder"),
    case("train.toy.world", "--output {file}", 2, "--output must name a .png file"),
    case("train.toy.world", "--output {root}/world.png --seed -1", 2, "--seed must not be negative"),
    case("train.toy.tokenizer", "--output-dir {root}/tokenizer", 2, "(vocab.json, merges.txt); "
         "replace them with --overwrite"),
    case("train.toy.tokenizer", "--output-dir {file}", 2, "--output-dir {file}: is a file"),
    case("train.toy.tokenizer", "--output-dir {file}/sub", 2, "{file} is a file, not a directory"),
]
CASES = TRAIN_SINGLE + TRAIN_MULTI + EDIT_SAMPLE + EDIT_COSINE + LDM_INFO + SPECTRAL_COUNT + TOY_COMMANDS


# --------------------------------------------------------------------------- running a case

def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def message_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage block and without warnings."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        in_usage = line.startswith("usage:") or (in_usage and line.startswith(" "))
        if line.strip() and not in_usage and not line.startswith("warning:"):
            lines.append(line)
    return lines


@pytest.mark.parametrize("bad", CASES, ids=str)
def test_bad_input(bad, workspace, capsys):
    root = Path(workspace["root"])
    before = snapshot(root)
    argv = [a.format(**workspace) for a in bad.argv]
    try:
        code = importlib.import_module(bad.command).main(argv)
    except SystemExit as error:
        code = error.code
    stderr = capsys.readouterr().err
    lines = message_lines(stderr)
    assert "Traceback" not in stderr
    assert code == bad.exit, stderr
    assert len(lines) == 1, stderr
    assert bad.message.format(**workspace) in lines[0], lines[0]
    after = snapshot(root)
    assert {path: after.get(path) for path in before} == before, "a file on disk was changed"
    assert after.keys() == before.keys(), f"files written: {sorted(after.keys() - before.keys())[:5]}"
