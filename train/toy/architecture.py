"""The bundled model's architecture: Stable Diffusion 1's layout at tiny width, built from the
settings of train.toy.pretrain (its PretrainConfig), and checked before a run starts.

    vae = build_vae(config)                        # AutoencoderKL: 32x32x3 -> 4 x 16x16 at f = 2
    unet, text = build_unet_and_text(config, "weights/tokenizer")
    model = bundle(vae, unet, text)                # a StableDiffusion, as ldm.checkpoint loads one
    check_architecture(config)                     # ValueError (one line) for widths that do not fit

Widths must suit GroupNorm's 32 groups, heads must divide widths, and every level must keep at
least a few pixels: rules spread over ldm/'s classes, so the check builds the VAE and the UNet
on the meta device (shapes only, no memory, well under a second) and runs one image through.
"""
import warnings

import torch

from ldm.family import FAMILIES
from train.toy import world

SD1 = FAMILIES["sd1"]   # the bundled model has SD 1's layout and conventions


def build_vae(config):
    from ldm.vae import AutoencoderKL, VAEConfig
    return AutoencoderKL(VAEConfig(resolution=world.SIZE, ch=config.vae_ch,
                                   ch_mult=config.vae_ch_mult, num_res_blocks=config.vae_res_blocks))


def build_unet(config):
    from ldm.unet import UNetConfig, UNetModel
    return UNetModel(UNetConfig(
        model_channels=config.model_channels, channel_mult=config.channel_mult,
        attention_resolutions=config.attention_resolutions, num_res_blocks=config.num_res_blocks,
        num_heads=config.num_heads, context_dim=config.text_width))


def build_unet_and_text(config, tokenizer_dir):
    from ldm.text import TextEncoder, load_tokenizer
    from transformers import CLIPTextConfig
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=77, hidden_act=SD1.hidden_act, projection_dim=config.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=SD1.pad_token_id(tokenizer.eos_token_id))
    text = TextEncoder.for_family(SD1.name, tokenizer, config=text_config)
    return build_unet(config), text


def bundle(vae, unet, text):
    from ldm.model import StableDiffusion
    from ldm.schedule import NoiseSchedule
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text, schedule=NoiseSchedule(), family=SD1.name,
        prediction_type="epsilon", source="train.toy.pretrain", image_size=world.SIZE,
        decided_by={"family": "written by train.toy.pretrain (SD 1 layout, CLIPTextModel)",
                    "prediction_type": "trained with the epsilon target"})


def check_architecture(config) -> None:
    """ValueError with one line unless the VAE and the UNet these settings describe take a toy
    image and its latent (the text encoder's one rule, width divisible by heads, is checked
    directly: building it needs the tokenizer, which the run writes)."""
    if config.text_width % config.text_heads:
        raise ValueError(f"--text-width {config.text_width} must be a multiple of --text-heads "
                         f"{config.text_heads}")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # e.g. zero-element tensors: the error says more
            vae, unet = build_vae(config), build_unet(config)
            latent = vae.encode(torch.zeros(1, 3, world.SIZE, world.SIZE)).mode()
            vae.decode(latent)
            unet(latent, torch.zeros(1, dtype=torch.long), torch.zeros(1, 77, config.text_width))
    except Exception as error:  # whatever rule of ldm/'s classes the settings break
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the VAE / UNet settings do not fit together: {first}") from None
