"""CoSINE: edit one image by fine-tuning spectral shifts on it, then changing the prompt.

Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning" (ICCV 2023), sec. 3.4:
Compact parameter space for SINgle image Editing.

1. Fine-tune on the one pair (image x, source prompt c): train.single's loss with no prior
   term (lambda = 0), a batch being the image B times, each copy with its own t and noise,

       L = E_{t, eps} ||eps_theta'(z_t | c, t) - eps||^2,    z ~ q(z | x) scaled, as in training

   and no augmentation (a mirrored copy would move what the prompt places). Only the spectral
   shifts train: the compact space is what keeps one image from being learned so hard that a
   new prompt is ignored. (--method full fine-tunes every UNet weight instead: the paper's
   comparison.)
2. Start, per edit prompt c' and image j of the seed's batch (eps_j ~ N(0, I)):
       fresh noise (--no-invert)   x_T = eps_j
       inversion (default)         x_T = DDIMInvert(z*, c'; theta'), guidance 1, z* = the mean
                                   of q(z | x) scaled: edits that keep the layout
       --slerp a                   x_T = slerp(a, DDIMInvert(z*, c'; theta'), eps_j): more noise
                                   for larger changes (a = 1: fresh noise)
3. Sample: DDIM under c' with the model's guidance and --eta (eta > 0 adds noise at every step,
   the other way to larger changes). Every (eta, slerp) pair given is one column of the sweep.

    python -m edit.cosine      # bundled example: "a red star on the left" -> blue / a heart / on the right
    python -m edit.cosine --image photo.jpg --prompt "a photo of a dog" \\
        --edit "a photo of a dog wearing a hat" --edit "a photo of a cat" --eta 0,0.5
    python -m edit.cosine --shift runs/cosine/spectral_shifts.safetensors --image photo.jpg \\
        --prompt "a photo of a dog" --edit "a photo of a sitting dog" --slerp 0,0.3,0.6 \\
        --output-dir runs/dog-sitting                     # no fine-tune: the earlier one's shifts

Writes to --output-dir the fine-tune's files (spectral_shifts.safetensors, log.csv, loss.png,
samples/, checkpoint.pt: train/core.py keeps these books, --resume works as in train.single) and,
per edit, edits/NN-<prompt>.png: one row per image of the seed's batch, columns the input as
the model sees it, the source prompt sampled from the same start (eta 0, no slerp: what the
edits change, at the same guidance) and the sweep; edits/NN-<prompt>/*.png and
edits/source-prompt-image-*.png hold every image alone, each with its settings in the PNG's
text chunks. Exit codes as train.single's: 0 done, 2 bad input (one line), 1 diverged, 130 Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import spectral
from edit import cli
from edit.grid import png_info, save_grid, to_pil
from edit.shifts import apply_shifts
from ldm import ddim
from train import core, data
from train import config as run_config
from train.config import RunConfig, option
from train.data import DataError, warn
from train.single import diffusion_loss
from train.toy import edits as toy
from train.toy import reader as toy_reader
from train.trainable import make_trainable


@dataclass(frozen=True)
class CosineConfig(RunConfig):
    image: str | None = option(None, "the image to edit: any size, mode or EXIF orientation; "
                               "default: the bundled model's example scene, written to "
                               "OUTPUT_DIR/input.png", metavar="PATH")
    prompt: str | None = option(None, "the source prompt, describing the image (default with the "
                                "example: 'a red star on the left')")
    edit: tuple[str, ...] | None = option(None, "a target prompt, repeatable: one grid each "
                                          "(default with the example: a color, a shape and a "
                                          "position edit)", same_on_resume=False)
    shift: str | None = option(None, "the shift file of an earlier fine-tune on this image and "
                               "prompt: no fine-tune, only the edits (default: none, fine-tune "
                               "first)", metavar="FILE", same_on_resume=False)
    fit: str = option("crop", "how the image becomes the model's square: crop (its centre "
                      "square, scaled) or pad (the whole image, scaled, on its border's mean "
                      "color)", choices=("crop", "pad"))
    invert: bool | None = option(True, "start from the DDIM inversion of the image (guidance 1, "
                                 "under each target prompt, with the fine-tuned model); "
                                 "--no-invert: from fresh noise (default: invert)",
                                 same_on_resume=False)
    # the default pair shows both: on the bundled model a color edit needs eta 0.5 (README)
    eta: tuple[float, ...] = option((0.0, 0.5), "DDIM eta values to sweep, comma-separated: 0 "
                                    "deterministic, 1 DDPM-like noise at every step",
                                    minimum=0, maximum=1, same_on_resume=False)
    slerp: tuple[float, ...] = option((0.0,), "slerp alphas to sweep, comma-separated: the "
                                      "inversion mixed toward fresh noise (0: none, 1: all)",
                                      minimum=0, maximum=1, same_on_resume=False)
    num_images: int = option(2, "images per setting (the grid's rows; the seed's batch)",
                             minimum=1, same_on_resume=False)
    steps: int | None = option(None, "fine-tuning steps (a resumed run may be given more); default: "
                        "500, 100 on the bundled tiny model", minimum=1, same_on_resume=False)
    output_dir: str = option("runs/cosine", "where everything is written", metavar="DIR",
                             same_on_resume=False)


DESCRIPTION = ("Edit one image by fine-tuning spectral shifts on it and its prompt, then "
               "sampling under new prompts (CoSINE). With no arguments: the bundled tiny model "
               "and its example scene, edited three ways, minutes on a CPU.")


# ----------------------------------------------------------------------------- the run's settings

def with_example(config: CosineConfig) -> CosineConfig:
    """Without --image: the example scene (written into OUTPUT_DIR/input.png) and, where not
    given, its prompt and edits."""
    if config.image is not None:
        return config
    if config.prompt is not None:
        raise DataError("--prompt describes your --image: give --image too (without it, the "
                        "example scene is edited, with its own prompt)")
    return dataclasses.replace(config, image=str(Path(config.output_dir) / "input.png"),
                               prompt=config.prompt or toy.EXAMPLE.scene.caption,
                               edit=config.edit or toy.EXAMPLE.edits)


def normalized(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def check_settings(config: CosineConfig) -> None:
    """The prompts and the flags that do not go together, before anything is loaded."""
    if not config.prompt or not config.prompt.strip():
        raise DataError("--prompt: give the source prompt, describing the image (e.g. 'a photo of a dog')")
    if not config.edit:
        raise DataError("--edit: give at least one target prompt (e.g. 'a photo of a cat')")
    seen = set()
    for edit in config.edit:
        if not edit.strip():
            raise DataError("--edit: an empty target prompt")
        if normalized(edit) == normalized(config.prompt):
            raise DataError(f"--edit '{edit}' is the source prompt: an edit must change it")
        if normalized(edit) in seen:
            raise DataError(f"--edit '{edit}' is given twice")
        seen.add(normalized(edit))
    if not config.invert and any(config.slerp):
        raise DataError("--slerp mixes the inversion with fresh noise: it needs --invert")
    if config.shift and (config.resume or config.method != "spectral"):
        raise DataError("--shift skips the fine-tune: leave out --resume and --method")


def read_image(path: str) -> Image.Image:
    """The image to edit as RGB, or DataError naming --image and the reason."""
    target = Path(path)
    if not target.exists():
        raise DataError(f"--image {path}: no such file")
    if target.is_dir():
        raise DataError(f"--image {path}: is a directory, not an image file")
    try:
        return data.open_image(target)
    except DataError as error:
        raise DataError(f"--image {path}: {error}") from None


def fit(image: Image.Image, size: int, how: str) -> Image.Image:
    """The size x size square the model takes: the centre square scaled ("crop"), or the whole
    image scaled to fit and centred on its border's mean color ("pad")."""
    if (min if how == "crop" else max)(image.size) < size:
        warn(f"--image is {image.size[0]}x{image.size[1]}, smaller than {size}: upscaled, expect blur")
    if how == "crop":
        image = data.resize_short_side(image, size)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).mean(0)
    scale = size / max(image.size)
    inner = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), tuple(int(round(c)) for c in border))
    square.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
    return square


