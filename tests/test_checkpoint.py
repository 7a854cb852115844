"""ldm.checkpoint: single files and diffusers folders load into our model and compute what the
saved model (or diffusers' own models) computes; family and prediction-type rules; fingerprints.
Refused files: test_checkpoint_refusals.py."""

import os
import re
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ldm import checkpoint as ckpt
from ldm import diffusers_layout
from ldm.family import FAMILIES, sd1_text_config, sd2_text_config
from ldm.model import state_dict_fingerprint
from ldm.text import compvis_text_state_dict
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig
from oracle import (UNET_PREFIX, VAE_PREFIX, checkpoint_state_dict, convert_unet, convert_vae,
                    diffusers_unet, diffusers_unet_config, diffusers_vae, diffusers_vae_config,
                    randomize)
from tiny import UNET, VAE, tiny_model, write_tokenizer

PROMPTS = ["a photo of a cat", "sks dog on the left"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(family, tmp_path_factory):
    folder = tmp_path_factory.mktemp(family)
    return tiny_model(family, tokenizer_dir=str(folder / "tokenizer")), folder


def compvis_state_dict(model) -> dict:
    """The model as a real SD single file lays it out (SD 2: 24 OpenCLIP blocks, the last one
    unused, plus text_projection and logit_scale)."""
    sd = checkpoint_state_dict(model.unet, UNET_PREFIX)
    sd.update(checkpoint_state_dict(model.vae, VAE_PREFIX))
    text = compvis_text_state_dict(model.text_encoder, model.family)
    if model.family == "sd2":
        openclip = FAMILIES["sd2"].text_prefix
        prefix = openclip + "transformer.resblocks."
        last = model.text_encoder.transformer.config.num_hidden_layers - 1
        for k, v in list(text.items()):
            if k.startswith(f"{prefix}{last}."):
                text[k.replace(f"{prefix}{last}.", f"{prefix}{last + 1}.")] = torch.randn_like(v)
        width = model.text_encoder.transformer.config.hidden_size
        text[openclip + "text_projection"] = torch.randn(width, width)
        text[openclip + "logit_scale"] = torch.tensor(4.6)
    sd.update(text)
    return sd


@torch.no_grad()
def assert_same_outputs(a, b, exact=True):
    """UNet, VAE encode/decode and text contexts of two models on the same random inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    t = torch.tensor([10, 900])
    ca, cb = a.encode_prompts(PROMPTS), b.encode_prompts(PROMPTS)
    pairs = {"text": (ca, cb), "unet": (a.unet(x, t, ca), b.unet(x, t, ca)),
             "decode": (a.vae.decode(x), b.vae.decode(x)),
             "encode": (a.vae.encode(image).mean, b.vae.encode(image).mean)}
    for name, (u, v) in pairs.items():
        if exact:
            assert torch.equal(u, v), name
        else:
            diff = (u - v).abs().max().item()
            print(name, f"max abs diff {diff:.2e}")
            assert diff <= 1e-5, name


# ----------------------------------------------------------------------------- single files

def test_a_safetensors_header_length_starting_with_a_pickle_byte_is_still_safetensors(tmp_path):
    """The first 8 bytes are the header's length, little-endian: in one file of 256 the first
    is 0x80, a bare pickle's first byte. Read with safetensors' own loader, tensors and metadata
    are there (they were refused as a damaged pickle)."""
    from ldm.files import read_single_file
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    for padding in range(256):
        path = tmp_path / f"{padding}.safetensors"
        save_file(tensors, str(path), metadata={"note": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    state_dict, metadata = read_single_file(str(path))
    assert torch.equal(state_dict["w"], tensors["w"]) and metadata["note"] == "x" * padding


def test_safetensors_round_trip(tiny):
    model, folder = tiny
    path = str(folder / "model.safetensors")
    ckpt.save_single_file(path, model, extra_metadata={"note": "test"})
    loaded = ckpt.load(path)
    assert loaded.unet.config == model.unet.config and loaded.vae.config == model.vae.config
    assert loaded.text_encoder.transformer.config.num_hidden_layers == \
        model.text_encoder.transformer.config.num_hidden_layers
    assert (loaded.family, loaded.prediction_type, loaded.image_size) == \
        (model.family, model.prediction_type, model.image_size)
    assert loaded.text_encoder.pad_token_id == model.text_encoder.pad_token_id
    assert loaded.decided_by["family"].startswith("file metadata")
    assert loaded.decided_by["tokenizer"].startswith("beside the weights")
    assert_same_outputs(model, loaded)
    assert state_dict_fingerprint(loaded.unet.state_dict()) == \
        state_dict_fingerprint(model.unet.state_dict())


def test_ckpt_round_trip_infers_config_from_shapes(tiny):
    """A .ckpt has no metadata: configs come from shapes and the family conventions."""
    model, folder = tiny
    path = str(folder / "model.ckpt")
    torch.save({"state_dict": compvis_state_dict(model), "global_step": 1000}, path)
    loaded = ckpt.load(path)
    assert loaded.unet.config == model.unet.config
    assert loaded.vae.config == VAEConfig(**{**vars(model.vae.config), "resolution": 256})
    assert loaded.family == model.family
    assert loaded.prediction_type == model.prediction_type  # tiny follows the conventions
    assert loaded.image_size == (512 if model.family == "sd1" else 768)
    assert "shapes" in loaded.decided_by["unet_config"]
    assert_same_outputs(model, loaded)


def test_ema_and_corrupt_position_ids_are_ignored(tmp_path):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    sd = compvis_state_dict(model)
    for k, v in list(sd.items())[:150]:  # CompVis EMA names drop the dots
        if k.startswith(UNET_PREFIX):
            sd["model_ema." + k[len("model."):].replace(".", "")] = torch.randn_like(v)
    sd["model_ema.num_updates"] = torch.tensor(7)
    sd[FAMILIES["sd1"].text_prefix + "text_model.embeddings.position_ids"] = \
        torch.arange(77.0)[None] * 0.999  # float and off: the classic merged-checkpoint damage
    sd["alphas_cumprod"] = model.schedule.alphas_cumprod.float()
    path = str(tmp_path / "ema.ckpt")
    torch.save({"state_dict": sd}, path)
    loaded = ckpt.load(path)
    assert "non-EMA" in loaded.decided_by["weights"] and "model_ema" in loaded.decided_by["weights"]
    assert "alphas_cumprod" in loaded.decided_by["ignored"]
    assert_same_outputs(model, loaded)


def test_fp16_file_and_dtype(tiny):
    model, folder = tiny
    path = str(folder / "half.safetensors")
    save_file({k: v.half().contiguous() for k, v in compvis_state_dict(model).items()}, path)
    half = ckpt.load(path, dtype=None)
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}
    full = ckpt.load(path)
    assert {p.dtype for p in full.unet.parameters()} == {torch.float32}
    torch.testing.assert_close(full.unet.state_dict()["out.2.weight"],
                               model.unet.state_dict()["out.2.weight"].half().float())


def test_meta_load_reads_shapes_only(tiny):
    model, folder = tiny
    path = str(folder / "model.safetensors")
    ckpt.save_single_file(path, model)
    meta = ckpt.load(path, device="meta", dtype=None)
    assert all(p.is_meta for p in meta.unet.parameters())
    assert sum(p.numel() for p in meta.unet.parameters()) == \
        sum(p.numel() for p in model.unet.parameters())


# ----------------------------------------------------------------------------- diffusers folders

def write_diffusers_folder(model, folder, legacy=False):
    """unet/ vae/ text_encoder/ tokenizer/ scheduler/ written by diffusers and transformers
    themselves. legacy=True: .bin weights and the names older versions wrote (VAE attention
    query/key/value/proj_attn, text "text_model." keys)."""
    unet, vae = diffusers_unet(model.unet), diffusers_vae(model.vae)
    text = CLIPTextModel(model.text_encoder.transformer.config)
    text.load_state_dict(model.text_encoder.transformer.state_dict())
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae", safe_serialization=not legacy)
    text.save_pretrained(folder / "text_encoder")
    tokenizer = model.text_encoder.tokenizer
    if model.family == "sd2":  # SD 2's diffusers tokenizer pads with "!" (id 0)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer.name_or_path, pad_token="!")
    tokenizer.save_pretrained(folder / "tokenizer")
    # hub folders carry vocab.json + merges.txt; transformers 5 writes only tokenizer.json
    write_tokenizer(str(folder / "tokenizer"))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=model.prediction_type).save_pretrained(folder / "scheduler")
    if legacy:
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        path = folder / "vae" / "diffusion_pytorch_model.bin"
        sd = torch.load(path, weights_only=True)
        renamed = {}
        for k, v in sd.items():
            for new, old in names.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            renamed[k] = v
        torch.save(renamed, path)
        path = folder / "text_encoder" / "model.safetensors"
        from safetensors.torch import load_file
        save_file({"text_model." + k: v for k, v in load_file(path).items()}, str(path))
    return unet.eval(), vae.eval(), text.eval(), tokenizer


@pytest.mark.parametrize("legacy", [False, True])
@torch.no_grad()
def test_diffusers_folder_matches_diffusers(tiny, legacy, tmp_path):
    model, _ = tiny
    unet, vae, text, tokenizer = write_diffusers_folder(model, tmp_path, legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated path taken silently
        loaded = ckpt.load(str(tmp_path))
    assert loaded.family == model.family and loaded.prediction_type == model.prediction_type
    assert loaded.decided_by["prediction_type"] == "file metadata"
    assert loaded.unet.config == model.unet.config
    assert loaded.image_size == 64 * 2  # diffusers' sample_size (64 latents) x the VAE factor
    # the oracle: diffusers' and transformers' models as a diffusers pipeline runs them
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    context = text(ids).last_hidden_state
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 700])
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    diffs = {
        "text": loaded.encode_prompts(PROMPTS) - context,
        "unet": loaded.unet(x, t, context) - unet(x, t, encoder_hidden_states=context).sample,
        "decode": loaded.vae.decode(x) - vae.decode(x).sample,
        "encode": loaded.vae.encode(image).mean - vae.encode(image).latent_dist.mean,
    }
    diffs = {k: v.abs().max().item() for k, v in diffs.items()}
    print(model.family, "legacy" if legacy else "current",
          {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-5


def test_diffusers_names_are_diffusers_converters_inverse(family):
    """For every key diffusers' own converter produces from our CompVis state dict, our rule
    maps it back to the CompVis key holding the same tensor."""
    unet = randomize(UNetModel(UNET[family]))
    ours = unet.state_dict()
    theirs = convert_unet(checkpoint_state_dict(unet, UNET_PREFIX), unet.config)
    assert len(theirs) == len(ours)
    for k, v in theirs.items():
        assert torch.equal(ours[ckpt.diffusers_unet_name_to_compvis(k, unet.config)], v), k
    assert diffusers_layout.unet_config(diffusers_unet_config(unet.config))[0] == unet.config
    vae = randomize(AutoencoderKL(VAE))
    renamed = diffusers_layout.vae_state_dict(
        convert_vae(checkpoint_state_dict(vae, VAE_PREFIX), vae.config), vae.config)
    assert renamed.keys() == vae.state_dict().keys()
    assert all(torch.equal(renamed[k], v) for k, v in vae.state_dict().items())
    # module paths work too (spectral shift files name modules, not parameters)
    assert ckpt.diffusers_unet_name_to_compvis(
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", UNetConfig.sd15()) == \
        "output_blocks.3.1.transformer_blocks.0.attn2.to_k"
    assert ckpt.diffusers_unet_name_to_compvis("up_blocks.0.upsamplers.0", UNetConfig.sd15()) == \
        "output_blocks.2.1"
    assert ckpt.diffusers_unet_name_to_compvis("up_blocks.1.upsamplers.0.conv", UNetConfig.sd15()) \
        == "output_blocks.5.2.conv"


FULL_SIZE = {  # parameters: UNet, VAE, text (SD 2: the 23 used OpenCLIP blocks, as diffusers)
    "sd15": (UNetConfig.sd15(), sd1_text_config, 859_520_964, 83_653_863, 123_060_480),
    "sd21": (UNetConfig.sd21(), sd2_text_config, 865_910_724, 83_653_863, 340_387_840),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_names_and_shapes_on_meta(name):
    """Full-size SD 1.5 / 2.1: diffusers' models (configs from diffusers' own builders) renamed
    by our rules give exactly our modules' keys and shapes; parameter counts are SD's."""
    unet_config, text_config, unet_count, vae_count, text_count = FULL_SIZE[name]
    with torch.device("meta"):
        ours_unet, ours_vae = UNetModel(unet_config), AutoencoderKL(VAEConfig())
        theirs_unet = UNet2DConditionModel(**diffusers_unet_config(unet_config))
        theirs_vae = DiffusersVAE(**diffusers_vae_config(VAEConfig()))
        text = CLIPTextModel(text_config())
    renamed = diffusers_layout.unet_state_dict(theirs_unet.state_dict(), unet_config)
    assert {k: v.shape for k, v in renamed.items()} == \
        {k: v.shape for k, v in ours_unet.state_dict().items()}
    renamed = diffusers_layout.vae_state_dict(theirs_vae.state_dict(), VAEConfig())
    assert {k: v.shape for k, v in renamed.items()} == \
        {k: v.shape for k, v in ours_vae.state_dict().items()}
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours_unet, ours_vae, text)]
    print(name, counts)
    assert counts == [unet_count, vae_count, text_count]


# ----------------------------------------------------------------------------- rules

def meta_state_dict(family: str) -> dict:
    """A tiny model's single-file keys on the meta device, for the detection rules."""
    model = tiny_model(family)
    return {k: v.to("meta") for k, v in compvis_state_dict(model).items()}


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(1)}),
     "a LoRA file"),
    (lambda sd: sd.update({"conditioner.embedders.0.transformer.x": torch.zeros(1)}), "SDXL"),
    (lambda sd: sd.update({UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(1)}), "unCLIP"),
    (lambda sd: sd.update({"control_model.input_blocks.0.0.weight": torch.zeros(1)}), "ControlNet"),
    (lambda sd: sd.update({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
     "an inpainting model (UNet in_channels 9"),
    (lambda sd: sd.update({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3)}),
     "depth"),
    (lambda sd: sd.update({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 8, 3, 3)}),
     "InstructPix2Pix"),
    (lambda sd: [sd.pop(k) for k in list(sd) if not k.startswith(VAE_PREFIX)], "a VAE-only file"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(VAE_PREFIX)],
     "a UNet without its VAE"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("cond_stage_model.")],
     "without a text encoder"),
])
def test_refused_models_name_what_was_found(change, message):
    sd = meta_state_dict("sd1")
    change(sd)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)):
        ckpt.detect_family(sd)


