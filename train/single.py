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
during, after), log.csv, loss.png and checkpoint.pt (for --resume); train/core.py keeps these
books. Exit codes: 0 done, 2 bad input (one line saying which), 1 training diverged (the last
good save is kept), 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.model import state_dict_fingerprint
from train import core, data
from train import config as run_config
from train.config import RunConfig, SubjectConfig, option
from train.data import DataError
from train.toy import subjects
from train.trainable import make_trainable


@dataclass(frozen=True)
class SingleConfig(SubjectConfig):
    instance_dir: str | None = option(None, "the subject's images (3-5 are enough); default: "
                                      "renders of the example subject, written to "
                                      "OUTPUT_DIR/instance-images", metavar="DIR")
    instance_prompt: str | None = option(None, "prompt naming the subject with a rare token and "
                                         "its class word, e.g. 'a photo of sks dog' (default with "
                                         "the example subject: 'a sks star')")
    class_prompt: str | None = option(None, "the class alone, every word of it in the instance "
                                      "prompt, e.g. 'a photo of dog' (default with the example "
                                      "subject: 'a star')")
    class_dir: str | None = option(None, "prior images: generated from the class prompt with the "
                                   "base model when fewer than --num-class-images are there, "
                                   "reused after; default: runs/class-images/<class prompt>-<hash of "
                                   "what shapes them> under the working directory, shared by "
                                   "runs", metavar="DIR")


CLASS_IMAGES = Path("runs/class-images")   # relative: beside runs/single, shared between runs
DESCRIPTION = ("Fine-tune the spectral shifts of a Stable Diffusion model on one subject, with "
               "prior preservation. With no arguments: the bundled tiny model and its example "
               "subject (a striped star, 'a sks star'), a few minutes on a CPU.")


# ----------------------------------------------------------------------------- the run's settings

def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def with_example(config: SingleConfig) -> SingleConfig:
    """Without --instance-dir: the example subject, its renders (to be written into
    OUTPUT_DIR/instance-images) and, where not given, its prompts."""
    if config.instance_dir is not None:
        return config
    return dataclasses.replace(config, instance_dir=str(Path(config.output_dir) / "instance-images"),
                               instance_prompt=config.instance_prompt or subjects.EXAMPLE.instance_prompt,
                               class_prompt=config.class_prompt or subjects.EXAMPLE.class_prompt)


def check_prompts(config: SingleConfig) -> None:
    """Your own images need their prompts, and the subject must be tied to its class: the prior
    loss keeps the class prompt's meaning, so the instance prompt must be the class prompt plus
    the identifier ("a sks star" / "a star"), or there is nothing to preserve."""
    if not config.instance_prompt or (not config.class_prompt and config.prior_loss_weight > 0):
        raise DataError("--instance-dir needs --instance-prompt (e.g. 'a photo of sks dog') "
                        "and --class-prompt (e.g. 'a photo of dog')")
    if config.prior_loss_weight == 0:
        return
    instance, category = config.instance_prompt, config.class_prompt
    missing = [w for w in words(category) if w not in words(instance)]
    if missing:
        raise DataError(f"--instance-prompt '{instance}' lacks the class word(s) "
                        f"{', '.join(missing)} of --class-prompt '{category}'; "
                        f"name the class, as in 'a sks {words(category)[-1]}'")


def resolve(config: SingleConfig, model, fingerprint: str) -> SingleConfig:
    """The defaults that depend on the model filled in, and the class folder named: the
    complete settings of this run, recorded in its checkpoint and shift file, never changed
    afterwards."""
    filled = {k: v for k, v in core.model_defaults(config, model).items() if getattr(config, k) is None}
    filled["resolution"] = config.resolution or model.image_size
    core.check_resolution(model, filled["resolution"])
    config = dataclasses.replace(config, **filled)
    if config.prior_loss_weight > 0 and config.class_dir is None:
        config = dataclasses.replace(config, class_dir=default_class_dir(config.class_prompt, config,
                                                                         model, fingerprint))
    return config


def class_image_settings(prompt: str, config: RunConfig, model, fingerprint: str) -> dict:
    """What shapes the prior images of `prompt`: recorded beside them, and in the default
    folder's name. Besides the run's settings: the base (UNet + text encoder), the VAE that
    decodes them, the prediction type the sampler reads the UNet with, and the prompt's token
    ids (what the tokenizer makes of it; repeats at the end, SD 1's padding, dropped)."""
    ids = model.text_encoder.tokenize([prompt])[0].tolist()
    while len(ids) > 1 and ids[-1] == ids[-2]:
        ids.pop()
    return {"prompt": prompt, "token_ids": ids, "base_fingerprint": fingerprint,
            "vae_fingerprint": state_dict_fingerprint(model.vae.state_dict()),
            "prediction_type": model.prediction_type,
            "resolution": config.resolution, "sample_steps": config.sample_steps,
            "guidance": config.guidance, "mixed_precision": config.mixed_precision,
            "seed": config.seed}


