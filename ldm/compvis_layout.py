"""The CompVis single-file layout, read from keys and tensor shapes alone: which family a file is
(or what else it is), and the UNet and VAE configs its shapes imply.

    model.diffusion_model.*                 UNet        -> ldm.unet.UNetModel  (same names)
    first_stage_model.*                     VAE         -> ldm.vae.AutoencoderKL (same names)
    cond_stage_model.transformer.*          SD 1 text   (HF CLIP names)   -> ldm.text
    cond_stage_model.model.*                SD 2 text   (OpenCLIP names)  -> ldm.text

The text prefixes, and whatever shapes cannot tell (heads, latent scale), come from the family
table (ldm.family). Reads no files; ldm/checkpoint.py does. Errors are CheckpointError with a
one-line message.
"""

import re

from ldm.family import FAMILIES, SUPPORTED
from ldm.files import CheckpointError
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def detect_family(state_dict: dict) -> tuple[str, str]:
    """(family name, the rule that decided), or CheckpointError naming what was found instead.
    state_dict: single-file (CompVis) names."""
    _refuse_other_models(state_dict)
    context = next((v.shape[1] for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")),
                   None)
    for family in FAMILIES.values():
        if any(k.startswith(family.text_prefix) for k in state_dict):
            return family.name, (f"{family.text_encoder} text keys ({family.text_prefix}*) and "
                                 f"context_dim {context} -> {family.display_name}")
    raise CheckpointError("a UNet and VAE without a text encoder (no cond_stage_model.* keys)")


def _refuse_other_models(state_dict: dict) -> None:
    """CheckpointError saying what the file is when it is not a text-to-image SD base model."""
    keys = list(state_dict)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    lora = [k for k in keys if re.search(r"(^|[._])lora[._]|lora_(up|down|A|B)\b", k)]
    if lora:
        raise CheckpointError(f"a LoRA file ({len(lora)} LoRA keys such as {lora[0]!r}), not a "
                              "base model")
    if has("conditioner.embedders."):
        raise CheckpointError(f"an SDXL checkpoint (conditioner.embedders.* keys); supported: "
                              f"{SUPPORTED}")
    if has("control_model."):
        raise CheckpointError("a ControlNet (control_model.* keys), not a base model")
    if has("embedder.") or has("noise_augmentor.") or has(UNET_PREFIX + "label_emb."):
        raise CheckpointError("an image/class-conditioned UNet (unCLIP or SDXL: label_emb / "
                              f"embedder keys); supported: {SUPPORTED} text-to-image")
    if not has(UNET_PREFIX):
        if "conv_in.weight" in state_dict and has("down_blocks."):
            what = "a diffusers UNet weights file alone (load the whole diffusers folder instead)"
        elif has("encoder.conv_in.") or (has(VAE_PREFIX) and not has("cond_stage_model.")):
            what = "a VAE-only file"
        elif has("cond_stage_model.") or has("text_model.") or has("embeddings.token_embedding"):
            what = "a text-encoder-only file"
        elif has("string_to_param") or has("emb_params"):
            what = "a textual-inversion embedding"
        else:
            what = "no Stable Diffusion UNet keys (model.diffusion_model.*); first keys: " + \
                   ", ".join(keys[:3])
        raise CheckpointError(what)
    first_conv = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is None:
        raise CheckpointError(f"incomplete checkpoint (no {UNET_PREFIX}input_blocks.0.0.weight)")
    in_channels = first_conv.shape[1]
    special = {9: "an inpainting model", 5: "a depth-conditioned model", 7: "an upscaler",
               8: "an InstructPix2Pix model"}
    if in_channels != 4:
        raise CheckpointError(f"{special.get(in_channels, 'an unsupported UNet')} (UNet "
                              f"in_channels {in_channels}, text-to-image models have 4)")
    if not has(VAE_PREFIX):
        raise CheckpointError("a UNet without its VAE (no first_stage_model.* keys)")


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys 'prefix.N.…'."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def unet_config_from_state_dict(sd: dict, family: str) -> tuple[UNetConfig, str]:
    """(UNetConfig, rule) from the shapes of a (prefix-stripped) CompVis UNet state dict; heads and
    attention precision follow the family (SD 1: 8 heads, SD 2: 64 channels per head, fp32)."""
    first = sd["input_blocks.0.0.weight"]  # (model_channels, in_channels, 3, 3)
    ch = first.shape[0]
    blocks = _indices(sd, "input_blocks")
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    num_res_blocks = (downsamples[0] if downsamples else len(blocks)) - 1
    levels = len(blocks) // (num_res_blocks + 1)
    channel_mult, attention_resolutions, depths = [], [], set()
    for level in range(levels):
        first_block = 1 + level * (num_res_blocks + 1)
        channel_mult.append(sd[f"input_blocks.{first_block}.0.out_layers.3.weight"].shape[0] // ch)
        if f"input_blocks.{first_block}.1.norm.weight" in sd:
            attention_resolutions.append(2 ** level)
            depths.add(len(_indices(sd, f"input_blocks.{first_block}.1.transformer_blocks")))
    depths.add(len(_indices(sd, "middle_block.1.transformer_blocks")))
    if len(depths) != 1:
        raise CheckpointError(f"transformer depth differs between levels ({sorted(depths)}): "
                              f"not a UNet of {SUPPORTED}")
    conventions = FAMILIES[family]
    config = UNetConfig(
        in_channels=first.shape[1], out_channels=sd["out.2.weight"].shape[0], model_channels=ch,
        attention_resolutions=tuple(reversed(attention_resolutions)), num_res_blocks=num_res_blocks,
        channel_mult=tuple(channel_mult), context_dim=sd["middle_block.1.transformer_blocks.0"
                                                         ".attn2.to_k.weight"].shape[1],
        use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
        transformer_depth=depths.pop(), **conventions.unet_heads())
    return config, "shapes; heads by convention: " + conventions.heads_rule


def vae_config_from_state_dict(sd: dict, family: str) -> VAEConfig:
    """VAEConfig from the shapes of a (prefix-stripped) CompVis VAE state dict; the latent scale
    is the family's (SD: 0.18215) and attention inside levels assumes CompVis' resolution 256."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _indices(sd, "encoder.down")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    attn = tuple(256 // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.norm.weight" in sd)
    return VAEConfig(embed_dim=sd["post_quant_conv.weight"].shape[1],
                     z_channels=sd["decoder.conv_in.weight"].shape[1], resolution=256,
                     in_channels=sd["encoder.conv_in.weight"].shape[1],
                     out_ch=sd["decoder.conv_out.weight"].shape[0], ch=ch, ch_mult=ch_mult,
                     num_res_blocks=len(_indices(sd, "encoder.down.0.block")),
                     attn_resolutions=attn, scale_factor=FAMILIES[family].latent_scale)
