"""ldm.text: CompVis text-encoder keys <-> CLIPTextModel, checked against diffusers' own converters
(the oracle) on tiny random models, plus the tokenizer conventions of each SD family."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from ldm import text
from ldm.family import FAMILIES
from ldm.text import (TextEncoder, TokenizerNotFound, byte_symbols, compvis_text_state_dict,
                      hf_text_state_dict, load_tokenizer, text_config_from_state_dict)

WIDTH, HEADS, MLP, VOCAB, CONTEXT = 32, 4, 128, 600, 77   # MLP = 4 * WIDTH as in OpenCLIP
ATOL = 1e-5
SD1_PREFIX, SD2_PREFIX = FAMILIES["sd1"].text_prefix, FAMILIES["sd2"].text_prefix


def tiny_config(layers: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=layers,
                          num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act=act,
                          bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    """A CLIP-format vocab.json + merges.txt: byte symbols, their </w> forms, a few merges, specials."""
    folder = tmp_path_factory.mktemp("model") / "tokenizer"
    folder.mkdir()
    symbols = byte_symbols()
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + ["ca", "cat</w>", "do", "dog</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def token_ids(batch=2, length=CONTEXT):
    ids = torch.randint(0, VOCAB - 2, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 9] = VOCAB - 2, VOCAB - 1
    return ids


def random_openclip_checkpoint(blocks: int = 24, projection: int = 16) -> dict:
    """A tiny text tower in SD 2's OpenCLIP layout. 24 blocks, as the real ViT-H: diffusers'
    converter drops block 23 by name, so the oracle needs the real block count."""
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: 0.2 * torch.randn(*shape, generator=gen)
    sd = {"token_embedding.weight": rand(VOCAB, WIDTH), "positional_embedding": rand(CONTEXT, WIDTH),
          "ln_final.weight": 1 + rand(WIDTH), "ln_final.bias": rand(WIDTH),
          "text_projection": rand(WIDTH, projection), "logit_scale": torch.tensor(4.6)}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + rand(WIDTH), p + "ln_1.bias": rand(WIDTH),
                   p + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": rand(3 * WIDTH),
                   p + "attn.out_proj.weight": rand(WIDTH, WIDTH), p + "attn.out_proj.bias": rand(WIDTH),
                   p + "ln_2.weight": 1 + rand(WIDTH), p + "ln_2.bias": rand(WIDTH),
                   p + "mlp.c_fc.weight": rand(MLP, WIDTH), p + "mlp.c_fc.bias": rand(MLP),
                   p + "mlp.c_proj.weight": rand(WIDTH, MLP), p + "mlp.c_proj.bias": rand(WIDTH)})
    return {SD2_PREFIX + k: v for k, v in sd.items()}


def strip_text_model(diffusers_sd: dict) -> dict:
    """diffusers' converters emit transformers-4 names; transformers 5's CLIPTextModel has no
    text_model level (diffusers strips it the same way when it loads)."""
    return {k.removeprefix("text_model."): v for k, v in diffusers_sd.items()}


# --------------------------------------------------------------------------- SD 1

def test_sd1_checkpoint_loads_like_diffusers(tiny_tokenizer_dir):
    reference = CLIPTextModel(tiny_config(3, "quick_gelu")).eval()
    checkpoint = {f"{SD1_PREFIX}text_model.{k}": v for k, v in reference.state_dict().items()}
    checkpoint[f"{SD1_PREFIX}text_model.embeddings.position_ids"] = torch.zeros(1, CONTEXT)   # corrupt: ignored
    checkpoint["model.diffusion_model.out.0.weight"] = torch.ones(4)                          # not text

    hf = hf_text_state_dict(checkpoint, "sd1")
    ours = TextEncoder(text_config_from_state_dict(hf, "sd1", HEADS), load_tokenizer(str(tiny_tokenizer_dir))).eval()
    ours.transformer.load_state_dict(hf, strict=True)

    oracle = CLIPTextModel(tiny_config(3, "quick_gelu")).eval()
    converted = strip_text_model(convert_ldm_clip_checkpoint(checkpoint))
    converted.pop("embeddings.position_ids")
    oracle.load_state_dict(converted, strict=True)

    ids = token_ids()
    with torch.no_grad():
        diff = (ours(ids) - oracle(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"SD1 text encoder vs diffusers-converted CLIPTextModel: max abs diff {diff:.2e}")
    assert diff <= ATOL

    back = compvis_text_state_dict(ours, "sd1")
    assert back.keys() == checkpoint.keys() - {f"{SD1_PREFIX}text_model.embeddings.position_ids",
                                                "model.diffusion_model.out.0.weight"}
    assert all(torch.equal(back[k], checkpoint[k]) for k in back)


def test_sd1_keys_without_text_model_level():
    """Older files (and transformers-5 exports) may lack "text_model.": both spellings load."""
    model = CLIPTextModel(tiny_config(1, "quick_gelu"))
    flat = {SD1_PREFIX + k: v for k, v in model.state_dict().items()}
    assert hf_text_state_dict(flat, "sd1").keys() == model.state_dict().keys()
    for family in ("sd1", "sd2"):
        with pytest.raises(ValueError, match=f"no {family} text encoder"):
            hf_text_state_dict({"model.diffusion_model.x": torch.zeros(1)}, family)


# --------------------------------------------------------------------------- SD 2

def test_sd2_openclip_checkpoint_matches_diffusers(tiny_tokenizer_dir):
    checkpoint = random_openclip_checkpoint()
    hf = hf_text_state_dict(checkpoint, "sd2")
    config = text_config_from_state_dict(hf, "sd2", HEADS)
    assert config.num_hidden_layers == 23 and config.hidden_act == "gelu"
    ours = TextEncoder.for_family("sd2", load_tokenizer(str(tiny_tokenizer_dir)), config).eval()
    ours.transformer.load_state_dict(hf, strict=True)

    oracle = CLIPTextModel(tiny_config(23, "gelu")).eval()
    oracle.load_state_dict(strip_text_model(convert_open_clip_checkpoint(oracle, checkpoint)), strict=True)

    # independent of diffusers: all 24 blocks, penultimate hidden state, then the final layer norm
    full = CLIPTextModel(tiny_config(24, "gelu")).eval()
    last = {f"encoder.layers.23.{k}": torch.randn_like(v)
            for k, v in full.encoder.layers[23].state_dict().items()}
    full.load_state_dict({**hf, **last}, strict=True)

    ids = token_ids()
    with torch.no_grad():
        got = ours(ids)
        diff = (got - oracle(input_ids=ids).last_hidden_state).abs().max().item()
        penultimate = full.final_layer_norm(full(input_ids=ids, output_hidden_states=True).hidden_states[-2])
        diff_penultimate = (got - penultimate).abs().max().item()
    print(f"SD2 text encoder vs diffusers' convert_open_clip_checkpoint: max abs diff {diff:.2e}; "
          f"vs 24-block penultimate + final norm: {diff_penultimate:.2e}")
    assert diff <= ATOL and diff_penultimate <= ATOL

    back = compvis_text_state_dict(ours, "sd2")
    dropped = {k for k in checkpoint if ".resblocks.23." in k} | {SD2_PREFIX + "text_projection",
                                                                   SD2_PREFIX + "logit_scale"}
    assert back.keys() == checkpoint.keys() - dropped
    assert all(torch.equal(back[k], checkpoint[k]) for k in back)
    # what we write holds only the used blocks: read back with the config's layer count
    again = hf_text_state_dict(back, "sd2", num_layers=config.num_hidden_layers)
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)


def test_sd2_unknown_keys_are_refused():
    checkpoint = random_openclip_checkpoint(blocks=2)
    checkpoint[SD2_PREFIX + "transformer.resblocks.0.attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        hf_text_state_dict(checkpoint, "sd2")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_configs_match_the_checkpoint_layout(family):
    """On the meta device: SD 1.5 / SD 2.1 text towers, key set and every shape as diffusers'
    converters produce them from a CompVis-layout checkpoint of the real sizes."""
    with torch.device("meta"):
        model = CLIPTextModel(FAMILIES[family].text_config())
        if family == "sd1":
            checkpoint = {f"{SD1_PREFIX}text_model.{k}": v for k, v in model.state_dict().items()}
            converted = convert_ldm_clip_checkpoint(checkpoint)
        else:
            checkpoint = {SD2_PREFIX + k: torch.empty(s) for k, s in openclip_vit_h_shapes().items()}
            converted = convert_open_clip_checkpoint(model, checkpoint)
            converted.pop("text_projection.weight", None)
    want = {k: v.shape for k, v in strip_text_model(converted).items()}
    ours = {k: v.shape for k, v in hf_text_state_dict(checkpoint, family).items()}
    have = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == want == have
    count = sum(p.numel() for p in model.parameters())
    print(f"{family} text encoder parameters: {count:,}")
    assert count == {"sd1": 123_060_480, "sd2": 340_387_840}[family]


def openclip_vit_h_shapes() -> dict:
    width, shapes = 1024, {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
                           "ln_final.weight": (1024,), "ln_final.bias": (1024,),
                           "text_projection": (1024, 1024), "logit_scale": ()}
    for i in range(24):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                       p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                       p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                       p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                       p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                       p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)})
    return shapes


# --------------------------------------------------------------------------- tokenizer

def test_clip_bpe_vocabulary_golden_ids():
    if text.find_bpe_vocabulary() is None:
        pytest.skip(f"no installed package ships {text.BPE_FILE} (pip install --no-deps open_clip_torch)")
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    encoder = TextEncoder.for_family("sd1", tokenizer, tiny_config(1, "quick_gelu"))
    ids = encoder.tokenize(["a photo of a cat", "photo " * 200])
    assert ids.shape == (2, 77) and (ids[0, 7:] == 49407).all()
    assert ids[1, 0] == 49406 and (ids[1, 1:76] == 1125).all() and ids[1, 76] == 49407   # truncated


def test_tokenizer_saved_as_tokenizer_json_alone(tiny_tokenizer_dir, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json, no vocab.json / merges.txt: a
    diffusers folder saved that way must load, and tokenize as the original does."""
    original = load_tokenizer(str(tiny_tokenizer_dir))
    folder = tmp_path / "model" / "tokenizer"
    original.save_pretrained(folder)
    for legacy in ("vocab.json", "merges.txt"):
        (folder / legacy).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    reloaded = load_tokenizer(str(tmp_path / "model"))
    for prompt in ["a cat", "dog cat  do\tCAT!", "x" * 90]:
        assert reloaded(prompt)["input_ids"] == original(prompt)["input_ids"]


