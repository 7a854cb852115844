"""The Stable Diffusion autoencoder (KL-regularized, f = 8): images <-> latents.

Follows Rombach et al., 2022 (CompVis `ldm/models/autoencoder.py` and
`ldm/modules/diffusionmodules/model.py`). Attribute names equal the checkpoint keys under
`first_stage_model.`, so loading is prefix stripping + `load_state_dict(strict=True)`:

    encoder.conv_in, encoder.down.N.block.M, encoder.down.N.downsample.conv,
    encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out, quant_conv,
    post_quant_conv, decoder.conv_in, decoder.mid.*, decoder.up.N.block.M,
    decoder.up.N.upsample.conv, decoder.norm_out, decoder.conv_out

The decoder's `up.N` is indexed by resolution level like the encoder's `down.N` (up.0 is the
full-resolution level), though it runs them in reverse order. Every GroupNorm has eps 1e-6.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.unet import Upsample  # nearest x2, then a 3x3 conv: the same layer as the UNet's


@dataclass
class VAEConfig:
    """Field names are those of the CompVis yaml `first_stage_config.params(.ddconfig)`."""

    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256  # only places attn_resolutions (which are image sizes in pixels)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # levels with attention after each block (none in SD)
    scale_factor: float = 0.18215  # latents = scale_factor * z, so that latents have std ~1

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv `nin_shortcut` on x when the width
    changes. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())  # Identity has no weights, so no keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual. q, k, v and proj_out are
    1x1 convs, as stored in CompVis checkpoints (diffusers stores them as Linear).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C
        q, k, v = (t(h).flatten(2).transpose(1, 2)[:, None] for t in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv: H -> H/2 (CompVis' asymmetric
    padding; a symmetric pad of 1 would shift every latent by half a pixel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (one AttnBlock per block, or none),
    and a `downsample` / `upsample` when set."""

    def __init__(self, widths: list[int], attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(widths, widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(w) for w in widths[1:]) if attention else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1):
    the mean and log-variance of q(z | x), stacked on channels."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, resolution = c.ch, c.resolution
        for i, mult in enumerate(c.ch_mult):
            level = Level([width] + [c.ch * mult] * c.num_res_blocks, resolution in c.attn_resolutions)
            width = c.ch * mult
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(width)
                resolution //= 2
            self.down.append(level)
        self.mid = Mid(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, f h, f w)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        width = c.ch * c.ch_mult[-1]
        resolution = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = Mid(width)
        levels = []  # built coarse to fine, stored fine to coarse (checkpoint order)
        for i in reversed(range(len(c.ch_mult))):
            level = Level([width] + [c.ch * c.ch_mult[i]] * (c.num_res_blocks + 1),
                          resolution in c.attn_resolutions)
            width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
                resolution *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))); moments (B, 2C, h, w) split on channels.
    logvar is clamped to (-30, 20) as in CompVis, so std never under- or overflows."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (on the mean's device)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """encode: x (B, 3, H, W) in [-1, 1] -> q(z | x) over z (B, 4, H/8, W/8); decode: z -> x.
    encode_latents / decode_latents work in the diffusion model's scaled latent space."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        """scale_factor * z, z sampled from q(z | x) (or its mean when sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.config.scale_factor * z

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents."""
        return self.decode(latents / self.config.scale_factor)
