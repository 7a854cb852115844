"""A Stable Diffusion model: the three networks, the noise schedule and the conventions that
came with the checkpoint (family, prediction type), plus text-to-image generation.

    prompts --text_encoder--> context (B, 77, D)
    x_T ~ N(0, I) (B, 4, H/f, W/f) --DDIM over unet, classifier-free guidance--> latents x_0
    latents --vae.decode_latents--> images (B, 3, H, W) in [-1, 1] -> [0, 1]

f = 2 ** (len(vae.config.ch_mult) - 1) (8 for SD). ldm/checkpoint.py builds these from files.
"""

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch

from ldm import ddim
from ldm.rules import TOY_PRETRAIN
from ldm.schedule import NoiseSchedule
from ldm.text import TextEncoder
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL


def usable_device(name: str) -> torch.device:
    """torch.device(name), or ValueError with a one-line message (for the CLIs' --device) when
    the name is not a device or names CUDA on a machine without it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return device


def state_dict_fingerprint(state_dict: dict) -> str:
    """Hex digest (blake2b, 128 bits) of names, shapes and up to 4096 evenly strided values per
    tensor (as float32, so an fp16 and an fp32 load of one file agree). Reads ~16 KB per tensor,
    so a 4 GB model takes a fraction of a second. Tells base models apart; not a tamper check."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096]
        kind = torch.float32 if tensor.is_floating_point() else torch.int64
        digest.update(sample.to("cpu", kind).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StableDiffusion:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: NoiseSchedule
    family: str  # a key of ldm.family.FAMILIES
    prediction_type: str  # "epsilon" | "v_prediction"
    decided_by: dict[str, str] = field(default_factory=dict)  # what -> the rule that decided it
    source: str = ""  # the file or folder it was loaded from
    image_size: int | None = None  # default size of generated images; None: the VAE's
    # training resolution (vae.config.resolution), right for models built here; the loader
    # sets SD's own (512 / 768) by convention
    made_by: str | None = None  # the program that made the model when its file says so
    # (ldm.rules.MADE_BY_KEYS: "train.toy.pretrain" for the bundled toy model and its copies);
    # None for real SD files. Pick defaults by this, not by the file's path

    def __post_init__(self):
        if self.image_size is None:
            self.image_size = self.vae.config.resolution

    @property
    def default_guidance(self) -> float:
        """The classifier-free guidance scale the model is meant to be sampled with: SD's usual
        7.5; 4 for the bundled toy model, whose sample grids were tuned at 4."""
        return 4.0 if self.made_by == TOY_PRETRAIN else 7.5

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move (and cast) the networks in place; returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.unet.parameters(), self.unet.buffers())).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype: the floating dtype that holds most of its numbers. (Not
        simply the first parameter's: spectral layers keep weights as base-dtype buffers and
        only their float32 shifts as parameters.)"""
        counts = Counter()
        for tensor in itertools.chain(self.unet.parameters(), self.unet.buffers()):
            if tensor.is_floating_point():
                counts[tensor.dtype] += tensor.numel()
        return counts.most_common(1)[0][0]

    def base_fingerprint(self) -> str:
        """Identifies the UNet + text-encoder weights that spectral shifts are trained on and
        apply to (the VAE is not shifted, so it is left out): the state_dict_fingerprint of both,
        under "unet." and "text." names. Shift files carry it; a file for another base is
        refused. Changing what it hashes orphans every shift file already written."""
        state = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        state.update({f"text.{k}": v for k, v in self.text_encoder.state_dict().items()})
        return state_dict_fingerprint(state)

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """What an image side must be a multiple of: the VAE's factor times the UNet's halvings."""
        return self.latent_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) text context on the model's device, in the UNet's dtype."""
        return self.text_encoder.encode(list(prompts)).to(self.device, self.dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The network output (eps or v, per prediction_type) for latents x (B, 4, h, w), in
        float32 (the sampler's arithmetic stays float32 under fp16 weights)."""
        return self.unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    @torch.no_grad()
    def generate(self, prompts: list[str], negative_prompt: str = "", steps: int = 25,
                 guidance: float = 7.5, eta: float = 0.0, seed: int | None = None,
                 generator: torch.Generator | None = None, height: int | None = None,
                 width: int | None = None, progress: bool = True,
                 batch_size: int | None = None) -> torch.Tensor:
        """Text to image with DDIM and classifier-free guidance:
        out = out(uncond) + guidance * (out(cond) - out(uncond)), uncond = the negative prompt.
        Returns images (B, 3, H, W) in [0, 1], float32 on the model's device. The starting noise
        is drawn on the CPU from `generator` (or a fresh one seeded with `seed`), so a seed gives
        the same images on every device. batch_size: at most that many prompts at a time, the
        batches drawing one after another from the same generator."""
        height, width = height or self.image_size, width or self.image_size
        f = self.latent_factor
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size must be a multiple of {self.size_multiple}, got {height}x{width}")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()  # a random seed, not torch's fixed default
            else:
                generator.manual_seed(seed)
        prompts = list(prompts)
        if batch_size and len(prompts) > batch_size:
            return torch.cat([self.generate(prompts[i:i + batch_size], negative_prompt, steps, guidance,
                                            eta, generator=generator, height=height, width=width,
                                            progress=progress)
                              for i in range(0, len(prompts), batch_size)])
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt] * len(prompts)) if guidance != 1 else None
        shape = (len(prompts), self.vae.config.embed_dim, height // f, width // f)
        x_T = torch.randn(shape, generator=generator).to(self.device)  # float32
        latents = ddim.sample(self.denoise, x_T, cond, uncond=uncond, guidance=guidance,
                              schedule=self.schedule, steps=steps, eta=eta, generator=generator,
                              prediction_type=self.prediction_type, progress=progress)
        return self.decode(latents)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/f, W/f), float32: scale_factor times
        the mean of q(z | x), the deterministic encoding (what DDIM inversion starts from)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode_latents(images.to(self.device, vae_dtype), sample=False)
        return latents.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1], float32."""
        images = self.vae.decode_latents(latents.to(next(self.vae.parameters()).dtype))
        return ((images.float() + 1) / 2).clamp(0, 1)