def default_class_dir(prompt: str, config: RunConfig, model, fingerprint: str,
                      root: Path = CLASS_IMAGES) -> str:
    """root/<prompt>-<hash of what shapes the images>: shared by the runs (of any trainer) that
    would make the same images."""
    settings = class_image_settings(prompt, config, model, fingerprint)
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=4).hexdigest()
    return str(Path(root) / f"{slug}-{digest}")


def load_class_images(model, prompt: str, directory: str, config: RunConfig, fingerprint: str) -> data.ImageSet:
    """The base model's own images of `prompt`, config.num_class_images of them, generated
    into `directory` when missing (data.ensure_class_images)."""
    images = data.ensure_class_images(
        directory, config.num_class_images, class_image_settings(prompt, config, model, fingerprint),
        lambda prompts, seeds: core.generate(model, prompts, seeds[0], config), 8, config.seed)
    return data.ImageSet(images, config.resolution)


def read_data(model, config: SingleConfig, fingerprint: str, example: bool):
    """The subject's images and, for the prior loss, the base model's own class images."""
    if example:  # render the example subject, so that it is read like anyone's photos
        subjects.write_instance_images(subjects.EXAMPLE.subject, config.instance_dir)
    instance = data.ImageSet(data.read_images(config.instance_dir), config.resolution)
    if config.prior_loss_weight == 0:
        return instance, None
    return instance, load_class_images(model, config.class_prompt, config.class_dir, config, fingerprint)


# ----------------------------------------------------------------------------- the method

def diffusion_loss(model, latents, context, t, noise):
    """Per-sample ||out_theta(z_t | c, t) - target||^2, averaged over latent elements: (B,).
    latents, noise: (B, 4, h, w); context: (B, 77, D); t: (B,) long; target eps or v."""
    x_t = model.schedule.add_noise(latents, noise, t)
    target = model.schedule.training_target(latents, noise, t, model.prediction_type)
    prediction = model.unet(x_t, t, context)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def train(config: SingleConfig):
    """Train, save and merge; returns the model with the trained shifts merged in."""
    example = config.instance_dir is None
    config = with_example(config)
    check_prompts(config)
    core.check_output_dir(config)   # before the slow parts
    model, fingerprint = core.load_model(config)
    config = resolve(config, model, fingerprint)
    instance, prior = read_data(model, config, fingerprint, example)
    image_sets = (instance,) if prior is None else (instance, prior)
    encode = core.vae_moments(model)
    if config.cache_latents:
        for images in image_sets:
            images.build_cache(encode)
    measuring = config.eval_samples and example and core.is_toy_model(model)
    if measuring:   # the base model's class images: what the drift is measured against
        base_readings = subjects.placed_readings(model, config.class_prompt, config.eval_samples,
                                                config.sample_steps, config.guidance, config.seed + 1)
    trainable = make_trainable(model, config)
    prompts = [config.instance_prompt, config.class_prompt][:len(image_sets)]
    B, device, scale = config.batch_size, model.device, model.vae.config.scale_factor
    token_ids = model.text_encoder.tokenize(prompts).repeat_interleave(B, 0).to(device)
    metadata = {"instance_prompt": config.instance_prompt, "class_prompt": config.class_prompt}
    shown = [p for p in (config.instance_prompt, config.class_prompt) if p]  # drift shows too

    with core.Run(config, model, trainable, fingerprint, metadata,
                  log_fields=("loss", "instance_loss", "prior_loss"), validation_prompts=shown) as run:
        for step in run.steps():
            # the batch: B subject images, then B prior images; t and noise per image
            generator = data.step_generator(config.seed, step)
            latents = torch.cat([images.latents(B, generator, encode, scale) for images in image_sets])
            t = torch.randint(0, model.schedule.num_train_timesteps, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            with core.autocast(config, device):
                context = model.text_encoder(token_ids)
                per_sample = diffusion_loss(model, latents.to(device), context, t.to(device), noise.to(device))
            instance_loss = per_sample[:B].mean()
            prior_loss = per_sample[B:].mean() if prior is not None else torch.zeros(())
            loss = instance_loss + config.prior_loss_weight * prior_loss if prior is not None else instance_loss
            run.step(step, loss, instance_loss=instance_loss, prior_loss=prior_loss)
        run.finish()

    if measuring:
        fidelity, drift = subjects.measure(model, subjects.EXAMPLE.subject, config.instance_prompt,
                                           config.class_prompt, config.eval_samples,
                                           config.sample_steps, config.guidance, config.seed + 1,
                                           base_readings)
        print(f"subject fidelity {fidelity:.0%} ('{config.instance_prompt}' shows the subject), "
              f"prior drift {drift:.0%} ('{config.class_prompt}' shows it, or its colors more "
              "often than the base model), "
              f"{config.eval_samples} samples each")
    return model


def build_parser():
    return run_config.build_parser(SingleConfig, "python -m train.single", DESCRIPTION)


def parse_args(argv=None) -> SingleConfig:
    return run_config.parse(build_parser(), SingleConfig, argv)


def main(argv=None) -> int:
    return core.main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