# fine-tuning steps: one image is learned in fewer than a subject's few photos (train.single: 500)
SD_STEPS, TOY_STEPS = 500, 100


def resolve(config: CosineConfig, model) -> CosineConfig:
    """The defaults that depend on the model filled in: the complete settings of this run."""
    filled = {k: v for k, v in core.model_defaults(config, model).items() if getattr(config, k) is None}
    filled["resolution"] = config.resolution or model.image_size
    core.check_resolution(model, filled["resolution"])
    if config.steps is None:
        filled["steps"] = TOY_STEPS if core.is_toy_model(model) else SD_STEPS
    return dataclasses.replace(config, **filled)


def check_outputs(config: CosineConfig) -> None:
    """Earlier edits in OUTPUT_DIR/edits are replaced only with --overwrite (or --resume, which
    makes them again); the fine-tune's files as train.single's."""
    if config.shift:
        try:
            cli.check_output_dir(config.output_dir, (), True)   # a folder, or one to be made
        except ValueError as error:
            raise DataError(str(error)) from None
    else:
        core.check_output_dir(config)
    edits = Path(config.output_dir) / "edits"
    if edits.is_dir() and any(edits.iterdir()) and not (config.overwrite or config.resume):
        keep = "" if config.shift else (f" (--shift {Path(config.output_dir) / 'spectral_shifts.safetensors'} "
                                        "--overwrite remakes only the edits)")
        raise DataError(f"--output-dir {config.output_dir} holds an earlier run's edits ({edits}); "
                        f"replace them with --overwrite{keep}")


