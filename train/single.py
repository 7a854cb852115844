"""Single-subject SVDiff: personalize Stable Diffusion by training spectral shifts only.

Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning" (ICCV 2023), sec. 3,
with DreamBooth's prior-preservation loss (Ruiz et al., CVPR 2023).

Every weight of the UNet (and, with --train-text-encoder, of the text encoder) is frozen in its
singular value decomposition W = U diag(sigma) V^T, and only a shift delta of the singular
values is trained (spectral/ does this; W of a conv is its (c_out, c_in*kh*kw) matrix):

    W_delta = U diag(ReLU(sigma + delta)) V^T          sigma, delta: (r,), r = min(m, n)

GroupNorm / LayerNorm scales get an additive shift of the whole vector, with a far smaller
learning rate (--lr-1d). The loss of one step, with z the VAE latents of an image, c its
prompt's text context, eps ~ N(0, I), t ~ U{0, ..., 999}, z_t = sqrt(a_t) z + sqrt(1 - a_t) eps:

    L = E ||eps_theta(z_t | c_instance, t) - eps||^2                    the subject's images
      + lambda * E ||eps_theta(z_t' | c_class, t') - eps'||^2           prior images, made by
                                                                        the base model from the
                                                                        class prompt
For v-prediction models (SD 2.x 768-v) the target is v = sqrt(a_t) eps - sqrt(1 - a_t) z
instead of eps. lambda = --prior-loss-weight (0: no prior preservation).

    python -m train.single          # bundled tiny model, example subject "a sks star": minutes on a CPU
    python -m train.single --model sd15.safetensors --instance-dir my_dog/ \\
        --instance-prompt "a photo of sks dog" --class-prompt "a photo of dog" --device cuda

Writes to --output-dir: spectral_shifts.safetensors (the result), samples/step-*.png (before,
during, after), log.csv, loss.png and checkpoint.pt (for --resume). Exit codes: 0 done, 2 bad
input (one line saying which), 1 training diverged (non-finite loss; the last good checkpoint
is kept).
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import spectral
from ldm import checkpoint
from ldm.checkpoint import CheckpointError
from ldm.model import usable_device
from train import data
from train.data import DataError

# the example subject on the bundled tiny model: defaults when no --instance-dir is given
EXAMPLE_SUBJECT = "striped_star"
EXAMPLE_PROMPTS = ("a sks star", "a star")
# defaults that depend on the model. SD: the paper's lr (DreamBooth's for a full fine-tune),
# the usual guidance, torch's threads. The bundled tiny model must learn the subject in a few
# hundred CPU steps: on its 16000-step weights, 500 steps at lr 1e-2, batch 8, with the text
# encoder's shifts trained too give 82% subject fidelity and 14% prior drift (UNet only, batch 4:
# 82% / 34%; a full fine-tune at 5e-4, batch 4: 96% / 26%). Earlier weights: lr 5e-3 gave 62% /
# 22% (12000 steps), lr 1e-3 only 23% fidelity after 200 steps (8000). It was tuned for guidance
# 4, and its layers are too small to split over threads (2 threads ran 7x slower than 1 on a
# busy 2-core machine).
MODEL_DEFAULTS = {"sd": {"lr": 1e-3, "full_lr": 5e-6, "guidance": 7.5, "threads": None,
                         "batch_size": 4, "train_text_encoder": False},
                  "bundled": {"lr": 1e-2, "full_lr": 5e-4, "guidance": 4.0, "threads": 1,
                              "batch_size": 8, "train_text_encoder": True}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.single", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune the spectral shifts of a Stable Diffusion model on one subject, "
                    "with prior preservation. With no arguments: the bundled tiny model and its "
                    "example subject (a striped star, 'a sks star'), a few minutes on a CPU.")
    a = p.add_argument
    a("--model", default=checkpoint.DEFAULT_MODEL,
      help="base model: single .safetensors/.ckpt file or diffusers folder")
    a("--instance-dir", help="the subject's images (3-5 are enough); default: renders of the "
      "example subject, written to OUTPUT_DIR/instance-images")
    a("--instance-prompt", help="prompt naming the subject with a rare token and its class word, "
      "e.g. 'a photo of sks dog' (default with the example subject: 'a sks star')")
    a("--class-prompt", help="the class alone, every word of it in the instance prompt, e.g. "
      "'a photo of dog' (default with the example subject: 'a star')")
    a("--class-dir", help="prior images: generated from the class prompt with the base model "
      "when fewer than --num-class-images are there, reused after; default: "
      "runs/class-images/<base model>-<class prompt>")
    a("--num-class-images", type=int, default=32, help="prior images to use (DreamBooth: 100-200 on SD)")
    a("--prior-loss-weight", type=float, default=1.0, help="lambda; 0 disables prior preservation")
    a("--train-text-encoder", action=argparse.BooleanOptionalAction,
      help="spectral shifts on the text encoder too; default: off, on for the bundled tiny model")
    a("--full-finetune", action="store_true", help="baseline for comparison only: train every "
      "UNet weight plainly (no spectral shifts; writes no shift file)")
    a("--lr", type=float, help="learning rate of the singular-value shifts; default: 1e-3 (the "
      "paper's), 1e-2 on the bundled tiny model. With --full-finetune, of the weights: 5e-6, "
      "5e-4 on the bundled model")
    a("--lr-1d", type=float, default=1e-6, help="learning rate of the norm-scale shifts")
    a("--steps", type=int, default=500, help="optimizer steps")
    a("--batch-size", type=int, help="instance images per step (as many prior images again); "
                                     "default: 4, 8 for the bundled tiny model")
    a("--resolution", type=int, help="training image size; default: the model's (32 for the "
      "bundled model, 512 for SD 1.x)")
    a("--seed", type=int, default=0, help="seeds data order, augmentation, t, noise and samples")
    a("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
      help="autocast the forward; the shifts and the optimizer stay fp32")
    a("--gradient-checkpointing", action="store_true",
      help="recompute UNet activations in backward: less memory, ~30%% more time")
    a("--cache-latents", action="store_true", help="encode each image once (centre crop and "
      "mirror) instead of every step; turns off the random crop")
    a("--validation-prompt", action="append", help="prompt for the sample grids, repeatable; "
      "default: the instance and class prompts")
    a("--validation-every", type=int, default=100,
      help="sample grid every N steps (also before and after training); 0: before and after only")
    a("--sample-steps", type=int, default=25, help="DDIM steps for class images, grids, evaluation")
    a("--guidance", type=float, help="classifier-free guidance scale for sampling; default: 7.5, "
      "4 on the bundled tiny model (what it was tuned for)")
    a("--eval-samples", type=int, default=50, help="with the example subject: samples per prompt "
      "for the final subject-fidelity / prior-drift measurement (the toy world's reader, "
      "train.evaluate); 0 skips it")
    a("--save-every", type=int, default=50, help="write the shift file and checkpoint every N steps")
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt, with the "
      "same arguments; the result equals an uninterrupted run")
    a("--output-dir", default="runs/single", help="where everything is written")
    a("--svd-cache", help="directory caching the SVD of the base weights (computed once per "
      "base model); default: ~/.cache/svdiff/svd")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    a("--threads", type=int, help="CPU threads; default: torch's, 1 for the bundled tiny model")
    return p


# ----------------------------------------------------------------------------- inputs

def resolve_prompts(args):
    """Fill in the example subject's prompts, and insist the subject is tied to its class:
    the prior loss keeps the class prompt's meaning, so the instance prompt must be the class
    prompt plus the identifier ("a sks star" / "a star"), or there is nothing to preserve."""
    if args.instance_dir is None:
        args.instance_prompt = args.instance_prompt or EXAMPLE_PROMPTS[0]
        args.class_prompt = args.class_prompt or EXAMPLE_PROMPTS[1]
    elif not args.instance_prompt or (not args.class_prompt and args.prior_loss_weight > 0):
        raise DataError("--instance-dir needs --instance-prompt (e.g. 'a photo of sks dog') "
                        "and --class-prompt (e.g. 'a photo of dog')")
    if args.prior_loss_weight > 0:
        words = lambda s: re.findall(r"[\w']+", s.lower())
        missing = [w for w in words(args.class_prompt) if w not in words(args.instance_prompt)]
        if missing:
            raise DataError(f"--instance-prompt '{args.instance_prompt}' lacks the class word(s) "
                            f"{', '.join(missing)} of --class-prompt '{args.class_prompt}'; "
                            f"name the class, as in 'a sks {words(args.class_prompt)[-1]}'")


def instance_images(args):
    if args.instance_dir is None:  # render the example subject, so the same reading path is used
        from PIL import Image
        from train.toyworld import subject_images
        args.instance_dir = str(Path(args.output_dir) / "instance-images")
        os.makedirs(args.instance_dir, exist_ok=True)
        for i, pixels in enumerate(subject_images(EXAMPLE_SUBJECT, n=5, seed=0)[0]):
            Image.fromarray(pixels).save(Path(args.instance_dir) / f"{EXAMPLE_SUBJECT}-{i}.png")
    return data.read_images(args.instance_dir)


def generate(model, prompts, seed, args, progress=False):
    """PIL images from the model as it is now (with whatever shifts are attached)."""
    from edit.grid import to_pil
    with torch.autocast(torch.device(args.device).type, **autocast_kwargs(args)):
        images = model.generate(prompts, steps=args.sample_steps, guidance=args.guidance,
                                seed=seed, height=args.resolution, width=args.resolution,
                                progress=progress)
    return to_pil(images)


def autocast_kwargs(args):
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    return {"enabled": dtype is not None, "dtype": dtype}


# ----------------------------------------------------------------------------- the method

def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of step `step` (images, crops, flips, t, noise) comes from this stream,
    so any step can be replayed exactly: the basis of an exact --resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def diffusion_loss(model, latents, context, t, noise):
    """Per-sample ||out_theta(z_t | c, t) - target||^2, averaged over latent elements: (B,).
    latents, noise: (B, 4, h, w); context: (B, 77, D); t: (B,) long; target eps or v."""
    x_t = model.schedule.add_noise(latents, noise, t)
    target = model.schedule.training_target(latents, noise, t, model.prediction_type)
    prediction = model.unet(x_t, t, context)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def attach_trainable(model, args):
    """Freeze the base and make the trained part: spectral shifts on the UNet (and text
    encoder), or, for --full-finetune, every UNet weight. Returns (AdamW parameter groups,
    {"unet": ShiftParameters, "text": ...})."""
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
    if args.full_finetune:
        model.unet.requires_grad_(True)
        return [{"params": list(model.unet.parameters()), "lr": args.lr}], {}
    components = {"unet": model.unet, "text": model.text_encoder}
    if not args.train_text_encoder:
        del components["text"]
    shifts = {name: spectral.attach(module, cache_dir=args.svd_cache)
              for name, module in components.items()}
    matrices = [p for s in shifts.values() for p in s.matrices]
    norms = [p for s in shifts.values() for p in s.norms]
    return [{"params": matrices, "lr": args.lr}, {"params": norms, "lr": args.lr_1d}], shifts


def named_deltas(shifts) -> dict:
    """The shift file's entries: "unet.<module path>", "text.<module path>" -> delta."""
    return {f"{component}.{name}": delta for component, s in shifts.items()
            for name, delta in s.named_deltas().items()}


