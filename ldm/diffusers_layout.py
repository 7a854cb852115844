"""The diffusers folder layout, renamed to CompVis names by explicit rules.

A diffusers Stable Diffusion folder holds unet/, vae/, text_encoder/ (each config.json + weights)
and tokenizer/. The same weights as a single file, under other names and, for the VAE's mid
attention, other shapes (Linear instead of 1x1 conv). This module maps names and configs; it
reads no files and never imports diffusers. ldm/checkpoint.py uses it to load folders, and the
spectral shift importer uses `diffusers_unet_name_to_compvis` for files trained on diffusers.

Errors are ValueError with a one-line message (the loader adds the path).
"""

import re

from ldm.family import FAMILIES, SUPPORTED
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

# inside a ResBlock (diffusers ResnetBlock2D -> CompVis ResBlock)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# inside the VAE's mid attention; older diffusers versions wrote query/key/value/proj_attn
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out", "query": "q", "key": "k", "value": "v",
                  "proj_attn": "proj_out"}
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
               "conv_out": "out.2"}
_BLOCK = re.compile(r"(?:(encoder|decoder)\.)?(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?"
                    r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)(.*)$")


def _rename_head(rest: str, table: dict) -> str:
    """Rename the leading component(s) of `rest` ('' or '.a.b...') by `table`."""
    for old, new in table.items():
        if rest == "." + old or rest.startswith("." + old + "."):
            return "." + new + rest[len(old) + 1:]
    return rest


