"""The text side of Stable Diffusion: CLIP tokenizer + CLIP text transformer + each family's rules.

The transformer is transformers' CLIPTextModel, used as is. What this file adds is what SD
checkpoints need around it:

- SD 1.x: OpenAI CLIP ViT-L/14's text tower (768 wide, 12 blocks, quick_gelu). The context is
  the last hidden state after the final layer norm. Prompts are padded with <|endoftext|> (49407).
  Checkpoint keys: "cond_stage_model.transformer.text_model.<HF name>" (HF CLIP names already).
- SD 2.x: OpenCLIP ViT-H/14's text tower (1024 wide, 24 blocks, 16 heads, exact GELU). SD 2
  conditions on the output of the *penultimate* block passed through ln_final, and pads with
  id 0. Checkpoint keys: "cond_stage_model.model.<OpenCLIP name>", converted here (fused qkv
  split into q/k/v, ln_1/ln_2 -> layer_norm1/2, mlp.c_fc/c_proj -> fc1/fc2, ln_final ->
  final_layer_norm).

Decision: for SD 2 we drop the unused 24th block when converting and build a 23-block
CLIPTextModel, as diffusers' SD 2 folders do. Then "penultimate block + final norm" is exactly
CLIPTextModel's last_hidden_state, every family reads the same output, a single-file SD 2 and
a diffusers SD 2 folder give the same module tree (and the same spectral-shift names), and no
dead block gets shifts or compute. The cost: a single file we write for SD 2 has 23 blocks and
no text_projection; CompVis, A1111 and ComfyUI load it non-strictly and never run that block.
Files in the wild come both ways too (used_text_blocks decides by what the file holds): the
whole tower (24 blocks) from OpenCLIP-based training, only the used 23 from diffusers' script
convert_diffusers_to_original_stable_diffusion.py, a common way fine-tuned SD 2 models are shared.

Every context is max_position_embeddings = 77 tokens: <|startoftext|> prompt <|endoftext|> pad...,
truncated so that the last kept token is <|endoftext|> (with one warning line per prompt cut).
The empty prompt "" gives the unconditional context for classifier-free guidance: encode([""]).
"""

import gzip
import importlib.metadata
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.family import HF_CLIP, OPENCLIP, family_named

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"          # OpenAI CLIP's merges, shipped by open_clip / clip
CLIP_MERGES = 49152 - 256 - 2                      # merges CLIP uses: vocab 49408 = 2 * 256 + merges + 2


class TokenizerNotFound(Exception):
    """No usable CLIP vocabulary was found (none there, or unreadable); the message says how to
    supply one."""


# --------------------------------------------------------------------------- configs

def text_config_from_state_dict(hf_state_dict: dict, family: str,
                                num_attention_heads: int | None = None) -> CLIPTextConfig:
    """A CLIPTextConfig for a state dict from hf_text_state_dict. Shapes give the sizes and the
    family the activation. Shapes cannot tell the heads: by default CLIP's 64-dim heads (right
    for ViT-L and ViT-H)."""
    vocab_size, width = hf_state_dict["embeddings.token_embedding.weight"].shape
    layers = sum(1 for k in hf_state_dict if re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.q_proj\.weight", k))
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=num_attention_heads or width // 64,
        intermediate_size=hf_state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=hf_state_dict["embeddings.position_embedding.weight"].shape[0],
        hidden_act=family_named(family).hidden_act, layer_norm_eps=1e-5,
        # CLIP vocabularies end with <|startoftext|>, <|endoftext|> (only the pooled output reads these)
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)


def text_config_from_dict(values: dict) -> CLIPTextConfig:
    """CLIPTextConfig(**values) of a config file, or ValueError with a one-line message:
    transformers 5 checks each field's type and raises its own exceptions (not ValueError)."""
    try:
        return CLIPTextConfig(**values)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"bad text encoder config ({' '.join(lines[:2])[:200]})") from None


# --------------------------------------------------------------------------- the encoder