# ----------------------------------------------------------------------------- saving

def trainable_parameters(model) -> dict:
    """{"unet.<name>" / "text.<name>": parameter} of what is being trained."""
    return {f"{prefix}.{name}": p for prefix, module in (("unet", model.unet), ("text", model.text_encoder))
            for name, p in module.named_parameters() if p.requires_grad}


def save(model, shifts, optimizer, scaler, step, args, fingerprint):
    """The shift file (the result so far) and checkpoint.pt (all --resume needs), each
    written atomically: a kill at any moment loses at most the steps since this save."""
    out = Path(args.output_dir)
    if shifts:
        metadata = {"base_fingerprint": fingerprint, "base_model": os.path.basename(args.model),
                    "instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt,
                    "step": step, "training_args": vars(args)}
        data.save_atomically(lambda path: spectral.save_shifts(path, named_deltas(shifts), metadata),
                             out / "spectral_shifts.safetensors")
    data.save_checkpoint(out / "checkpoint.pt", step, trainable_parameters(model), optimizer, scaler,
                         fingerprint, vars(args))


# settings that do not change the trained values, so they may differ on --resume
RESUME_FREE = {"steps", "resume", "output_dir", "validation_prompt", "validation_every", "threads",
               "eval_samples", "save_every", "svd_cache", "sample_steps", "guidance"}


