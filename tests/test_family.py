"""ldm.family: the table of family conventions agrees with independent sources (diffusers'
single-file loader, open_clip's model configs and tokenizer, transformers' CLIP tokenizer), and
a tiny model saved and loaded back keeps its family's conventions."""

import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.loaders import single_file_utils as sfu

from ldm import checkpoint as ckpt
from ldm.family import FAMILIES, HF_CLIP, OPENCLIP, family_named
from ldm.text import TextEncoder, find_bpe_vocabulary, load_tokenizer
from ldm.unet import UNetConfig
from test_checkpoint import compvis_state_dict
from test_info import full_size_keys
from tiny import tiny_model

DIFFUSERS_TYPE = {"sd1": "v1", "sd2": "v2"}  # diffusers' names for the families
OPEN_CLIP_TEXT = {"sd1": "ViT-L-14-quickgelu", "sd2": "ViT-H-14"}  # open_clip config names
PRESETS = {"sd1": UNetConfig.sd15(), "sd2": UNetConfig.sd21()}  # ldm.unet's yaml presets
PROMPTS = ["a photo of a cat", "", "A Red STAR, on the left!", "photo " * 100]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def full_size_checkpoint(name: str) -> dict:
    """A full-size SD 1.5 / 2.1 single file's keys and shapes, on the meta device."""
    return {k: torch.empty(shape, device="meta") for k, shape in full_size_keys(name).items()}


def open_clip_folder() -> Path:
    """open_clip's package folder, found without importing it (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open_clip_torch)")
    return Path(spec.submodule_search_locations[0])


def test_family_table_agrees_with_diffusers(family):
    checkpoint = full_size_checkpoint(family.name)
    model_type = sfu.infer_diffusers_model_type(checkpoint)  # reads the cross-attention width
    assert model_type == DIFFUSERS_TYPE[family.name]
    assert ckpt.detect_family(checkpoint)[0] == family.name
    assert PRESETS[family.name].context_dim == family.context_dim
    if family.text_encoder == HF_CLIP:
        assert sfu.is_clip_model(checkpoint) and family.text_prefix in sfu.LDM_CLIP_PREFIX_TO_REMOVE
    else:
        assert family.text_encoder == OPENCLIP and sfu.is_open_clip_model(checkpoint)
        prefix = inspect.signature(sfu.convert_open_clip_checkpoint).parameters["prefix"].default
        assert family.text_prefix == prefix
    size, _ = family.default_image_size(family.prediction_type)
    assert size == sfu.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP[model_type]
    assert family.latent_scale == sfu.LDM_VAE_DEFAULT_SCALING_FACTOR


@pytest.mark.parametrize("global_step", [None, 875000, 110000])
def test_prediction_type_agrees_with_diffusers(family, global_step):
    """diffusers' single-file scheduler rule: SD 2 .ckpt files are v, except at step 875000."""
    checkpoint = full_size_checkpoint(family.name)
    if global_step is not None:
        checkpoint["global_step"] = global_step
    theirs = sfu._legacy_load_scheduler(DDIMScheduler, checkpoint, "scheduler")
    ours, _ = ckpt.decide_prediction_type(family.name, global_step=global_step)
    assert ours == theirs.config.prediction_type


def test_heads_agree_with_the_yaml_presets(family):
    """No installed package ships the CompVis yamls, so heads are checked against ldm.unet's
    presets taken from them (v1-inference.yaml: num_heads 8; v2-inference-v.yaml:
    num_head_channels 64, and SD 2.1 upcasts attention)."""
    preset = PRESETS[family.name]
    assert family.unet_heads() == {"num_heads": preset.num_heads,
                                   "num_head_channels": preset.num_head_channels,
                                   "upcast_attention": preset.upcast_attention}


def test_text_towers_agree_with_open_clip_configs(family):
    """open_clip's model configs: text width (= context_dim), heads, blocks (SD 2 drops its last
    one, ldm/text.py), vocabulary, context length, and QuickGELU vs exact GELU."""
    path = open_clip_folder() / "model_configs" / f"{OPEN_CLIP_TEXT[family.name]}.json"
    spec = json.loads(path.read_text())
    text, ours = spec["text_cfg"], family.text_config()
    assert text["width"] == family.context_dim == ours.hidden_size
    assert text["heads"] == ours.num_attention_heads
    assert text["layers"] == ours.num_hidden_layers + (family.text_encoder == OPENCLIP)
    assert (text["vocab_size"], text["context_length"]) == (ours.vocab_size,
                                                            ours.max_position_embeddings)
    assert family.hidden_act == ours.hidden_act == ("quick_gelu" if spec.get("quick_gelu")
                                                    else "gelu")


def open_clip_tokenize(monkeypatch):
    """open_clip.tokenize (SD 2's tokenizer), loaded from its file: the package itself needs
    torchvision. Its ftfy dependency only repairs broken unicode, so an identity stands in for
    it when ftfy is absent (the prompts here are plain ASCII)."""
    if importlib.util.find_spec("ftfy") is None:
        monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda s: s))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer",
                                                  open_clip_folder() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokenize


def test_padding_agrees_with_each_familys_own_tokenizer(family, monkeypatch):
    """SD 1 (CompVis' FrozenCLIPEmbedder) pads with transformers' CLIPTokenizer and its default
    pad token; SD 2 (FrozenOpenCLIPEmbedder) with open_clip.tokenize. Whole rows are compared."""
    if find_bpe_vocabulary() is None:
        pytest.skip("no installed package ships CLIP's BPE vocabulary")
    tokenizer = load_tokenizer()
    ours = TextEncoder.for_family(family.name, tokenizer).tokenize(PROMPTS)
    if family.text_encoder == HF_CLIP:
        theirs = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    else:
        theirs = open_clip_tokenize(monkeypatch)(PROMPTS)
    assert torch.equal(ours, theirs)
    assert (ours[1, 2:] == family.pad_token_id(tokenizer.eos_token_id)).all()


def test_tiny_model_keeps_its_family_conventions(family, tmp_path):
    """Saved with our metadata and as a bare .ckpt (conventions re-decided by rule), a tiny
    model of each family loads back with that family's conventions."""
    model = tiny_model(family.name, tokenizer_dir=str(tmp_path / "tokenizer"))
    ckpt.save_single_file(str(tmp_path / "model.safetensors"), model)
    torch.save({"state_dict": compvis_state_dict(model)}, tmp_path / "model.ckpt")
    eos = model.text_encoder.tokenizer.eos_token_id
    for name in ("model.safetensors", "model.ckpt"):
        loaded = ckpt.load(str(tmp_path / name))
        unet, text = loaded.unet.config, loaded.text_encoder.transformer.config
        assert loaded.family == family.name, name
        assert {k: getattr(unet, k) for k in family.unet_heads()} == family.unet_heads(), name
        assert text.hidden_act == family.hidden_act, name
        assert loaded.text_encoder.pad_token_id == family.pad_token_id(eos), name
        assert loaded.prediction_type == family.prediction_type, name
        assert loaded.vae.config.scale_factor == family.latent_scale, name
    # the bare file's rules name the family they came from
    rules = loaded.decided_by
    assert family.display_name in rules["family"] and family.heads_rule in rules["unet_config"]
    assert rules["pad_token"] == "convention: " + family.pad_rule


def test_unknown_family_is_refused_by_name():
    with pytest.raises(ValueError, match="family must be one of sd1, sd2, got 'sdxl'"):
        family_named("sdxl")
