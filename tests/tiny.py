"""Tiny random Stable Diffusion models for tests: our classes at toy width, and a tiny tokenizer.

    from tiny import tiny_model, write_tokenizer
    model = tiny_model("sd1")            # SD 1 layout: conv proj, 8 heads, HF CLIP text
    model = tiny_model("sd2", tmp_path)  # SD 2 layout: linear proj, 64-channel heads, OpenCLIP

The configs follow each family's conventions (heads, text heads of 64 channels, SD 2's fp32
attention), so a file written without our metadata (.ckpt) still loads back to the same model.
Weights are random but not degenerate: norms get random scales and shifts (oracle.randomize).
Images are 32x32, latents 4x16x16.
"""

import json
import os
import tempfile

import pytest
import torch
from transformers import CLIPTokenizer

from ldm.family import FAMILIES
from ldm.model import StableDiffusion
from ldm.schedule import NoiseSchedule
from ldm.text import TextEncoder, byte_symbols
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig
from oracle import randomize

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "star", "sks", "on", "the", "left"]
IMAGE_SIZE = 32

UNET = {
    # two levels, attention only at the first (so the upsampler is output_blocks.N.1)
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
                      num_res_blocks=1, context_dim=64, **FAMILIES["sd1"].unet_heads()),
    # attention at both levels, depth 2, two res blocks (upsampler at .2 after attention)
    "sd2": UNetConfig(model_channels=64, channel_mult=(1, 1), attention_resolutions=(2, 1),
                      num_res_blocks=2, context_dim=64, use_linear_in_transformer=True,
                      transformer_depth=2, **FAMILIES["sd2"].unet_heads()),
}
VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=IMAGE_SIZE)


def write_tokenizer(directory: str) -> str:
    """vocab.json + merges.txt of a CLIP-style BPE tokenizer whose words are WORDS (each one
    token) and whose other text falls back to byte symbols; returns the directory."""
    merges = []
    for word in WORDS:  # merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(tokens))}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def tiny_tokenizer(directory: str | None = None) -> CLIPTokenizer:
    directory = write_tokenizer(directory or tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    return CLIPTokenizer.from_pretrained(directory)


def text_config(family: str, vocab_size: int, layers: int | None = None):
    """64 wide (one 64-channel head), SD 1: 2 layers quick_gelu; SD 2: 3 layers gelu (unless
    `layers` says otherwise)."""
    base = FAMILIES[family].text_config()
    return base.__class__(**{**base.to_dict(), "vocab_size": vocab_size, "hidden_size": 64,
                             "intermediate_size": 128, "num_attention_heads": 1,
                             "num_hidden_layers": layers or {"sd1": 2, "sd2": 3}[family],
                             "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
                             "pad_token_id": FAMILIES[family].pad_token_id(vocab_size - 1)})


def tiny_model(family: str = "sd1", tokenizer_dir: str | None = None, seed: int = 0,
               prediction_type: str | None = None, text_layers: int | None = None
               ) -> StableDiffusion:
    """A random StableDiffusion of the family's layout, eval mode, float32 on the CPU.
    tokenizer_dir: where to write the tokenizer (a temporary folder when None); text_layers:
    the text encoder's depth (default: text_config's)."""
    tokenizer = tiny_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = randomize(UNetModel(UNET[family]), seed)
    vae = randomize(AutoencoderKL(VAE), seed + 1)
    text = TextEncoder.for_family(family, tokenizer, text_config(family, len(tokenizer), text_layers))
    randomize(text.transformer, seed + 2)
    prediction_type = prediction_type or FAMILIES[family].prediction_type
    return StableDiffusion(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                           schedule=NoiseSchedule(), family=family,
                           prediction_type=prediction_type, source="tests/tiny.py",
                           decided_by={"family": "built by tests/tiny.py"},
                           image_size=IMAGE_SIZE)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine extra threads
    spin-wait: a 2 s run took 40 s with two. A test module that imports it runs every test on
    one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