def resume(model, optimizer, scaler, args, fingerprint) -> int:
    """Restore OUTPUT_DIR/checkpoint.pt (shifts, optimizer, RNG); returns its step."""
    path = Path(args.output_dir) / "checkpoint.pt"
    step, saved_args = data.load_checkpoint(path, trainable_parameters(model), optimizer, scaler,
                                            fingerprint, what=f"--resume: {path}")
    changed = [k for k, v in vars(args).items() if k not in RESUME_FREE and saved_args.get(k) != v]
    if changed:
        data.warn(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ "
                  "from the checkpoint's; the result will not equal an uninterrupted run")
    return step


def sample_grid(model, prompts, step, args, columns=4):
    path = Path(args.output_dir) / "samples" / f"step-{step:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    from edit.grid import save_grid
    model.unet.eval()
    images = [im for prompt in prompts for im in generate(model, [prompt] * columns, args.seed, args)]
    save_grid(images, str(path), columns=columns, labels=[p for p in prompts for _ in range(columns)])
    model.unet.train()
    return path


# ----------------------------------------------------------------------------- the run

class NonFiniteLoss(Exception):
    """The loss overflowed: training stops, the files of the last save stay as they are."""


def measure_example_subject(model, args):
    """Subject fidelity (share of instance-prompt samples showing the subject) and prior drift
    (share of class-prompt samples showing it), as read by the toy world's image reader.
    Prompts cycle through the positions the toy captions know, to test more than one layout."""
    from train import evaluate
    places = ("", " on the left", " in the center", " on the right")
    reader = evaluate.load_reader()
    shares = []
    for prompt, share in ((args.instance_prompt, evaluate.subject_fidelity),
                          (args.class_prompt, evaluate.prior_drift)):
        prompts = [prompt + places[i % len(places)] for i in range(args.eval_samples)]
        images = evaluate.generate(model, prompts, steps=args.sample_steps,
                                   guidance=args.guidance, seed=args.seed + 1)
        shares.append(share(evaluate.read(images, reader), EXAMPLE_SUBJECT))
    return shares