def test_family_detection():
    assert ckpt.detect_family(meta_state_dict("sd1"))[0] == "sd1"
    family, rule = ckpt.detect_family(meta_state_dict("sd2"))
    assert family == "sd2" and "OpenCLIP" in rule
    unet_only = {k: v for k, v in diffusers_unet(randomize(UNetModel(UNET["sd1"]))).state_dict()
                 .items()}
    with pytest.raises(ckpt.CheckpointError, match="a diffusers UNet weights file alone"):
        ckpt.detect_family(unet_only)


def test_prediction_type_rules(tmp_path):
    decide = ckpt.decide_prediction_type
    assert decide("sd1") == ("epsilon", "convention: SD 1.x predicts noise")
    assert decide("sd2")[0] == "v_prediction" and "768-v" in decide("sd2")[1]
    assert decide("sd2", global_step=875000)[0] == "epsilon"
    assert decide("sd2", global_step=110000)[0] == "v_prediction"
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert decide("sd1", yaml_path=str(yaml)) == ("v_prediction", f"parameterization in {yaml}")
    yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert decide("sd2", yaml_path=str(yaml))[0] == "epsilon"  # CompVis' default is eps
    assert decide("sd2", metadata={"modelspec.prediction_type": "epsilon"})[0] == "epsilon"
    assert decide("sd1", metadata={"prediction_type": "v_prediction"}) == \
        ("v_prediction", "file metadata")
    # the explicit argument wins over everything
    assert decide("sd2", "epsilon", {"prediction_type": "v_prediction"}, str(yaml), 5) == \
        ("epsilon", "given explicitly")
    with pytest.raises(ckpt.CheckpointError, match="must be one of"):
        decide("sd1", "v")