def test_missing_tokenizer_says_how_to_supply_one(tmp_path, monkeypatch):
    with pytest.raises(TokenizerNotFound, match="vocab.json"):
        load_tokenizer(str(tmp_path))
    monkeypatch.setattr(text, "find_bpe_vocabulary", lambda: None)
    with pytest.raises(TokenizerNotFound) as error:
        load_tokenizer()
    message = str(error.value)
    assert "\n" not in message and "--tokenizer DIR" in message and "vocab.json" in message


@pytest.mark.parametrize("family, pad", [("sd1", "eos"), ("sd2", 0)])
def test_tokenize_pads_per_family(tiny_tokenizer_dir, family, pad):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir.parent))   # a diffusers folder: tokenizer/ inside
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if pad == "eos" else pad
    encoder = TextEncoder.for_family(family, tokenizer, tiny_config(2, "quick_gelu"))
    ids = encoder.tokenize(["a cat", "dog", ""])
    cat, dog = tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    a = tokenizer.convert_tokens_to_ids("a</w>")
    assert ids.shape == (3, 77)
    assert ids[0, :4].tolist() == [bos, a, cat, eos] and (ids[0, 4:] == pad).all()
    assert ids[1, :3].tolist() == [bos, dog, eos] and (ids[1, 3:] == pad).all()
    assert ids[2, :2].tolist() == [bos, eos] and (ids[2, 2:] == pad).all()   # the guidance prompt
    context = encoder.encode(["a cat", ""])
    assert context.shape == (2, 77, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(context, encoder(ids[[0, 2]]))


def test_a_prompt_over_77_tokens_is_cut_with_one_warning_per_prompt(tiny_tokenizer_dir, capsys):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    encoder = TextEncoder.for_family("sd1", tokenizer, tiny_config(2, "quick_gelu"))
    fits, cut = " ".join(["cat"] * 75), " ".join(["dog"] * 76)  # + <|startoftext|>, <|endoftext|>
    long = "a photo of a cat\non the left " * 20  # 1 token a letter or space: hundreds of tokens
    ids = encoder.tokenize([fits, cut, long])
    assert capsys.readouterr().err.splitlines() == [
        "warning: prompt '" + " ".join(["dog"] * 14) + " d...' is 78 tokens; CLIP reads the first "
        "77, the rest is ignored",
        f"warning: prompt '{' '.join(long.split())[:57]}...' is "
        f"{len(tokenizer.tokenize(long)) + 2} tokens; CLIP reads the first 77, the rest is ignored"]
    # cut as before: the first 75 tokens, then <|endoftext|>
    dog = tokenizer.convert_tokens_to_ids("dog</w>")
    assert ids[1].tolist() == [tokenizer.bos_token_id] + [dog] * 75 + [tokenizer.eos_token_id]
    assert ids[0, -1] == tokenizer.eos_token_id
    encoder.tokenize([cut, long, cut])  # each distinct prompt warns once
    encoder.encode([long])
    assert capsys.readouterr().err == ""