def load_base(args):
    """The base model, its fingerprint, and the defaults that depend on it."""
    bundled = os.path.abspath(args.model) == os.path.abspath(checkpoint.DEFAULT_MODEL)
    defaults = dict(MODEL_DEFAULTS["bundled" if bundled else "sd"])
    full_lr = defaults.pop("full_lr")
    if args.full_finetune:
        defaults["lr"] = full_lr
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = checkpoint.load(args.model, device=args.device)
    args.resolution = args.resolution or model.image_size
    multiple = model.latent_factor * 2 ** (len(model.unet.config.channel_mult) - 1)
    if args.resolution % multiple:
        raise DataError(f"--resolution {args.resolution}: must be a multiple of {multiple} for this model")
    return model, model.base_fingerprint(), bundled


def load_data(model, fingerprint, args):
    """The subject's images and, for the prior loss, the base model's own class images."""
    instance = data.ImageSet(instance_images(args), args.resolution)
    if args.prior_loss_weight == 0:
        return instance, None
    slug = re.sub(r"[^a-z0-9]+", "-", args.class_prompt.lower()).strip("-")
    args.class_dir = args.class_dir or str(Path("runs/class-images") / f"{fingerprint[:10]}-{slug}")
    images = data.ensure_class_images(
        args.class_dir, args.num_class_images, args.class_prompt,
        lambda prompts, seeds: generate(model, prompts, seeds[0], args), 8, args.seed)
    return instance, data.ImageSet(images, args.resolution)


