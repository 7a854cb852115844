"""The Stable Diffusion model families, in one table: what differs between SD 1.x and SD 2.x (SDXL
joins here) and cannot be read from tensor shapes, so the loader decides it by the family's
convention and records the rule in `decided_by`.

    family  text encoder, keys under                       context  text act    pads with
    sd1     CLIP ViT-L/14, cond_stage_model.transformer.    768     quick_gelu  <|endoftext|>
    sd2     OpenCLIP ViT-H/14, cond_stage_model.model.     1024     gelu        id 0 ("!")

    family  UNet heads                          predicts        image side          latents
    sd1     8 per transformer                   eps             512                 0.18215 z
    sd2     64 channels each, fp32 attention    v (768-v)       768 for v, else 512 0.18215 z

The names "sd1" and "sd2" are the keys: our own files store them in their metadata.
"""

from dataclasses import dataclass
from typing import Callable

from transformers import CLIPTextConfig

from ldm.unet import UNetConfig

HF_CLIP = "HF CLIP"    # text keys already carry transformers' CLIPTextModel names
OPENCLIP = "OpenCLIP"  # text keys carry OpenCLIP names: ldm.text converts them


def sd1_text_config() -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text tower (SD 1.x): 123.1 M parameters."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def sd2_text_config() -> CLIPTextConfig:
    """OpenCLIP ViT-H/14 text tower (SD 2.x) with its last of 24 blocks dropped (ldm/text.py says
    why): 340.4 M parameters."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                          hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


@dataclass(frozen=True)
class Family:
    """One family's conventions. Sizes are the full-size models'."""

    name: str                # the key, as stored in our files' metadata
    display_name: str        # "SD 1.x", for people
    text_encoder: str        # HF_CLIP or OPENCLIP: how the text keys are named
    text_prefix: str         # where the text keys start in a single file
    context_dim: int         # text width = UNet cross-attention width
    text_config: Callable[[], CLIPTextConfig]  # the full-size text tower
    hidden_act: str          # the text MLP's activation (transformers' name)
    pads_with_eos: bool      # prompts padded with <|endoftext|> (CLIP), else with id 0 (OpenCLIP)
    num_heads: int           # UNet heads per transformer; -1: a fixed head width instead
    num_head_channels: int   # UNet channels per head; -1: a fixed head count instead
    upcast_attention: bool   # UNet attention in float32 (SD 2.1 overflows in fp16 otherwise)
    prediction_type: str     # what the network predicts, by convention
    prediction_note: str     # that convention in words, for decided_by
    # (global_step, model) of the family's one epsilon release among its v .ckpt files: the
    # training step tells them apart (diffusers' rule); None: the step tells nothing
    epsilon_checkpoint: tuple[int, str] | None
    image_size: int          # default image side of epsilon models
    v_image_size: int        # default image side of v-prediction models
    latent_scale: float      # latents = latent_scale * z (the VAE's scale_factor)

    def pad_token_id(self, eos_token_id: int) -> int:
        """The id prompts are padded with, given the tokenizer's <|endoftext|> id."""
        return eos_token_id if self.pads_with_eos else 0

    @property
    def pad_rule(self) -> str:
        return f"{self.display_name} pads with " + ("<|endoftext|>" if self.pads_with_eos
                                                    else "id 0")

    def unet_heads(self) -> dict:
        """The UNetConfig fields that shapes cannot tell: heads and attention precision."""
        return dict(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                    upcast_attention=self.upcast_attention)

    @property
    def heads_rule(self) -> str:
        """"SD 2.x 64 channels per head, fp32 attention"."""
        heads = UNetConfig(**self.unet_heads()).heads_text()
        return f"{self.display_name} {heads}" + (", fp32 attention" if self.upcast_attention
                                                 else "")

    def default_image_size(self, prediction_type: str) -> tuple[int, str]:
        """(image side, rule) when nothing in the file says."""
        size = self.v_image_size if prediction_type == "v_prediction" else self.image_size
        if self.v_image_size == self.image_size:
            return size, f"convention: {self.display_name} {size}"
        return size, (f"convention: {self.display_name} v-models {self.v_image_size}, others "
                      f"{self.image_size}")


FAMILIES = {f.name: f for f in (
    Family(name="sd1", display_name="SD 1.x", text_encoder=HF_CLIP,
           text_prefix="cond_stage_model.transformer.", context_dim=768,
           text_config=sd1_text_config, hidden_act="quick_gelu", pads_with_eos=True,
           num_heads=8, num_head_channels=-1, upcast_attention=False,
           prediction_type="epsilon", prediction_note="SD 1.x predicts noise",
           epsilon_checkpoint=None, image_size=512, v_image_size=512, latent_scale=0.18215),
    Family(name="sd2", display_name="SD 2.x", text_encoder=OPENCLIP,
           text_prefix="cond_stage_model.model.", context_dim=1024,
           text_config=sd2_text_config, hidden_act="gelu", pads_with_eos=False,
           num_heads=-1, num_head_channels=64, upcast_attention=True,
           prediction_type="v_prediction",
           prediction_note="SD 2.x 768-v models predict v (pass --prediction-type epsilon for "
                           "SD 2 512-base)",
           epsilon_checkpoint=(875000, "SD 2.x 512-base"), image_size=512, v_image_size=768,
           latent_scale=0.18215),
)}
SUPPORTED = ", ".join(f.display_name for f in FAMILIES.values())  # for messages: "SD 1.x, SD 2.x"


def family_named(name: str) -> Family:
    """FAMILIES[name], or ValueError naming the known families."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]
