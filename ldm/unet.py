"""The Stable Diffusion 1.x / 2.x denoising UNet, eps_theta(z_t, t, c).

Follows the latent diffusion UNet of Rombach et al., 2022 (CompVis `openaimodel.py`, itself the
ADM UNet of Dhariwal & Nichol, 2021, with a text-conditioned transformer at each attention level).
Module attribute names equal the CompVis checkpoint keys, so the `model.diffusion_model.*` part
of an SD checkpoint loads with `load_state_dict(strict=True)` after stripping the prefix:

    time_embed.{0,2}                      timestep MLP
    input_blocks.N.0                      ResBlock, or the first conv (N=0), or Downsample (.op)
    input_blocks.N.1                      SpatialTransformer at attention levels
    middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.{0,1,2}               ResBlock, [SpatialTransformer], [Upsample (.conv)]
    out.{0,2}                             GroupNorm, SiLU, conv to the output channels

Spatial sizes must be multiples of 2 ** (len(channel_mult) - 1) (8 for SD: latents of 64x64).
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    """Field names are those of the CompVis yaml `unet_config.params`."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get attention
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # heads per transformer (SD 1); -1 when num_head_channels is used
    num_head_channels: int = -1  # channels per head (SD 2: 64); -1 when num_heads is used
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # proj_in/proj_out: Linear (SD 2) or 1x1 conv (SD 1)
    transformer_depth: int = 1
    upcast_attention: bool = False  # attention in fp32 (SD 2.1 overflows in fp16 otherwise)

    def __post_init__(self):
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.channel_mult = tuple(self.channel_mult)
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels (the other to -1)")

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """SD 1.x (v1-inference.yaml): 8 heads, CLIP ViT-L/14 context of 768, conv projections."""
        return cls()

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """SD 2.x (v2-inference(-v).yaml): 64-channel heads, OpenCLIP ViT-H context of 1024,
        linear projections; attention upcast to fp32 as in the released SD 2.1 configs."""
        return cls(num_heads=-1, num_head_channels=64, context_dim=1024,
                   use_linear_in_transformer=True, upcast_attention=True)

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer working at `channels` width."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def heads_text(self) -> str:
        """"8 heads" or "64 channels per head": whichever of the two the config fixes."""
        if self.num_head_channels == -1:
            return f"{self.num_heads} heads"
        return f"{self.num_head_channels} channels per head"


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos(t w_i), sin(t w_i)] with
    w_i = max_period ** (-i / (dim/2)), i = 0 .. dim/2 - 1 (cos first, as CompVis). Float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); out = skip(x) + conv(SiLU(GN(h))).
    x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels),  # .0 (eps 1e-5)
            nn.SiLU(),  # .1
            nn.Conv2d(channels, out_channels, 3, padding=1),  # .2
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))  # .1
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),  # .0
            nn.SiLU(),  # .1
            nn.Identity(),  # .2 was Dropout (p=0 in every SD config); kept so the conv is .3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),  # .3
        )
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V, self (context None) or cross.
    x: (B, Lq, C), context: (B, Lk, C_ctx) -> (B, Lq, C).

    `attention_probe`: when set to a callable f, the probabilities are computed explicitly and
    f(self, probs) is called with probs (B, heads, Lq, Lk) (differentiable, e.g. for an
    attention loss); when None, fused scaled_dot_product_attention runs and nothing is kept.
    Under gradient checkpointing the probe is called again during the backward recompute."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # .1 was Dropout(0)
        self.attention_probe: Callable[[nn.Module, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, Lq, _ = x.shape
        # (B, L, heads*d) -> (B, heads, L, d): a view, as SDPA takes strided inputs
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype = q.dtype
        if self.upcast:  # at least fp32 (a float64 model stays float64)
            wide = torch.promote_types(dtype, torch.float32)
            q, k, v = q.to(wide), k.to(wide), v.to(wide)
        if self.attention_probe is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            self.attention_probe(self, probs)
            out = probs @ v
        out = out.to(dtype).transpose(1, 2).reshape(B, Lq, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GLU with a GELU gate (Shazeer, 2020): a, g = proj(x).chunk(2); a * gelu(g), exact GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # .0 GEGLU, .1 was Dropout(0), .2 the output Linear
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, GEGLU MLP; each residual.
    x: (B, L, C), context: (B, Lk, C_ctx) -> (B, L, C)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), proj_in, `depth` transformer blocks over the H*W tokens, proj_out,
    residual. proj_in/out are 1x1 convs (SD 1) or Linear on the tokens (SD 2): the same map,
    stored with different weight shapes. x: (B, C, H, W), context: (B, Lk, C_ctx) -> same."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        heads, dim_head = config.heads_at(channels)
        inner = heads * dim_head
        self.linear = config.use_linear_in_transformer
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, config.context_dim, config.upcast_attention)
            for _ in range(config.transformer_depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, H*W, C) tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Sequential):
    """One `input_blocks.N` / `middle_block` / `output_blocks.N`: a sequence whose layers take
    what they need of (x, emb, context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps_theta (or v_theta): x (B, in, H, W), timesteps (B,) long or float, context (B, L, ctx)
    -> (B, out, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # set by trainers: recompute each block in backward
        ch = config.model_channels
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        def level(channels: int, ds: int, *layers: nn.Module) -> Block:
            if ds in config.attention_resolutions:
                layers = (layers[0], SpatialTransformer(channels, config), *layers[1:])
            return Block(*layers)

        # Encoder: res blocks per level, a strided conv between levels; remember each output width
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels, width, ds = [ch], ch, 1
        for i, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.input_blocks.append(level(mult * ch, ds, ResBlock(width, emb, mult * ch)))
                width = mult * ch
                skip_channels.append(width)
            if i != len(config.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(width)))
                skip_channels.append(width)
                ds *= 2
        self.middle_block = Block(ResBlock(width, emb, width), SpatialTransformer(width, config),
                                  ResBlock(width, emb, width))

        # Decoder: one more res block per level than the encoder, each eating one skip; the last
        # block of a level upsamples (its transformer still runs at the level's resolution)
        self.output_blocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(config.channel_mult))):
            for j in range(config.num_res_blocks + 1):
                layers = [ResBlock(width + skip_channels.pop(), emb, mult * ch)]
                width = mult * ch
                if i and j == config.num_res_blocks:
                    layers.append(Upsample(width))
                self.output_blocks.append(level(width, ds, *layers))
            ds //= 2
        self.out = nn.Sequential(nn.GroupNorm(32, width), nn.SiLU(),
                                 nn.Conv2d(width, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _run(self, block: Block, *args: torch.Tensor) -> torch.Tensor:
        # checkpointing keeps only each block's inputs and recomputes the block in backward
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