def test_prediction_type_override_and_yaml_beside_file(tmp_path):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    torch.save(compvis_state_dict(model), tmp_path / "m.ckpt")  # a bare state dict works too
    assert ckpt.load(str(tmp_path / "m.ckpt")).prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("    parameterization: v\n")
    loaded = ckpt.load(str(tmp_path / "m.ckpt"))
    assert loaded.prediction_type == "v_prediction" and "m.yaml" in \
        loaded.decided_by["prediction_type"]
    loaded = ckpt.load(str(tmp_path / "m.ckpt"), prediction_type="epsilon")
    assert loaded.decided_by["prediction_type"] == "given explicitly"


def test_tokenizer_lookup(tmp_path):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    ckpt.save_single_file(str(tmp_path / "m.safetensors"), model)
    other = write_tokenizer(str(tmp_path / "elsewhere"))
    loaded = ckpt.load(str(tmp_path / "m.safetensors"), tokenizer_dir=other)
    assert loaded.decided_by["tokenizer"] == f"given: {other}"
    alone = tmp_path / "alone"
    alone.mkdir()
    os.rename(tmp_path / "m.safetensors", alone / "m.safetensors")
    from ldm.text import find_bpe_vocabulary
    with pytest.raises(ckpt.CheckpointError, match="--tokenizer DIR"):  # none, or CLIP's 49408
        ckpt.load(str(alone / "m.safetensors"))
    if find_bpe_vocabulary() is None:
        meta = ckpt.load(str(alone / "m.safetensors"), device="meta")  # inspection needs none
        assert meta.text_encoder.pad_token_id == model.text_encoder.pad_token_id


