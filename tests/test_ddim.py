"""ldm.schedule and ldm.ddim against diffusers' DDIMScheduler / DDIMInverseScheduler (the oracle),
built with the full Stable Diffusion scheduler config, and against float64 identities."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ldm.ddim import ddim_step, ddim_timesteps, guided_output, invert, sample, slerp
from ldm.schedule import NoiseSchedule

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                    clip_sample=False, timestep_spacing="leading")
STEP_COUNTS = [1, 7, 25, 50, 51, 999]
# diffusers keeps alphas_cumprod in float32 (relative error ~1e-6 vs our float64); x0 = x / sqrt(a)
# amplifies it up to ~15x at t = 999, so steps agree to ~1e-5 on unit-scale latents.
ATOL = 2e-5


def oracle(prediction_type="epsilon", inverse=False):
    cls = DDIMInverseScheduler if inverse else DDIMScheduler
    return cls(**SD_SCHEDULER, prediction_type=prediction_type)


def toy_denoiser(schedule, prediction_type="epsilon", data_std=0.8):
    """The exact posterior-mean predictor for data x0 ~ N(mu, data_std^2 I) with mu read from the
    context: smooth and deterministic, so DDIM inversion followed by sampling nearly round-trips."""
    def denoise(x, t, context):
        a = schedule.alphas_cumprod[t.cpu()].to(x).reshape(-1, 1, 1, 1)
        mu = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        centred = x - a.sqrt() * mu
        eps = (1 - a).sqrt() * centred / (a * data_std ** 2 + 1 - a)
        if prediction_type == "epsilon":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    return denoise


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_timesteps_match_diffusers(steps):
    scheduler = oracle()
    scheduler.set_timesteps(steps)
    assert torch.equal(ddim_timesteps(steps), scheduler.timesteps)


def test_timesteps_reject_impossible_counts():
    for steps in (0, 1000, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(steps)


def test_alphas_cumprod_match_diffusers():
    schedule = NoiseSchedule()
    assert schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(schedule.alphas_cumprod.float(), oracle().alphas_cumprod, rtol=2e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [7, 50])
def test_each_step_matches_diffusers(steps, eta, prediction_type):
    schedule, scheduler = NoiseSchedule(), oracle(prediction_type)
    scheduler.set_timesteps(steps)
    step_ratio = 1000 // steps
    gen = torch.Generator().manual_seed(steps)
    worst = 0.0
    for t in scheduler.timesteps.tolist():
        x, out, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        ours = ddim_step(schedule, out, t, t - step_ratio, x, prediction_type, eta, noise=noise)
        theirs = scheduler.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"ddim step steps={steps} eta={eta} {prediction_type}: max abs diff {worst:.2e}")
    assert worst <= ATOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_matches_diffusers_inverse_scheduler(prediction_type):
    schedule, scheduler = NoiseSchedule(), oracle(prediction_type, inverse=True)
    denoise = toy_denoiser(schedule, prediction_type)
    gen = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 6, generator=gen)
    scheduler.set_timesteps(25)
    x = x0
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(denoise(x, torch.full((2,), t), cond), t, x).prev_sample
    ours = invert(denoise, x0, cond, steps=25, prediction_type=prediction_type, progress=False)
    diff = (ours - x).abs().max().item()
    print(f"inversion {prediction_type}: max abs diff {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_sampling_loop_matches_diffusers(eta, prediction_type):
    """Whole loop: guidance 7.5 on eps or v, and the eta noise drawn from the same seeded generator."""
    schedule, scheduler = NoiseSchedule(), oracle(prediction_type)
    denoise = toy_denoiser(schedule, prediction_type)
    gen = torch.Generator().manual_seed(1)
    x_T, cond, uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 6, generator=gen), \
        torch.randn(1, 5, 6, generator=gen)
    scheduler.set_timesteps(20)
    x, gen = x_T, torch.Generator().manual_seed(7)
    for t in scheduler.timesteps.tolist():
        tt = torch.full((2,), t)
        out_u, out_c = denoise(x, tt, uncond.expand(2, -1, -1)), denoise(x, tt, cond)
        x = scheduler.step(out_u + 7.5 * (out_c - out_u), t, x, eta=eta, generator=gen).prev_sample
    ours = sample(denoise, x_T, cond, uncond, guidance=7.5, steps=20, eta=eta,
                  generator=torch.Generator().manual_seed(7), prediction_type=prediction_type,
                  progress=False)
    diff = (ours - x).abs().max().item()
    print(f"sampling loop eta={eta} {prediction_type}: max abs diff {diff:.2e}")
    assert diff <= ATOL


def test_guidance_batches_cond_and_uncond_in_one_call():
    calls = []

    def denoise(x, t, context):
        calls.append((x.shape[0], t.shape[0], context.shape[0]))
        return torch.zeros_like(x)

    x, cond, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 6), torch.randn(1, 5, 6)
    guided_output(denoise, x, 981, cond, uncond, guidance=7.5)
    guided_output(denoise, x, 981, cond, None, guidance=1.0)
    assert calls == [(6, 6, 6), (3, 3, 3)]
    with pytest.raises(ValueError):
        guided_output(denoise, x, 981, cond, None, guidance=7.5)


# Inversion queries the model at t on a sample that sits at t - r, so the round trip is exact only
# as steps -> infinity (error ~ 1 / steps). With v, the output is also converted to eps at the
# wrong level, which roughly triples the error. Measured at 50 steps: 1.7e-2 (eps), 5.1e-2 (v).
@pytest.mark.parametrize("prediction_type, tolerance", [("epsilon", 0.025), ("v_prediction", 0.07)])
def test_inversion_then_sampling_returns_to_start(prediction_type, tolerance):
    schedule = NoiseSchedule()
    denoise = toy_denoiser(schedule, prediction_type)
    gen = torch.Generator().manual_seed(2)
    x0, cond = 0.8 * torch.randn(2, 4, 8, 8, generator=gen) + 0.3, torch.full((2, 5, 6), 0.3)
    errors = []
    for steps in (50, 200):
        x_T = invert(denoise, x0, cond, steps=steps, prediction_type=prediction_type, progress=False)
        back = sample(denoise, x_T, cond, guidance=1.0, steps=steps, prediction_type=prediction_type,
                      progress=False)
        errors.append(((back - x0).norm() / x0.norm()).item())
        assert abs(x_T.std().item() - 1) < 0.1 and abs(x_T.mean().item()) < 0.1   # reached N(0, I)
    print(f"invert -> sample {prediction_type}: relative error {errors[0]:.2e} (50 steps), "
          f"{errors[1]:.2e} (200 steps)")
    assert errors[0] < tolerance
    assert errors[1] < errors[0] / 3                     # first order in the step size


def test_eta_noise_follows_the_generator():
    schedule = NoiseSchedule()
    denoise = toy_denoiser(schedule)
    x_T, cond = torch.randn(1, 4, 8, 8), torch.zeros(1, 5, 6)
    run = lambda seed: sample(denoise, x_T, cond, guidance=1.0, steps=10, eta=1.0,
                              generator=torch.Generator().manual_seed(seed), progress=False)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_add_noise_and_velocity_match_diffusers():
    schedule, scheduler = NoiseSchedule(), oracle("v_prediction")
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t),
                               rtol=0, atol=3e-6)
    torch.testing.assert_close(schedule.velocity(x0, noise, t), scheduler.get_velocity(x0, noise, t),
                               rtol=0, atol=3e-6)
    assert torch.equal(schedule.training_target(x0, noise, t, "epsilon"), noise)
    assert torch.equal(schedule.training_target(x0, noise, t, "v_prediction"), schedule.velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_eps_and_x0_inverts_the_forward_process(prediction_type):
    """float64 identity: the true target at x_t gives back exactly the noise and x0 that made x_t."""
    schedule = NoiseSchedule()
    x0, noise = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    t = torch.tensor([1, 400, 999])
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t, prediction_type)
    eps, x0_hat = schedule.to_eps_and_x0(target, x_t, t, prediction_type)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-10)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        schedule.training_target(x0, noise, t, "sample")


def test_fp16_coefficients_keep_precision_near_t0():
    """sqrt(1 - a_1) = 0.0327 must not be computed from a rounded fp16 a_1 (which gives ~0.03)."""
    schedule = NoiseSchedule()
    x0, noise = torch.zeros(1, 1, 1, 1, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16)
    got = schedule.add_noise(x0, noise, torch.tensor([1])).item()
    assert abs(got - (1 - schedule.alphas_cumprod[1].item()) ** 0.5) < 1e-4


def test_slerp_identities():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)   # equal norms
    torch.testing.assert_close(slerp(0.0, a, b), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=0, atol=1e-6)
    for alpha in (0.25, 0.5, 0.9):
        mid = slerp(alpha, a, b)
        torch.testing.assert_close(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        # float64 formula on one sample, as an independent check of the per-sample angle
        a0, b0 = a[1].double().flatten(), b[1].double().flatten()
        phi = torch.arccos(a0 @ b0 / (a0.norm() * b0.norm()))
        want = (torch.sin((1 - alpha) * phi) * a0 + torch.sin(alpha * phi) * b0) / torch.sin(phi)
        torch.testing.assert_close(mid[1].double().flatten(), want, rtol=0, atol=1e-5)
    # nearly parallel: plain lerp instead of 0/0
    torch.testing.assert_close(slerp(0.3, a, 2 * a), 0.7 * a + 0.6 * a, rtol=0, atol=1e-6)
