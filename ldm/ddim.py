"""DDIM sampling and inversion (Song, Meng & Ermon, 2021, "Denoising Diffusion Implicit Models").

One DDIM step from timestep t to an earlier t_prev, with (eps, x0) recovered from the model
output (ldm/schedule.py) and a_t = alphas_cumprod[t]:

    sigma  = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,     z ~ N(0, I)

eta = 0 is the deterministic DDIM sampler, eta = 1 is DDPM's posterior variance.

Timesteps use Stable Diffusion's "leading" spacing with offset 1, as diffusers' DDIMScheduler
(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False): with r = 1000 // steps,
t = r * (steps - 1) + 1, ..., r + 1, 1 and t_prev = t - r; below 0 the last step lands on
a_0 = alphas_cumprod[0], not on 1. When 1000 % steps != 0 this still takes exactly `steps`
steps (CompVis' make_ddim_timesteps takes one more).

Inversion runs the same update backwards, from t - r up to t, with the model queried at the
target t on the current (less noisy) sample, as diffusers' DDIMInverseScheduler does. (CompVis'
DDIMSampler.encode passed the loop index as the timestep: we do not.)

Classifier-free guidance (Ho & Salimans, 2022): out = out(uncond) + g * (out(cond) - out(uncond)),
with both halves in one batched call; applied to eps or v alike.
"""

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.schedule import NoiseSchedule, eps_and_x0

# denoise(x (B, C, H, W), t LongTensor (B,), context (B, L, D)) -> eps or v, (B, C, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1):
    """LongTensor (num_steps,), descending: r * (num_steps - 1) + offset, ..., r + offset, offset."""
    step_ratio = num_train_timesteps // num_steps if num_steps > 0 else 0
    if step_ratio == 0 or step_ratio * (num_steps - 1) + steps_offset >= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_timesteps - steps_offset}, got {num_steps}")
    return (torch.arange(num_steps) * step_ratio + steps_offset).flip(0)


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    """a_t, and a_0 for t < 0 (the step past the first timestep ends at a_0, not at 1)."""
    return float(schedule.alphas_cumprod[max(int(t), 0)])


def ddim_step(schedule: NoiseSchedule, model_output, t: int, t_prev: int, x_t,
              prediction_type: str = "epsilon", eta: float = 0.0, noise=None, generator=None):
    """x_t (B, C, H, W) at timestep t -> x at t_prev (the formula above).

    noise: the z of the eta term, shaped like x_t; drawn from `generator` when None and eta > 0.
    """
    a_t, a_prev = _alpha_bar(schedule, t), _alpha_bar(schedule, t_prev)
    eps, x0 = eps_and_x0(model_output, x_t, a_t, prediction_type)
    # (inversion calls this with t_prev > t and eta = 0, where the square root would be imaginary)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) if eta > 0 else 0.0
    x_prev = a_prev ** 0.5 * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    if sigma > 0:
        if noise is None:
            # draw where the generator lives, so a CPU seed gives the same image on any device
            device = generator.device if generator is not None else x_t.device
            noise = torch.randn(x_t.shape, generator=generator, device=device, dtype=x_t.dtype)
        x_prev = x_prev + sigma * noise.to(x_t.device)
    return x_prev


def _per_sample(context, batch: int):
    """A (1, L, D) context repeated for a batch of `batch`; (batch, L, D) as is."""
    return context.expand(batch, *context.shape[1:]) if context.shape[0] == 1 else context


def guided_output(denoise: Denoiser, x, t: int, cond, uncond=None, guidance: float = 7.5):
    """The model output at (x, t) under classifier-free guidance; a single call either way."""
    batch = x.shape[0]
    timesteps = torch.full((batch,), int(t), device=x.device, dtype=torch.long)
    cond = _per_sample(cond, batch)
    if guidance == 1.0:
        return denoise(x, timesteps, cond)
    if uncond is None:
        raise ValueError("guidance != 1 needs an unconditional context (encode the empty prompt)")
    uncond = _per_sample(uncond, batch)
    out_uncond, out_cond = denoise(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                                   torch.cat([uncond, cond])).chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