def test_state_dict_fingerprint():
    a = randomize(UNetModel(UNET["sd1"])).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert state_dict_fingerprint(a) == state_dict_fingerprint(b)
    assert len(state_dict_fingerprint(a)) == 32
    b["out.2.weight"] = b["out.2.weight"] * 1.001
    assert state_dict_fingerprint(a) != state_dict_fingerprint(b)
    c = dict(a)
    c["renamed"] = c.pop("out.2.weight")
    assert state_dict_fingerprint(a) != state_dict_fingerprint(c)
    # the digest itself is fixed: shift files store it, and a change would orphan them all
    fixed = {"unet.out.2.weight": torch.linspace(-1, 1, 60).reshape(3, 4, 5),
             "text.big": torch.arange(10007, dtype=torch.float16), "step": torch.tensor(7)}
    assert state_dict_fingerprint(fixed) == "754a846d6ec8b4cc685320b84183e9b6"


@torch.no_grad()
def test_base_fingerprint_covers_unet_and_text_encoder_only(tmp_path):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    base = model.base_fingerprint()
    # what shift files already carry: both state dicts under "unet." and "text." names
    assert base == state_dict_fingerprint(
        {**{f"unet.{k}": v for k, v in model.unet.state_dict().items()},
         **{f"text.{k}": v for k, v in model.text_encoder.state_dict().items()}})
    model.vae.decoder.conv_out.bias.add_(1)  # shifts never touch the VAE
    assert model.base_fingerprint() == base
    model.text_encoder.transformer.final_layer_norm.bias.add_(1e-3)
    text_changed = model.base_fingerprint()
    model.unet.out[2].bias.add_(1e-3)
    assert len({base, text_changed, model.base_fingerprint()}) == 3