class TextEncoder(nn.Module):
    """CLIP text encoder + tokenizer + SD family conventions.

    forward: token ids (B, 77) -> context (B, 77, hidden), CLIPTextModel's last_hidden_state
    (the final layer norm included). Our state dict keys are "transformer.<HF CLIPTextModel keys>".
    """

    def __init__(self, config: CLIPTextConfig, tokenizer: CLIPTokenizer, pad_token_id: int | None = None):
        super().__init__()
        self.transformer = CLIPTextModel(config)
        self.tokenizer = tokenizer
        self.max_length = config.max_position_embeddings
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.checked_prompts = set()  # prompts already measured for warn_if_cut

    @classmethod
    def for_family(cls, family: str, tokenizer: CLIPTokenizer, config: CLIPTextConfig | None = None):
        """The family's full-size config unless one is given, and the family's padding (SD 1
        pads with <|endoftext|>, SD 2 with id 0: ldm.family)."""
        conventions = family_named(family)
        config = config or conventions.text_config()
        return cls(config, tokenizer, pad_token_id=conventions.pad_token_id(tokenizer.eos_token_id))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """LongTensor (B, max_length): <|startoftext|> ... <|endoftext|> then pad_token_id."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            self.warn_if_cut(prompt)
        rows = self.tokenizer(prompts, truncation=True, max_length=self.max_length)["input_ids"]
        ids = torch.full((len(rows), self.max_length), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return ids

    def warn_if_cut(self, prompt: str) -> None:
        """One line on stderr, once per distinct prompt, when the prompt is more than max_length
        tokens counting <|startoftext|> and <|endoftext|>: truncation would cut it silently."""
        if prompt in self.checked_prompts:
            return
        self.checked_prompts.add(prompt)
        # tokenize(): the same pieces as encoding, without transformers' own length warning
        count = len(self.tokenizer.tokenize(prompt)) + 2
        if count > self.max_length:
            shown = " ".join(prompt.split())  # one line, even for a prompt with newlines
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            print(f"warning: prompt '{shown}' is {count} tokens; CLIP reads the first "
                  f"{self.max_length}, the rest is ignored", file=sys.stderr, flush=True)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=token_ids).last_hidden_state

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> contexts (B, max_length, hidden) on the model's device and dtype."""
        # any parameter tells the device; not token_embedding.weight, of which a spectral
        # layer keeps only the shape
        device = next(self.parameters()).device
        return self(self.tokenize(prompts).to(device))


# --------------------------------------------------------------------------- checkpoint keys

# OpenCLIP block part -> HF CLIP encoder layer part (the fused attn.in_proj_* are split apart)
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPENCLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}   # CLIP's image-text head, a buffer
VIT_H_BLOCKS = 24   # OpenCLIP ViT-H/14's text tower, SD 2's; its last block is never read


def hf_text_state_dict(checkpoint_sd: dict, family: str, num_layers: int | None = None) -> dict:
    """The text encoder of a CompVis-layout checkpoint, as CLIPTextModel (transformers 5) keys.

    position_ids is dropped (it is often corrupt in merged checkpoints and is not a weight).
    SD 2: text_projection and logit_scale are dropped, and every block from `num_layers` on;
    None: used_text_blocks' rule (the unused last block of a whole OpenCLIP tower goes).
    """
    conventions = family_named(family)
    prefix = conventions.text_prefix
    own = {k[len(prefix):]: v for k, v in checkpoint_sd.items() if k.startswith(prefix)}
    if conventions.text_encoder == OPENCLIP:
        if num_layers is None:
            num_layers = used_text_blocks(checkpoint_sd, family)[0]
        out = _openclip_to_hf(own, num_layers) if own else {}
    else:
        # SD 1 files carry "text_model." (transformers 4 names); transformers 5 has no such level
        out = {name.removeprefix("text_model."): v for name, v in own.items()
               if name.removeprefix("text_model.") != "embeddings.position_ids"}
    if not out:
        raise ValueError(f"no {family} text encoder weights (keys starting with {prefix!r}) in "
                         "the checkpoint")
    return out


def used_text_blocks(checkpoint_sd: dict, family: str) -> tuple[int | None, str | None]:
    """(how many of a single file's text blocks the family reads, the rule that decided);
    (None, None) for HF CLIP files, which hold only what is read.

    SD 2 reads the penultimate block of OpenCLIP's tower, so a file holding the whole tower
    has one block never read, its last, which is dropped; a file converted from a CLIPTextModel
    holds only the used blocks, all kept. For ViT-H, SD 2's tower, the count tells: 24 blocks is
    the whole tower (OpenCLIP-based training, kohya's exports), 23 the used ones (diffusers'
    convert_diffusers_to_original_stable_diffusion.py). For towers of other depths (tests' tiny
    ones) the image-text head tells: OpenCLIP saves text_projection with the whole tower, a
    CLIPTextModel has none."""
    conventions = family_named(family)
    if conventions.text_encoder != OPENCLIP:
        return None, None
    block = re.compile(re.escape(conventions.text_prefix) + r"transformer\.resblocks\.(\d+)\.")
    blocks = 1 + max((int(m.group(1)) for k in checkpoint_sd if (m := block.match(k))), default=-1)
    if blocks in (VIT_H_BLOCKS - 1, VIT_H_BLOCKS):
        whole, why = blocks == VIT_H_BLOCKS, f"ViT-H has {VIT_H_BLOCKS}"
    else:
        whole = conventions.text_prefix + "text_projection" in checkpoint_sd
        why = "text_projection present" if whole else "no text_projection"
    if whole:
        return blocks - 1, f"{blocks} OpenCLIP blocks, the whole tower ({why}): the last, unused, dropped"
    return blocks, f"{blocks} OpenCLIP blocks, all used ({why}: converted from a CLIPTextModel)"