# ----------------------------------------------------------------------------- 1. the fine-tune

def fine_tune(model, config: CosineConfig, fingerprint: str, image: Image.Image) -> None:
    """Train config.method on (image, config.prompt) with no prior loss; the result is saved
    (train/core.py) and merged into the model's weights."""
    trainable = make_trainable(model, config)
    images = data.ImageSet([image], config.resolution, augment=False)
    encode = core.vae_moments(model)
    if config.cache_latents:
        images.build_cache(encode)
    B, device, scale = config.batch_size, model.device, model.vae.config.scale_factor
    token_ids = model.text_encoder.tokenize([config.prompt]).repeat(B, 1).to(device)
    metadata = {"prompt": config.prompt, "image": Path(config.image).name}
    with core.Run(config, model, trainable, fingerprint, metadata, log_fields=("loss",),
                  validation_prompts=[config.prompt, *config.edit]) as run:
        for step in run.steps():
            generator = data.step_generator(config.seed, step)
            latents = images.latents(B, generator, encode, scale)
            t = torch.randint(0, model.schedule.num_train_timesteps, (B,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            with core.autocast(config, device):
                context = model.text_encoder(token_ids)
                loss = diffusion_loss(model, latents.to(device), context, t.to(device), noise.to(device)).mean()
            run.step(step, loss)
        run.finish()


def use_shift_file(model, config: CosineConfig) -> None:
    """--shift: merge an earlier fine-tune's shifts (checked against this base model)."""
    _, metadata = spectral.load_shifts(config.shift, expect_fingerprint=model.base_fingerprint())
    trained_on = metadata.get("prompt")
    if trained_on is not None and normalized(trained_on) != normalized(config.prompt):
        warn(f"--shift {config.shift} was fine-tuned on the prompt '{trained_on}', not '{config.prompt}'")
    apply_shifts(model, [(config.shift, 1.0)], cache_dir=config.svd_cache)


# ----------------------------------------------------------------------------- 2-3. the edits

@dataclass(frozen=True)
class Setting:
    """One column of the sweep."""
    eta: float
    slerp: float

    def label(self, invert: bool) -> str:
        start = ("inversion" + (f" + slerp {self.slerp:g}" if self.slerp else "")) if invert else "fresh noise"
        return f"{start}, eta {self.eta:g}"


def sweep(config: CosineConfig) -> list[Setting]:
    return [Setting(eta, alpha) for alpha in dict.fromkeys(config.slerp) for eta in dict.fromkeys(config.eta)]


@torch.no_grad()
def edit_latents(model, source: torch.Tensor, prompt: str, settings: list[Setting], invert: bool,
                 num_images: int, seed: int, sample_steps: int, guidance: float) -> torch.Tensor:
    """Latents (num_images, len(settings), 4, h, w) sampled under `prompt`; `source` (1, 4, h, w)
    is z*, the image's latents. Every setting starts from the same eps of the seed's batch."""
    cond = model.encode_prompts([prompt])
    uncond = model.encode_prompts([""]) if guidance != 1 else None
    common = dict(schedule=model.schedule, steps=sample_steps, prediction_type=model.prediction_type,
                  progress=False)
    inverted = ddim.invert(model.denoise, source, cond, guidance=1.0, **common) if invert else None
    columns = []
    for setting in settings:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_images, *source.shape[1:]), generator=generator).to(source.device)
        x_T = ddim.slerp(setting.slerp, inverted, noise) if invert else noise
        columns.append(ddim.sample(model.denoise, x_T, cond, uncond, guidance, eta=setting.eta,
                                   generator=generator, **common))
    return torch.stack(columns, 1)


def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "edit"


