"""The independent oracle for parity tests: diffusers' models, filled with our weights through
diffusers' own single-file converters (`diffusers.loaders.single_file_utils`).

Our modules carry CompVis names, so `our.state_dict()` with the checkpoint prefix is exactly the
layout of an SD single file; diffusers converts that to its own layout, which must then load
strictly into its own model. Used by tests only (diffusers is never imported at run time).

    from oracle import diffusers_unet, diffusers_vae
    theirs = diffusers_unet(our_unet)           # UNet2DConditionModel, same weights, eval mode
    theirs(x, t, encoder_hidden_states=context).sample
"""

from __future__ import annotations

import warnings

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu

from ldm.unet import UNetConfig, UNetModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _original_config(unet: UNetConfig | None = None, vae: VAEConfig | None = None) -> dict:
    """The parts of a CompVis yaml (as a dict) that diffusers' config builders read."""
    ddconfig = {"ch_mult": [1, 2, 4, 4]}  # SD's; the UNet builder only reads the latent factor
    if vae is not None:
        ddconfig = {"in_channels": vae.in_channels, "out_ch": vae.out_ch, "ch": vae.ch,
                    "ch_mult": list(vae.ch_mult), "z_channels": vae.z_channels,
                    "num_res_blocks": vae.num_res_blocks,
                    "attn_resolutions": list(vae.attn_resolutions), "resolution": vae.resolution}
    params = {"first_stage_config": {"params": {"ddconfig": ddconfig}}}
    if vae is not None:
        params["scale_factor"] = vae.scale_factor
    if unet is not None:
        unet_params = {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": unet.model_channels,
            "attention_resolutions": list(unet.attention_resolutions),
            "num_res_blocks": unet.num_res_blocks, "channel_mult": list(unet.channel_mult),
            "context_dim": unet.context_dim, "transformer_depth": unet.transformer_depth,
            "use_linear_in_transformer": unet.use_linear_in_transformer,
        }
        # SD 2 yamls name num_head_channels and leave num_heads out; the builder keys on that
        if unet.num_heads != -1:
            unet_params["num_heads"] = unet.num_heads
        else:
            unet_params["num_head_channels"] = unet.num_head_channels
        params["unet_config"] = {"params": unet_params}
    return {"model": {"params": params}}


def diffusers_unet_config(config: UNetConfig, image_size: int = 512) -> dict:
    """UNet2DConditionModel kwargs from diffusers' `create_unet_diffusers_config_from_ldm`."""
    with warnings.catch_warnings():  # passing image_size is deprecated but avoids type sniffing
        warnings.simplefilter("ignore")
        out = sfu.create_unet_diffusers_config_from_ldm(_original_config(unet=config), None,
                                                        image_size=image_size)
    if out["attention_head_dim"] is None:
        # the builder only derives per-level heads for linear projections; diffusers'
        # "attention_head_dim" is a head count, so give it ours for other combinations
        out["attention_head_dim"] = [config.heads_at(config.model_channels * m)[0]
                                     for m in config.channel_mult]
    out["upcast_attention"] = config.upcast_attention
    return out


def diffusers_vae_config(config: VAEConfig) -> dict:
    """diffusers AutoencoderKL kwargs from diffusers' `create_vae_diffusers_config_from_ldm`."""
    if config.attn_resolutions:
        raise ValueError("diffusers' AutoencoderKL has no attention inside VAE levels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sfu.create_vae_diffusers_config_from_ldm(_original_config(vae=config), {},
                                                       image_size=config.resolution)
    if config.embed_dim != config.z_channels:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, in place: zero-initialized output layers and unit norms would
    hide mistakes. Norm scales 1 + 0.1 N(0, 1) and weights N(0, 1/fan_in) keep activations
    O(1), so float32 rounding is not amplified layer after layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)
    return module


def checkpoint_state_dict(module: torch.nn.Module, prefix: str) -> dict:
    """Our state dict under a single-file checkpoint prefix."""
    return {prefix + k: v for k, v in module.state_dict().items()}


def convert_unet(state_dict: dict, config: UNetConfig) -> dict:
    """CompVis-layout (prefixed) UNet state dict -> diffusers layout, by diffusers' converter."""
    return sfu.convert_ldm_unet_checkpoint(state_dict, diffusers_unet_config(config))


def convert_vae(state_dict: dict, config: VAEConfig) -> dict:
    """CompVis-layout (prefixed) VAE state dict -> diffusers layout, by diffusers' converter."""
    return sfu.convert_ldm_vae_checkpoint(state_dict, diffusers_vae_config(config))


def diffusers_unet(unet: UNetModel) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel holding `unet`'s weights (strict load), eval mode."""
    model = UNet2DConditionModel(**diffusers_unet_config(unet.config))
    converted = convert_unet(checkpoint_state_dict(unet, UNET_PREFIX), unet.config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_vae(vae: ldm.vae.AutoencoderKL) -> AutoencoderKL:
    """diffusers' AutoencoderKL holding `vae`'s weights (strict load), eval mode."""
    model = AutoencoderKL(**diffusers_vae_config(vae.config))
    converted = convert_vae(checkpoint_state_dict(vae, VAE_PREFIX), vae.config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