def _openclip_to_hf(openclip: dict, num_layers: int) -> dict:
    block_of = lambda key: re.match(r"transformer\.resblocks\.(\d+)\.", key)
    out, unknown = {}, []
    for key, value in openclip.items():
        part = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        in_proj = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key in _OPENCLIP_UNUSED or key.endswith("position_ids") or (
                block_of(key) and int(block_of(key).group(1)) >= num_layers):
            # (diffusers' script carries a CLIPTextModel's position_ids along when it had one)
            continue
        elif in_proj:   # rows are [q; k; v], `width` rows each
            index, kind = in_proj.groups()
            for name, rows in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{index}.self_attn.{name}.{kind}"] = rows
        elif part and part.group(2) in _OPENCLIP_BLOCK:
            index, name, kind = part.groups()
            out[f"encoder.layers.{index}.{_OPENCLIP_BLOCK[name]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected OpenCLIP text keys: {', '.join(sorted(unknown)[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    return out


def compvis_text_state_dict(encoder: TextEncoder, family: str) -> dict:
    """The inverse of hf_text_state_dict: the encoder's weights under CompVis checkpoint keys."""
    hf = encoder.transformer.state_dict()
    conventions = family_named(family)
    prefix = conventions.text_prefix
    if conventions.text_encoder == HF_CLIP:
        return {f"{prefix}text_model.{k}": v for k, v in hf.items()}
    top = {hf_name: openclip_name for openclip_name, hf_name in _OPENCLIP_TOP.items()}
    block = {hf_part: openclip_part for openclip_part, hf_part in _OPENCLIP_BLOCK.items()}
    out = {}
    for key, value in hf.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        index, part, kind = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key).groups()
        block_prefix = f"{prefix}transformer.resblocks.{index}."
        if part in block:
            out[f"{block_prefix}{block[part]}.{kind}"] = value
        elif part == "self_attn.q_proj":   # k and v join it here, in [q; k; v] order
            qkv = [hf[f"encoder.layers.{index}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{block_prefix}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    return out


# --------------------------------------------------------------------------- tokenizer

# what a tokenizer folder holds (for messages and --help)
TOKENIZER_FILES = "tokenizer.json or vocab.json + merges.txt"


def load_tokenizer(directory: str | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer from `directory` (tokenizer.json, as transformers 5 saves it, or
    vocab.json + merges.txt, as hub folders carry it; or a diffusers model folder with either in
    tokenizer/), else from an installed package's CLIP BPE file, else TokenizerNotFound."""
    if directory is not None:
        for folder in (Path(directory), Path(directory) / "tokenizer"):
            if (folder / "tokenizer.json").is_file() or (
                    (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
                return _read_tokenizer(folder)
        raise TokenizerNotFound(f"no {TOKENIZER_FILES} in {directory} or {directory}/tokenizer")
    bpe = find_bpe_vocabulary()
    if bpe is None:
        raise TokenizerNotFound(
            f"no CLIP tokenizer: pass --tokenizer DIR (a folder with {TOKENIZER_FILES}, such as a "
            f"diffusers model's tokenizer/), or install a package that ships {BPE_FILE} (pip install open_clip_torch)")
    return tokenizer_from_bpe(bpe)


def _read_tokenizer(folder: Path) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TokenizerNotFound(f"{folder}: unreadable tokenizer ({type(e).__name__}: {first})") \
            from None


def find_bpe_vocabulary() -> Path | None:
    """The first installed distribution's copy of bpe_simple_vocab_16e6.txt.gz, if any."""
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if file.name == BPE_FILE and Path(dist.locate_file(file)).is_file():
                return Path(dist.locate_file(file))
    return None


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in CLIP's vocabulary
    order: bytes that print (! to ~, inverted-exclamation to not-sign, registered-sign to y-umlaut)
    stand for themselves; every other byte, in byte order, gets chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def tokenizer_from_bpe(path: Path) -> CLIPTokenizer:
    """Build CLIP's tokenizer from its merges file. The vocabulary is laid out as CLIP builds it:
    the 256 byte symbols, the same with "</w>" (end of word), one token per merge in merge order,
    then <|startoftext|> (49406) and <|endoftext|> (49407)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + CLIP_MERGES]                    # line 0 is a version header
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder)
