"""The forward (noising) process of Stable Diffusion: the scaled-linear beta schedule.

DDPM (Ho et al., 2020) noises a clean latent x0 in one jump:

    x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps,     eps ~ N(0, I),
    a_t = prod_{s <= t} (1 - beta_s)                  ("alphas_cumprod", alpha-bar)

Stable Diffusion uses 1000 steps with betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
("scaled linear"). A network predicts either eps ("epsilon", SD 1.x and SD 2 base) or the
velocity of Salimans & Ho (2022), v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 ("v_prediction",
SD 2 768-v models). Either output, with x_t, gives back both eps and x0; the samplers in
ldm/ddim.py only ever need that pair.

alphas_cumprod is kept in float64 on the CPU; coefficients are cast to the data's dtype and
device at the point of use, so fp16 / GPU tensors never change the schedule itself.
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def eps_and_x0(model_output, x_t, alpha_bar, prediction_type: str):
    """Recover (eps, x0) from a model output at a noise level alpha_bar.

    alpha_bar: a python float, or a float64 tensor that broadcasts against x_t (e.g. (B, 1, 1, 1)).
        epsilon:      eps = out;                             x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
        v_prediction: eps = sqrt(a) v + sqrt(1-a) x_t;       x0 = sqrt(a) x_t - sqrt(1-a) v
    """
    # square roots in float64 first: in fp16, 1 - a for a = 0.99915 would lose most digits
    sqrt_a, sqrt_one_minus_a = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if torch.is_tensor(alpha_bar):
        sqrt_a = sqrt_a.to(device=x_t.device, dtype=x_t.dtype)
        sqrt_one_minus_a = sqrt_one_minus_a.to(device=x_t.device, dtype=x_t.dtype)
    if prediction_type == "epsilon":
        return model_output, (x_t - sqrt_one_minus_a * model_output) / sqrt_a
    if prediction_type == "v_prediction":
        eps = sqrt_a * model_output + sqrt_one_minus_a * x_t
        return eps, sqrt_a * x_t - sqrt_one_minus_a * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class NoiseSchedule:
    """SD's scaled-linear schedule. Defaults are the SD 1.x / 2.x training values."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012):
        self.num_train_timesteps = num_train_timesteps
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                    dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)   # (T,) float64, CPU

    def alpha_bar(self, t, ndim: int = 4):
        """a_t as float64 on the CPU: shaped (B, 1, ..., 1) with `ndim` dims for t (B,), a float for an int."""
        if torch.is_tensor(t) and t.ndim:
            return self.alphas_cumprod[t.long().cpu()].reshape(-1, *([1] * (ndim - 1)))
        return float(self.alphas_cumprod[int(t)])

    def _sqrt_coefficients(self, t, like):
        """(sqrt(a_t), sqrt(1 - a_t)), computed in float64, cast to `like`'s dtype and device."""
        a = torch.as_tensor(self.alpha_bar(t, like.ndim), dtype=torch.float64)
        return (a.sqrt().to(device=like.device, dtype=like.dtype),
                (1 - a).sqrt().to(device=like.device, dtype=like.dtype))

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise: (B, C, H, W); t: LongTensor (B,)."""
        sqrt_a, sqrt_one_minus_a = self._sqrt_coefficients(t, x0)
        return sqrt_a * x0 + sqrt_one_minus_a * noise

    def velocity(self, x0, noise, t):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (the v-prediction target)."""
        sqrt_a, sqrt_one_minus_a = self._sqrt_coefficients(t, x0)
        return sqrt_a * noise - sqrt_one_minus_a * x0

    def training_target(self, x0, noise, t, prediction_type: str):
        """What the network should output for x_t = add_noise(x0, noise, t): noise or velocity."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def to_eps_and_x0(self, model_output, x_t, t, prediction_type: str):
        """(eps, x0) predicted by `model_output` at x_t, timestep t (LongTensor (B,) or int)."""
        return eps_and_x0(model_output, x_t, self.alpha_bar(t, x_t.ndim), prediction_type)