def train(args):
    resolve_prompts(args)
    example = args.instance_dir is None
    model, fingerprint, bundled = load_base(args)
    device, out = model.device, Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    instance, prior = load_data(model, fingerprint, args)
    image_sets = (instance,) if prior is None else (instance, prior)

    def encode(pixels):  # (B, 3, R, R) -> moments of q(z | x), (B, 4, h, w) each
        with torch.no_grad():
            posterior = model.vae.encode(pixels.to(device))
        return posterior.mean, posterior.std
    if args.cache_latents:
        for images in image_sets:
            images.build_cache(encode)

    groups, shifts = attach_trainable(model, args)
    model.unet.gradient_checkpointing = args.gradient_checkpointing
    model.unet.train()
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)  # decay pulls delta toward 0: the base
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    trainable = [p for group in groups for p in group["params"]]
    prompts = [args.instance_prompt, args.class_prompt][:len(image_sets)]
    token_ids = model.text_encoder.tokenize(prompts).repeat_interleave(args.batch_size, 0).to(device)

    start = resume(model, optimizer, scaler, args, fingerprint) if args.resume else 0
    log = data.TrainingLog(out / "log.csv", resume_step=start if args.resume else None)
    validation = args.validation_prompt or [p for p in (args.instance_prompt, args.class_prompt) if p]
    if start == 0:
        print(f"samples before training: {sample_grid(model, validation, 0, args)}")

    saved = start  # the step of the files on disk
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, desc="train")
    for step in bar:
        began = time.perf_counter()
        # the batch: B subject images, then B prior images; t and noise per image
        generator = step_generator(args.seed, step)
        latents = torch.cat([images.latents(args.batch_size, generator, encode,
                                            model.vae.config.scale_factor) for images in image_sets])
        t = torch.randint(0, model.schedule.num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        with torch.autocast(device.type, **autocast_kwargs(args)):
            context = model.text_encoder(token_ids)
            per_sample = diffusion_loss(model, latents.to(device), context, t.to(device), noise.to(device))
        instance_loss, prior_loss = per_sample[:args.batch_size].mean(), per_sample[args.batch_size:].mean()
        loss = instance_loss + args.prior_loss_weight * prior_loss if prior is not None else instance_loss
        if not torch.isfinite(loss):
            kept = (f"the last good checkpoint is kept: {out / 'checkpoint.pt'} (step {saved})"
                    if saved else "no checkpoint had been saved yet")
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step}: training stopped; {kept}")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
        scaler.step(optimizer)
        scaler.update()

        seconds = time.perf_counter() - began
        bar.set_postfix(loss=f"{loss.item():.4f}", s_per_step=f"{seconds:.2f}")
        log.append(step=step, loss=loss.item(), instance_loss=instance_loss.item(),
                   prior_loss=prior_loss.item() if prior is not None else 0.0, lr=args.lr, seconds=round(seconds, 4))
        if step % args.save_every == 0 or step == args.steps:
            save(model, shifts, optimizer, scaler, step, args, fingerprint)
            saved = step
        if args.validation_every and step % args.validation_every == 0 and step != args.steps:
            sample_grid(model, validation, step, args)
    bar.close()

    data.plot_losses(log.column("step"), log.column("loss"), out / "loss.png")
    print(f"samples after training: {sample_grid(model, validation, args.steps, args)}")
    if shifts:
        size = (out / "spectral_shifts.safetensors").stat().st_size
        print(f"spectral shifts: {out / 'spectral_shifts.safetensors'} ({size / 1024:.1f} KB)")
        for module in (model.unet, model.text_encoder):
            spectral.merge(module)  # W_delta written into plain weights: sampling at base cost
    if args.eval_samples and example and bundled:
        fidelity, drift = measure_example_subject(model, args)
        print(f"subject fidelity {fidelity:.0%} ('{args.instance_prompt}' shows the subject), "
              f"prior drift {drift:.0%} ('{args.class_prompt}' shows it), "
              f"{args.eval_samples} samples each")
    return model


def check_args(parser, args):
    """Values argparse cannot check by type: exit 2 with argparse's usage line and message."""
    for name in ("steps", "batch_size", "save_every", "num_class_images", "sample_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("validation_every", "eval_samples", "prior_loss_weight", "lr", "lr_1d"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    try:
        usable_device(args.device)
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        train(args)
    except (DataError, CheckpointError, spectral.ShiftFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