@torch.no_grad()
def sample(denoise: Denoiser, x_T, cond, uncond=None, guidance: float = 7.5,
           schedule: NoiseSchedule | None = None, steps: int = 50, eta: float = 0.0,
           generator: torch.Generator | None = None, prediction_type: str = "epsilon",
           progress: bool = True):
    """DDIM from pure noise x_T (B, C, h, w) to x_0 latents. cond / uncond: (B or 1, L, D).

    schedule: SD's scaled-linear one when None. generator: draws the eta > 0 noise.
    """
    schedule = schedule or NoiseSchedule()
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps)
    step_ratio = schedule.num_train_timesteps // steps
    x = x_T
    for t in tqdm(timesteps.tolist(), desc="DDIM", disable=not progress):
        out = guided_output(denoise, x, t, cond, uncond, guidance)
        x = ddim_step(schedule, out, t, t - step_ratio, x, prediction_type, eta, generator=generator)
    return x


@torch.no_grad()
def invert(denoise: Denoiser, x_0, cond, uncond=None, guidance: float = 1.0,
           schedule: NoiseSchedule | None = None, steps: int = 50,
           prediction_type: str = "epsilon", progress: bool = True):
    """DDIM inversion: clean latents x_0 (B, C, h, w) -> the x_T that `sample` (eta = 0) maps back
    to about x_0, for the same cond, guidance and steps. Guidance 1 inverts best (CoSINE uses it).
    """
    schedule = schedule or NoiseSchedule()
    timesteps = ddim_timesteps(steps, schedule.num_train_timesteps).flip(0)   # ascending
    step_ratio = schedule.num_train_timesteps // steps
    x = x_0
    for t in tqdm(timesteps.tolist(), desc="DDIM inversion", disable=not progress):
        # x sits at t - r (a_0 for the first step); the model is asked at t, the level we go to
        out = guided_output(denoise, x, t, cond, uncond, guidance)
        x = ddim_step(schedule, out, t - step_ratio, t, x, prediction_type)
    return x


PARALLEL_COSINE = 0.9995   # |cos(phi)| above this: sin(phi) is too small to divide by


def slerp(alpha: float, a, b):
    """Spherical interpolation, one angle per sample (a, b: (B, ...) flattened per sample, or (D,)):

        slerp = sin((1 - alpha) phi) / sin(phi) * a + sin(alpha phi) / sin(phi) * b,
        phi = arccos(<a, b> / (|a| |b|)).

    alpha = 0 gives a, 1 gives b; equal norms stay equal along the arc. CoSINE mixes an inverted
    z_T with fresh noise this way. Nearly (anti)parallel pairs fall back to lerp (sin(phi) ~ 0).
    """
    a, b = torch.broadcast_tensors(a, b)
    rows = a.shape[0] if a.ndim > 1 else 1
    rows_a, rows_b = a.reshape(rows, -1).double(), b.reshape(rows, -1).double()
    cos = (rows_a * rows_b).sum(1) / (rows_a.norm(dim=1) * rows_b.norm(dim=1))
    phi = torch.arccos(cos.clamp(-1, 1))
    weight_a = torch.sin((1 - alpha) * phi) / torch.sin(phi)
    weight_b = torch.sin(alpha * phi) / torch.sin(phi)
    near = cos.abs() > PARALLEL_COSINE
    weight_a = torch.where(near, torch.full_like(phi, 1 - alpha), weight_a)
    weight_b = torch.where(near, torch.full_like(phi, alpha), weight_b)
    shape = (-1,) + (1,) * max(a.ndim - 1, 0)
    return (weight_a.reshape(shape).to(a) * a + weight_b.reshape(shape).to(b) * b)
