"""SD 2 single files come with the whole OpenCLIP text tower (24 blocks, the last never read, and
text_projection) or with the 23 used blocks only (what diffusers' script
convert_diffusers_to_original_stable_diffusion.py writes from an SD 2 diffusers folder). Both must
load to the same 23-block text encoder, with the contexts of the reference: transformers'
CLIPTextModel filled by diffusers' own converter (the oracle, tests/oracle.py)."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import save_file
from transformers import CLIPTextModel

from ldm import checkpoint as ckpt
from ldm.family import FAMILIES
from test_checkpoint import compvis_state_dict
from test_info import full_size_keys, write_sparse_safetensors
from tiny import tiny_model

OPENCLIP = FAMILIES["sd2"].text_prefix
PROMPTS = ["a photo of a cat", "sks dog on the left", ""]
USED_BLOCKS = 23  # SD 2's ViT-H: 24 blocks, the penultimate one read


def used_blocks_only(whole: dict, used: int) -> dict:
    """The file diffusers' script writes from the same model: no block `used`, no image-text
    head; a CLIPTextModel's position_ids carried along (older transformers saved it), corrupt."""
    out = {k: v for k, v in whole.items()
           if not k.startswith((f"{OPENCLIP}transformer.resblocks.{used}.",
                                OPENCLIP + "text_projection", OPENCLIP + "logit_scale"))}
    out[OPENCLIP + "transformer.text_model.embeddings.position_ids"] = torch.full((1, 77), 9)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"whole tower": (file state dict, loaded model), "used blocks": ...} of one tiny SD 2 model
    with a 23-block text encoder, written without our metadata (as files from elsewhere are)."""
    folder = tmp_path_factory.mktemp("sd2-text")
    model = tiny_model("sd2", tokenizer_dir=str(folder / "tokenizer"), text_layers=USED_BLOCKS)
    whole = compvis_state_dict(model)  # block 23 (random) + text_projection + logit_scale
    files = {"whole tower": whole, "used blocks": used_blocks_only(whole, USED_BLOCKS)}
    out = {}
    for name, state_dict in files.items():
        path = str(folder / f"{name.replace(' ', '-')}.safetensors")
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
        out[name] = state_dict, ckpt.load(path, tokenizer_dir=str(folder / "tokenizer"))
    return model, out


def reference_contexts(state_dict: dict, config, token_ids) -> torch.Tensor:
    """transformers' CLIPTextModel filled by diffusers' convert_open_clip_checkpoint (strict)."""
    reference = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(reference, state_dict)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                 if not k.endswith("position_ids")}  # transformers 5 names; not a weight
    reference.load_state_dict(converted, strict=True)
    with torch.no_grad():
        return reference(input_ids=token_ids).last_hidden_state


@pytest.mark.parametrize("name", ["whole tower", "used blocks"])
@torch.no_grad()
def test_both_exports_give_the_reference_contexts(exports, name):
    model, loaded = exports
    state_dict, ours = loaded[name]
    assert ours.text_encoder.transformer.config.num_hidden_layers == USED_BLOCKS
    ids = ours.text_encoder.tokenize(PROMPTS)
    got = ours.text_encoder(ids)
    want = reference_contexts(state_dict, model.text_encoder.transformer.config, ids)
    diff = (got - want).abs().max().item()
    print(f"{name}: max abs diff vs diffusers + transformers {diff:.2e}")
    assert diff <= 1e-5
    assert torch.equal(got, model.text_encoder(ids))  # the model that was exported, exactly


def test_both_exports_agree_and_say_which_rule_decided(exports):
    _, loaded = exports
    whole, used = loaded["whole tower"][1], loaded["used blocks"][1]
    assert torch.equal(whole.encode_prompts(PROMPTS), used.encode_prompts(PROMPTS))
    assert "24 OpenCLIP blocks, the whole tower (ViT-H has 24): the last, unused, dropped" in \
        whole.decided_by["text_config"]
    assert "23 OpenCLIP blocks, all used" in used.decided_by["text_config"]


def test_tiny_towers_are_told_apart_by_the_image_text_head(tmp_path):
    """Towers of other depths: text_projection marks the whole tower (tests' tiny files)."""
    model = tiny_model("sd2", tokenizer_dir=str(tmp_path / "tokenizer"))  # 3 blocks used
    whole = compvis_state_dict(model)  # 4 blocks + text_projection
    for name, state_dict in {"whole": whole, "used": used_blocks_only(whole, 3)}.items():
        torch.save(state_dict, tmp_path / f"{name}.ckpt")
        loaded = ckpt.load(str(tmp_path / f"{name}.ckpt"))
        assert loaded.text_encoder.transformer.config.num_hidden_layers == 3, name
        assert torch.equal(loaded.encode_prompts(PROMPTS), model.encode_prompts(PROMPTS)), name


def test_full_size_file_with_23_blocks_reads_as_sd21(tmp_path):
    """A full-size SD 2.1 file as diffusers' script writes it, header only: the text encoder has
    SD 2.1's 23 blocks and 340.39 M parameters, as from the 24-block release file."""
    shapes = {k: v for k, v in full_size_keys("sd2").items()
              if not k.startswith((f"{OPENCLIP}transformer.resblocks.23.",
                                   OPENCLIP + "text_projection", OPENCLIP + "logit_scale"))}
    write_sparse_safetensors(tmp_path / "sd21-from-diffusers.safetensors", shapes)
    loaded = ckpt.load(str(tmp_path / "sd21-from-diffusers.safetensors"), device="meta")
    assert loaded.text_encoder.transformer.config.num_hidden_layers == \
        FAMILIES["sd2"].text_config().num_hidden_layers == 23
    count = sum(p.numel() for p in loaded.text_encoder.parameters())
    assert count == 340_387_840