def write_edits(model, config: CosineConfig, image: Image.Image) -> list[Path]:
    """Per edit: the grid and each image alone (settings in the PNG text chunks); returns the
    grids' paths. The second column is the source prompt from the same start (eta 0, no
    slerp): what the edits change."""
    out = Path(config.output_dir) / "edits"
    if config.overwrite or config.resume:   # an earlier run's edits, checked for at the start
        for old in [*out.glob("*.png"), *out.glob("*/*.png")]:
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    source = model.encode(data.to_tensor(image)[None])
    settings, n = sweep(config), config.num_images
    common = dict(invert=config.invert, num_images=n, seed=config.seed,
                  sample_steps=config.sample_steps, guidance=config.guidance)
    about = {"source_prompt": config.prompt, "model": config.model, "shift": config.shift or "",
             "method": config.method, "invert": config.invert, "seed": config.seed,
             "sample_steps": config.sample_steps, "guidance": config.guidance}

    def sampled(prompt: str, columns: list[Setting]) -> list[list[Image.Image]]:
        """[image j][column k] under `prompt`, decoded one column at a time (memory)."""
        with core.autocast(config, model.device):
            latents = edit_latents(model, source, prompt, columns, **common)
        decoded = [to_pil(model.decode(latents[:, k])) for k in range(len(columns))]
        return [[column[j] for column in decoded] for j in range(n)]

    unedited = [row[0] for row in sampled(config.prompt, [Setting(0, 0)])]
    for j, picture in enumerate(unedited):
        picture.save(out / f"source-prompt-image-{j}.png",
                     pnginfo=png_info({**about, "edit_prompt": "", "eta": 0, "slerp": 0, "image": j}))
    start = "inversion" if config.invert else "fresh noise"
    input_image = to_pil(data.to_tensor(image)[None] / 2 + 0.5)[0]
    grids = []
    for number, prompt in enumerate(tqdm(config.edit, desc="edits"), 1):
        name = f"{number:02d}-{slug(prompt)}"
        (out / name).mkdir(exist_ok=True)
        tiles, labels = [], []
        for j, row in enumerate(sampled(prompt, settings)):
            tiles += [input_image, unedited[j]]
            labels += ["input", f"{config.prompt} | {start}, eta 0 (the source prompt)"]
            for setting, picture in zip(settings, row):
                file_name = re.sub(r"[^a-z0-9.]+", "-", setting.label(config.invert)) + f"-image-{j}.png"
                picture.save(out / name / file_name, pnginfo=png_info(
                    {**about, "edit_prompt": prompt, "eta": setting.eta, "slerp": setting.slerp, "image": j}))
                tiles.append(picture)
                labels.append(f"{prompt} | {setting.label(config.invert)}")
        grids.append(Path(save_grid(tiles, str(out / f"{name}.png"), columns=2 + len(settings),
                                    labels=labels, metadata={**about, "edit_prompt": prompt})))
    return grids


# ----------------------------------------------------------------------------- the command

def edit(config: CosineConfig):
    """Fine-tune (or read --shift), then write every edit; returns the grids' paths."""
    example = config.image is None
    config = with_example(config)
    check_settings(config)
    check_outputs(config)
    if example:  # the example scene is read back like anyone's photo
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        toy.write_example(config.image)
    original = read_image(config.image)
    model, fingerprint = core.load_model(config)
    config = resolve(config, model)
    image = fit(original, config.resolution, config.fit)
    if config.shift:
        use_shift_file(model, config)
    else:
        fine_tune(model, config, fingerprint, image)
    model.unet.eval()
    try:
        grids = write_edits(model, config, image)
    except KeyboardInterrupt:
        shifts = config.shift or Path(config.output_dir) / "spectral_shifts.safetensors"
        redo = f"; make them again with --shift {shifts} --overwrite" if config.method == "spectral" else ""
        raise core.Interrupted(f"interrupted while writing the edits (the fine-tune is done){redo}") from None
    for grid in grids:
        print(f"edit grid: {grid}")
    if config.eval_samples and example and core.is_toy_model(model):
        print(measure_example(model, config, image))
    return grids


def measure_example(model, config: CosineConfig, image: Image.Image) -> str:
    """The example's edits as the toy world's reader sees them: per edit and setting, the share
    of config.eval_samples images (seed + 1's batch) with the edit taken, the rest of the object
    kept, and the background kept (settings without noise give one image config.eval_samples
    times)."""
    image_reader = toy_reader.load_reader()
    source = model.encode(data.to_tensor(image)[None])
    background = toy.backgrounds(np.asarray(image)[None])[0]
    lines = [f"reader, {config.eval_samples} images per edit and setting: edit taken / rest of the "
             "object kept / background kept"]
    settings = sweep(config)
    for prompt in config.edit:
        latents = edit_latents(model, source, prompt, settings, config.invert, config.eval_samples,
                               config.seed + 1, config.sample_steps, config.guidance)
        cells = []
        for k, setting in enumerate(settings):
            verdicts = toy.judge(config.prompt, prompt, model.decode(latents[:, k]), background, image_reader)
            shares = [np.mean([v[key] for v in verdicts]) for key in ("success", "preserved", "background")]
            cells.append(f"{setting.label(config.invert)}: " + " / ".join(f"{x:.0%}" for x in shares))
        lines.append(f"  {prompt}: " + "; ".join(cells))
    return "\n".join(lines)


def build_parser():
    return run_config.build_parser(CosineConfig, "python -m edit.cosine", DESCRIPTION)


def parse_args(argv=None) -> CosineConfig:
    return run_config.parse(build_parser(), CosineConfig, argv)


def main(argv=None) -> int:
    return core.main(edit, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