def diffusers_unet_name_to_compvis(name: str, config: UNetConfig) -> str:
    """Module or parameter path in diffusers' UNet2DConditionModel -> the CompVis path.

    With n = num_res_blocks and L = len(channel_mult) levels:
        conv_in                         input_blocks.0.0
        time_embedding.linear_{1,2}     time_embed.{0,2}
        down_blocks.i.resnets.j         input_blocks.(1 + i(n+1) + j).0    (+ ResBlock names)
        down_blocks.i.attentions.j      input_blocks.(1 + i(n+1) + j).1
        down_blocks.i.downsamplers.0    input_blocks.((i+1)(n+1)).0        (conv -> op)
        mid_block.resnets.{0,1}         middle_block.{0,2};  mid_block.attentions.0  middle_block.1
        up_blocks.i.resnets.j           output_blocks.(i(n+1) + j).0
        up_blocks.i.attentions.j        output_blocks.(i(n+1) + j).1
        up_blocks.i.upsamplers.0        output_blocks.(i(n+1) + n).1, or .2 after a transformer
        conv_norm_out, conv_out         out.0, out.2
    ResBlock: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut -> in_layers.0 in_layers.2
    emb_layers.1 out_layers.0 out_layers.3 skip_connection. Names inside transformers
    (proj_in, transformer_blocks.0.attn2.to_k, ff.net.0.proj, ...) are the same in both."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    m = _BLOCK.match(name)
    if m is None or m.group(1):
        for old, new in _UNET_FIXED.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old):]
        raise ValueError(f"no CompVis name for diffusers UNet name {name!r}")
    _, block, i, kind, j, rest = m.groups()
    i, j = int(i or 0), int(j)
    if block == "mid_block":
        if kind == "attentions":
            return "middle_block.1" + rest
        return f"middle_block.{2 * j}" + _rename_head(rest, _RESNET)
    if kind == "downsamplers":
        return f"input_blocks.{(i + 1) * (n + 1)}.0" + _rename_head(rest, {"conv": "op"})
    if kind == "upsamplers":  # up_blocks.i is level L-1-i; a transformer there comes first
        after = 2 if 2 ** (levels - 1 - i) in config.attention_resolutions else 1
        return f"output_blocks.{i * (n + 1) + n}.{after}{rest}"
    where = (f"input_blocks.{1 + i * (n + 1) + j}" if block == "down_blocks"
             else f"output_blocks.{i * (n + 1) + j}")
    if kind == "attentions":
        return where + ".1" + rest
    return where + ".0" + _rename_head(rest, _RESNET)


def diffusers_vae_name_to_compvis(name: str, levels: int) -> str:
    """Parameter path in diffusers' AutoencoderKL -> CompVis. The decoder's up_blocks run from
    the deepest level while CompVis indexes decoder.up by level: up_blocks.i = up.(L-1-i).
        encoder.down_blocks.i.resnets.j          encoder.down.i.block.j
        encoder.down_blocks.i.downsamplers.0     encoder.down.i.downsample
        decoder.up_blocks.i.resnets.j            decoder.up.(L-1-i).block.j
        decoder.up_blocks.i.upsamplers.0         decoder.up.(L-1-i).upsample
        *.resnets.j.conv_shortcut                *.block.j.nin_shortcut
        *.mid_block.resnets.{0,1}                *.mid.block_{1,2}
        *.mid_block.attentions.0                 *.mid.attn_1  (group_norm to_q to_k to_v to_out.0
                                                                -> norm q k v proj_out)
        *.conv_norm_out                          *.norm_out"""
    m = _BLOCK.match(name)
    if m is None or not m.group(1):
        return re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", name)
    part, block, i, kind, j, rest = m.groups()
    i, j = int(i or 0), int(j)
    if block == "mid_block":
        if kind == "attentions":
            return f"{part}.mid.attn_1" + _rename_head(rest, _VAE_ATTENTION)
        return f"{part}.mid.block_{j + 1}" + _rename_head(rest, {"conv_shortcut": "nin_shortcut"})
    where = f"{part}.down.{i}" if block == "down_blocks" else f"{part}.up.{levels - 1 - i}"
    if kind == "downsamplers":
        return where + ".downsample" + rest
    if kind == "upsamplers":
        return where + ".upsample" + rest
    return f"{where}.block.{j}" + _rename_head(rest, {"conv_shortcut": "nin_shortcut"})


def unet_config(cfg: dict) -> tuple[UNetConfig, str]:
    """(UNetConfig, heads rule) from a diffusers unet/config.json. For SD its
    "attention_head_dim" is the number of heads (an int for SD 1, one per level for SD 2), a
    naming slip diffusers keeps for compatibility; "num_attention_heads" wins when set."""
    for key in ("class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim"):
        if cfg.get(key) is not None:
            raise ValueError(f"a UNet with {key} = {cfg[key]!r} (SDXL / unCLIP style); supported: "
                             f"{SUPPORTED} text-to-image")
    if cfg.get("norm_num_groups", 32) != 32:
        raise ValueError(f"UNet norm_num_groups {cfg['norm_num_groups']}; SD uses 32")
    widths = cfg["block_out_channels"]
    per_level = {}
    for key, default in (("layers_per_block", 2), ("transformer_layers_per_block", 1)):
        values = set(cfg.get(key, default) if isinstance(cfg.get(key), list)
                     else [cfg.get(key, default)])
        if len(values) != 1:
            raise ValueError(f"{key} differs between levels ({cfg[key]}): not a UNet of "
                             f"{SUPPORTED}")
        per_level[key] = values.pop()
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    if isinstance(heads, int):
        head_args, rule = dict(num_heads=heads), f"config: {heads} heads"
    else:
        dims = {w // h for w, h in zip(widths, heads)}
        if len(dims) != 1:
            raise ValueError(f"heads {heads} over widths {widths}: neither a fixed head count "
                             "nor a fixed head width")
        head_args = dict(num_heads=-1, num_head_channels=dims.pop())
        rule = f"config: {head_args['num_head_channels']} channels per head"
    config = UNetConfig(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        attention_resolutions=tuple(2 ** i for i, t in reversed(list(enumerate(
            cfg["down_block_types"]))) if t.startswith("CrossAttn")),  # CompVis order: (4, 2, 1)
        num_res_blocks=per_level["layers_per_block"], context_dim=cfg["cross_attention_dim"],
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        transformer_depth=per_level["transformer_layers_per_block"],
        upcast_attention=bool(cfg.get("upcast_attention", False)), **head_args)
    return config, rule


def vae_config(cfg: dict, latent_scale: float) -> VAEConfig:
    """VAEConfig from a diffusers vae/config.json (no attention inside levels, as diffusers'
    AutoencoderKL has none; embed_dim = z_channels = latent_channels); `latent_scale` (the
    family's) unless the config has a scaling_factor."""
    if not cfg.get("use_quant_conv", True) or cfg.get("norm_num_groups", 32) != 32:
        raise ValueError("a VAE without quant convs or with norm_num_groups != 32: not SD's")
    widths = cfg["block_out_channels"]
    return VAEConfig(embed_dim=cfg["latent_channels"], z_channels=cfg["latent_channels"],
                     in_channels=cfg["in_channels"], out_ch=cfg["out_channels"], ch=widths[0],
                     ch_mult=tuple(w // widths[0] for w in widths),
                     num_res_blocks=cfg["layers_per_block"], attn_resolutions=(),
                     scale_factor=cfg.get("scaling_factor", latent_scale))


def unet_state_dict(sd: dict, config: UNetConfig) -> dict:
    return {diffusers_unet_name_to_compvis(k, config): v for k, v in sd.items()}


def vae_state_dict(sd: dict, config: VAEConfig) -> dict:
    """Renamed, with the mid attention's Linear (out, in) weights as 1x1 convs (out, in, 1, 1)."""
    out = {}
    for k, v in sd.items():
        k = diffusers_vae_name_to_compvis(k, len(config.ch_mult))
        out[k] = v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v
    return out


def text_state_dict(sd: dict) -> dict:
    """HF CLIPTextModel keys as transformers 5 names them: transformers < 5 wrote a
    "text_model." level; position_ids is a buffer (often corrupt in merged files): dropped."""
    return {re.sub(r"^text_model\.", "", k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def detect_family(config: UNetConfig, hidden_act: str) -> tuple[str, str]:
    """(family name, rule): the family of that full-size context width (768: SD 1's CLIP ViT-L,
    1024: SD 2's OpenCLIP ViT-H); for other (tiny) widths, the family of that text activation,
    which tells the CLIP generations apart. ValueError when neither tells."""
    for found in FAMILIES.values():
        if found.context_dim == config.context_dim:
            rule = f"cross_attention_dim {config.context_dim}"
            break
    else:
        found = next((f for f in FAMILIES.values() if f.hidden_act == hidden_act), None)
        rule = f"text hidden_act {hidden_act}"
    if found is None:
        raise ValueError(f"cross_attention_dim {config.context_dim} and text hidden_act "
                         f"{hidden_act!r} match no family ({SUPPORTED})")
    return found.name, f"diffusers folder, {rule} -> {found.display_name}"
