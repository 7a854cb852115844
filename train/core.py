"""What every trainer does around its loop: load the base, keep the books, save, resume, stop.

A trainer (train/single.py) owns its batch, its loss and its loop; the rest is here:

    model, fingerprint = load_model(config)              # --model, --tokenizer, --device, ...
    config = resolve(config, model, fingerprint)         # the trainer's: a new, complete value
    trainable = make_trainable(model, config)        # train/trainable.py
    with Run(config, model, trainable, fingerprint, metadata, ...) as run:
        for step in run.steps():                         # resumes; progress bar
            loss = ...                                   # the trainer's batch and loss
            run.step(step, loss, instance_loss=...)      # backward, clip, AdamW; log, save, grids
        run.finish()                                     # loss.png, last grid, merge

Files in --output-dir: the method's result (spectral_shifts.safetensors), checkpoint.pt (all
--resume needs: trained tensors, optimizer, GradScaler, RNG, the config), log.csv, loss.png,
samples/step-*.png. Both result files are written atomically every --save-every steps, so a
kill at any moment loses at most the steps since the last save, and the same command plus
--resume then ends with exactly the values of an uninterrupted run: every step draws all its
randomness from `step_generator(seed, step)` (train/data.py).

Exit codes (`main`): 0 done; 2 bad input, one line saying which; 1 the loss became NaN/inf
(the last good save is kept and named); 130 interrupted by Ctrl-C (the last save is named).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import spectral
from edit import cli
from edit.grid import save_grid, to_pil
from ldm import checkpoint
from ldm.checkpoint import CheckpointError
from ldm.files import describe_mismatch, load_pickle
from ldm.rules import TOY_PRETRAIN
from spectral.io import write_atomically
from train import config as run_config
from train.data import DataError, warn
from train.log import TrainingLog, plot_losses
from train.trainable import METHODS

# Defaults that depend on what the model is (StableDiffusion.made_by, not where its file is).
# SD: the paper's lr (DreamBooth's for a full fine-tune), torch's threads. The bundled tiny model
# must learn a subject in a few hundred CPU steps: on its weights, train.single's 500 steps at
# lr 1e-2, batch 8, with the text encoder's shifts trained too give 82% subject fidelity and 0%
# prior drift, colors counted (UNet only, batch 4: 70% / 34%; a full fine-tune at 5e-4, batch 4:
# 60% / 2%; README, bench/single_table.py).
# Earlier weights: lr 5e-3 gave 62% / 22%, lr 1e-3 only 23% fidelity after 200 steps.
# LoRA (rank 4, UNet + text): 1e-4 on SD, as diffusers' DreamBooth-LoRA examples; on the
# bundled model a sweep of 500-step runs gave 4 / 8 / 6 / 14 / 6 / 4 / 0% fidelity at lr 1e-3 /
# 2e-3 / 3e-3 / 5e-3 / 7e-3 / 1e-2 / 3e-2 (from 1e-2 on the samples fall apart), so 5e-3. Its
# layers are too small to split over threads (2 threads ran 7x slower than 1 on a busy 2-core
# machine).
# Guidance: the model's own (StableDiffusion.default_guidance).
MODEL_DEFAULTS = {None: {"lr": 1e-3, "full_lr": 5e-6, "lora_lr": 1e-4, "threads": None,
                         "batch_size": 4, "train_text_encoder": False},
                  TOY_PRETRAIN: {"lr": 1e-2, "full_lr": 5e-4, "lora_lr": 5e-3, "threads": 1,
                                 "batch_size": 8, "train_text_encoder": True}}


class NonFiniteLoss(Exception):
    """The loss overflowed: training stops, the files of the last save stay as they are."""


class Interrupted(Exception):
    """Ctrl-C during training; the message names the last save."""


# ----------------------------------------------------------------------------- the base model

def is_toy_model(model) -> bool:
    """The bundled tiny model, or a copy of it, wherever its file is."""
    return model.made_by == TOY_PRETRAIN


def model_defaults(config, model) -> dict:
    """The defaults of the flags left at None that depend on the model (MODEL_DEFAULTS)."""
    defaults = dict(MODEL_DEFAULTS[TOY_PRETRAIN if is_toy_model(model) else None],
                    guidance=model.default_guidance)
    full_lr, lora_lr = defaults.pop("full_lr"), defaults.pop("lora_lr")
    if config.method == "full":
        defaults.update(lr=full_lr, train_text_encoder=False)
    if config.method == "lora":
        defaults.update(lr=lora_lr, lora_rank=4)
    return defaults


def load_model(config):
    """(the base model, its fingerprint: what shift files and checkpoints are bound to), with
    torch's threads set (--threads, else the model's default)."""
    model = checkpoint.load(config.model, tokenizer_dir=config.tokenizer,
                            prediction_type=config.prediction_type, device=config.device)
    threads = config.threads or model_defaults(config, model)["threads"]
    if threads:
        torch.set_num_threads(threads)
    return model, model.base_fingerprint()


def check_resolution(model, resolution: int) -> None:
    if resolution % model.size_multiple:
        raise DataError(f"--resolution {resolution}: must be a multiple of {model.size_multiple} "
                        "for this model")


def vae_moments(model):
    """pixels (B, 3, R, R) in [-1, 1] -> the mean and std of q(z | x), (B, 4, h, w) each."""
    def encode(pixels):
        with torch.no_grad():
            posterior = model.vae.encode(pixels.to(model.device))
        return posterior.mean, posterior.std
    return encode


def autocast(config, device: torch.device):
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    return torch.autocast(device.type, enabled=dtype is not None, dtype=dtype)


def generate(model, prompts: list[str], seed: int, config) -> list:
    """PIL images from the model as it is now (with whatever is attached), one per prompt."""
    with autocast(config, model.device):
        images = model.generate(prompts, steps=config.sample_steps, guidance=config.guidance,
                                seed=seed, height=config.resolution, width=config.resolution,
                                progress=False)
    return to_pil(images)


# ----------------------------------------------------------------------------- the output folder

RESULT_FILES = tuple(kind.result_name for kind in METHODS.values() if kind.result_name)


def check_output_dir(config) -> list[Path]:
    """Never replace a result silently: a folder holding an earlier run (of any --method) is
    continued with --resume or replaced with --overwrite, else refused; --resume without a
    checkpoint is refused here, before the slow parts. Returns what --overwrite replaces, which
    `Run` removes once everything else has been checked and loaded."""
    if config.resume and config.overwrite:
        raise DataError("--resume continues the run in --output-dir and --overwrite replaces it: "
                        "give one of them")
    results = (*RESULT_FILES, "checkpoint.pt", "log.csv")
    try:
        earlier = cli.check_output_dir(config.output_dir, results, config.overwrite or config.resume,
                                       way_out="continue it with --resume, or replace it with --overwrite")
    except ValueError as error:
        raise DataError(str(error)) from None
    out = Path(config.output_dir)
    if config.resume:
        if not (out / "checkpoint.pt").exists():
            raise DataError(f"--resume: {out / 'checkpoint.pt'}: no checkpoint there")
        return []
    return earlier + [out / "loss.png", *out.glob("samples/step-*.png")]


# ----------------------------------------------------------------------------- checkpoints

def trained_parameters(model) -> dict[str, torch.Tensor]:
    """{"unet.<name>" / "text.<name>": parameter} of whatever is being trained."""
    return {f"{prefix}.{name}": p for prefix, module in (("unet", model.unet), ("text", model.text_encoder))
            for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(path, step: int, model, optimizer, scaler, fingerprint: str, config) -> None:
    """Everything a resumed run needs to continue exactly: the trained tensors, the optimizer's
    moments, the GradScaler, the global RNG states, the base fingerprint and the config."""
    state = {"step": step,
             "parameters": {k: p.detach().cpu().clone() for k, p in trained_parameters(model).items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "base_fingerprint": fingerprint, "args": json.dumps(run_config.as_dict(config))}
    write_atomically(lambda temporary: torch.save(state, temporary), path)


CHECKPOINT_KEYS = {"step", "parameters", "optimizer", "scaler", "rng", "cuda_rng", "base_fingerprint", "args"}


def read_checkpoint(path: Path, what: str) -> dict:
    """A save_checkpoint file's contents. A file that would need code to unpickle is refused,
    never run (ldm.files.load_pickle); so are damaged and foreign files (CheckpointError)."""
    state = load_pickle(path)
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise DataError(f"{what}: not a checkpoint written by a trainer of this project")
    return state


def load_checkpoint(path: Path, model, optimizer, scaler, fingerprint: str, config) -> int:
    """Restore a save_checkpoint file in place; returns its step. A file from another base
    model or another kind of run: DataError, one line."""
    what = f"--resume: {path}"
    state = read_checkpoint(path, what)   # that it exists, check_output_dir made sure
    if state["step"] > config.steps:
        raise DataError(f"{what} is at step {state['step']}, past --steps {config.steps}; give "
                        f"--steps {state['step']} or more")
    if state["base_fingerprint"] != fingerprint:
        raise DataError(f"{what} was trained on another base model (fingerprint "
                        f"{state['base_fingerprint'][:12]}, this one {fingerprint[:12]})")
    parameters = trained_parameters(model)
    problem = describe_mismatch({k: v.shape for k, v in state["parameters"].items()},
                                {k: p.shape for k, p in parameters.items()})
    if problem:
        raise DataError(f"{what} holds other trained tensors than this run makes (another "
                        f"--train-text-encoder / --method / --lora-rank setting?): {problem}")
    with torch.no_grad():
        for name, value in state["parameters"].items():
            parameters[name].copy_(value)
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, lr in zip(optimizer.param_groups, learning_rates):  # this run's --lr, --lr-1d
        group["lr"] = lr
    if state["scaler"]:   # empty when saved without fp16: an fp16 run's scaler then starts afresh
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    changed = run_config.changed_on_resume(config, json.loads(state["args"]))
    if changed:
        flags = ", ".join(map(run_config.flag, changed))
        warn(f"--resume: {flags} differ from the checkpoint's; the result will not equal an "
             "uninterrupted run")
    return state["step"]


# ----------------------------------------------------------------------------- the run

class Run:
    """The books of one training run: optimizer and GradScaler, resume, log.csv, saves, grids,
    the progress bar. A context manager, so that Ctrl-C becomes `Interrupted` naming the last
    save. `metadata` goes into the result file beside the base fingerprint, step and config."""

    def __init__(self, config, model, trainable, fingerprint: str, metadata: dict,
                 log_fields: tuple[str, ...], validation_prompts: list[str]):
        self.config, self.model, self.trainable = config, model, trainable
        self.fingerprint, self.metadata = fingerprint, metadata
        self.validation_prompts = list(config.validation_prompt or validation_prompts)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for path in check_output_dir(config):  # --overwrite: only now
            path.unlink(missing_ok=True)
        model.unet.gradient_checkpointing = config.gradient_checkpointing
        model.unet.train()
        groups = trainable.param_groups(config.lr, config.lr_1d)
        self.parameters = [p for group in groups for p in group["params"]]
        # weight decay pulls shifts toward 0, the base model (a full fine-tune's weights toward 0)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=config.mixed_precision == "fp16")
        self.start = (load_checkpoint(self.out / "checkpoint.pt", model, self.optimizer, self.scaler,
                                      fingerprint, config) if config.resume else 0)
        self.saved = self.start  # the step of the files on disk
        self.step_number = self.start
        self.log = TrainingLog(self.out / "log.csv", ("step", *log_fields, "lr", "seconds"),
                               resume_step=self.start if config.resume else None)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is KeyboardInterrupt:
            raise Interrupted(f"interrupted at step {self.step_number}; {self.last_save()}; "
                              "continue with the same command and --resume") from None

    def last_save(self) -> str:
        if not self.saved:
            return "nothing had been saved yet"
        return f"the last save is step {self.saved} ({self.out / 'checkpoint.pt'})"

    def steps(self):
        """The steps still to do, 1-based, with a progress bar; step 0's grid on a fresh run."""
        if self.start == 0:
            print(f"samples before training: {self.sample_grid(0)}")
        self.bar = tqdm(range(self.start + 1, self.config.steps + 1), initial=self.start,
                        total=self.config.steps, desc="train")
        for step in self.bar:
            self.step_number, self.began = step, time.perf_counter()
            yield step
        self.bar.close()

    def step(self, step: int, loss: torch.Tensor, **logged: torch.Tensor) -> None:
        """One optimizer step on `loss` (gradients clipped to norm 1), then the books: a log.csv
        row with `logged`, the saves and sample grids that are due."""
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step}: training stopped; "
                                + self.last_save().replace("the last save", "the last good save"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, max_norm=1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        seconds = time.perf_counter() - self.began
        self.bar.set_postfix(loss=f"{loss.item():.4f}", s_per_step=f"{seconds:.2f}")
        self.log.append(step=step, loss=loss.item(), **{k: v.item() for k, v in logged.items()},
                        lr=self.config.lr, seconds=round(seconds, 4))
        if step % self.config.save_every == 0 or step == self.config.steps:
            self.save(step)
        if self.config.validation_every and step % self.config.validation_every == 0 \
                and step != self.config.steps:
            self.sample_grid(step)

    def save(self, step: int) -> None:
        """The result file (if the method has one) and checkpoint.pt, each written atomically."""
        if self.trainable.result_name:
            metadata = {"base_fingerprint": self.fingerprint,
                        "base_model": os.path.basename(self.config.model), **self.metadata,
                        "step": step, "training_args": run_config.as_dict(self.config)}
            write_atomically(lambda path: self.trainable.save(path, metadata),
                            self.out / self.trainable.result_name)
        save_checkpoint(self.out / "checkpoint.pt", step, self.model, self.optimizer, self.scaler,
                        self.fingerprint, self.config)
        self.saved = step

    def sample_grid(self, step: int, columns: int = 4) -> Path:
        """samples/step-NNNNN.png: one row per validation prompt, `columns` seeds."""
        path = self.out / "samples" / f"step-{step:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model.unet.eval()
        prompts = self.validation_prompts
        images = [image for prompt in prompts
                  for image in generate(self.model, [prompt] * columns, self.config.seed, self.config)]
        save_grid(images, str(path), columns=columns, labels=[p for p in prompts for _ in range(columns)])
        self.model.unet.train()
        return path

    def finish(self) -> None:
        """loss.png, the last grid, the result's size, and the trained part merged into plain
        weights (sampling afterwards at the base model's cost)."""
        plot_losses(self.log.column("step"), self.log.column("loss"), self.out / "loss.png")
        print(f"samples after training: {self.sample_grid(self.config.steps)}")
        if self.trainable.result_name:
            result = self.out / self.trainable.result_name
            print(f"{result.stem.replace('_', ' ')}: {result} ({result.stat().st_size / 1024:.1f} KB)")
        self.trainable.merge()


# ----------------------------------------------------------------------------- the command

def main(train, config) -> int:
    """Train with a parsed config, and turn the ways a run ends into exit codes."""
    try:
        train(config)
    except (DataError, CheckpointError, spectral.ShiftFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that cannot be written, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"\n{error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the loop: loading, the SVD, class images, the measurement
        print("\ninterrupted outside training; what was written so far (class images, SVDs, a "
              "finished run's result) is kept", file=sys.stderr)
        return 130
    return 0
