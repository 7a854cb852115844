"""train/lora.py, the LoRA baseline's layers: an untrained adapter is the base model, merged
equals unmerged, and the file's diffusers names put each update on the same layer of diffusers'
own UNet2DConditionModel (the oracle: its output with the updates added by name equals ours),
and diffusers' own load_lora_weights reads the file we write onto the same UNet and text-encoder
layers."""

import copy
import logging

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from oracle import diffusers_unet, diffusers_vae
from tiny import UNET, one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from train import lora


def unet_output(unet, context_dim=64):
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, context_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), context)


def with_random_updates(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_untrained_adapters_are_the_base_and_merged_equals_unmerged(family):
    model = tiny_model(family)
    before = unet_output(model.unet)
    layers = lora.attach(model.unet, rank=4, targets=lora.UNET_TARGETS)
    transformers = sum(1 for name, _ in model.unet.named_modules() if name.endswith("attn1"))
    assert len(layers) == 8 * transformers                      # q, k, v, out of attn1 and attn2
    assert torch.equal(unet_output(model.unet), before)         # B = 0
    assert {p for p in model.unet.parameters() if p.requires_grad} == \
        {p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    with_random_updates(layers)
    unmerged = unet_output(model.unet)
    assert (unmerged - before).abs().max() > 1e-3
    lora.merge(model.unet)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.unet.modules())
    torch.testing.assert_close(unet_output(model.unet), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_file_names_are_diffusers_names_of_the_same_layers(family):
    model = tiny_model(family)
    theirs = diffusers_unet(model.unet)
    layers = lora.attach(model.unet, rank=2, targets=lora.UNET_TARGETS)
    with_random_updates(layers)
    tensors = lora.state_dict({"unet": layers}, UNET[family])
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, A in tensors.items():
            if name.endswith(".lora_A.weight"):
                prefix = name[:-len(".lora_A.weight")]
                assert lora.our_name(prefix, UNET[family])[1] in layers     # the names go back
                B = tensors[prefix + ".lora_B.weight"]
                modules[prefix[len("unet."):]].weight += B @ A
    lora.merge(model.unet)
    torch.testing.assert_close(theirs(*unet_inputs(), return_dict=False)[0],
                               unet_output(model.unet), rtol=1e-4, atol=1e-4)


def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)


def test_text_encoder_names():
    model = tiny_model("sd1")
    layers = lora.attach(model.text_encoder, rank=2, targets=lora.TEXT_TARGETS)
    names = lora.state_dict({"text": layers}, UNET["sd1"])
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 4 * len(model.text_encoder.transformer.encoder.layers)
    assert lora.our_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", UNET["sd1"]) == \
        ("text", "transformer.encoder.layers.0.self_attn.q_proj")


def base_pipeline(model):
    """diffusers' StableDiffusionPipeline holding copies of `model`'s base weights (the scheduler
    is SD's, set explicitly so diffusers does not warn about an outdated config)."""
    return StableDiffusionPipeline(
        vae=diffusers_vae(model.vae), text_encoder=copy.deepcopy(model.text_encoder.transformer),
        tokenizer=model.text_encoder.tokenizer, unet=diffusers_unet(model.unet),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


class Warnings(logging.Handler):
    """diffusers, peft and transformers report skipped or unmatched LoRA keys only as log
    warnings (diffusers' loggers do not propagate, so pytest's caplog misses them)."""

    names = ("diffusers", "transformers", "peft")

    def __enter__(self):
        self.records = []
        for name in self.names:
            logging.getLogger(name).addHandler(self)
        return self.records

    def __exit__(self, *exc):
        for name in self.names:
            logging.getLogger(name).removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append(record.getMessage())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_load_lora_weights_reads_our_file(family, tmp_path):
    """diffusers' own loader (StableDiffusionPipeline.load_lora_weights, through peft) reads the
    file `lora.save` writes, from its folder, without a warning, and puts every update of UNet
    and text encoder on the same layer: its outputs equal ours with the adapters attached."""
    model = tiny_model(family)
    pipe = base_pipeline(model)
    ids = model.text_encoder.tokenize(["a photo of sks cat", "red star on the left"])
    with torch.no_grad():
        base = unet_output(model.unet), model.text_encoder(ids)
    adapted = {"unet": lora.attach(model.unet, rank=2, targets=lora.UNET_TARGETS),
               "text": lora.attach(model.text_encoder, rank=2, targets=lora.TEXT_TARGETS)}
    with_random_updates(adapted["unet"], seed=1)
    with_random_updates(adapted["text"], seed=2)
    lora.save(tmp_path / lora.RESULT_NAME, adapted, model.unet.config, {"base_fingerprint": "x"})
    with Warnings() as warnings:
        pipe.load_lora_weights(str(tmp_path))
    assert warnings == []
    with torch.no_grad():
        ours = unet_output(model.unet), model.text_encoder(ids)
        theirs = (pipe.unet(*unet_inputs(), return_dict=False)[0],
                  pipe.text_encoder(input_ids=ids).last_hidden_state)
    for mine, other, before in zip(ours, theirs, base):
        assert (mine - before).abs().max() > 1e-3                 # the updates matter
        torch.testing.assert_close(other, mine, rtol=1e-5, atol=1e-5)


def test_count_on_sd15_is_the_attention_projections_by_hand():
    """Per SD 1.5 transformer block of width c (context 768): attn1 q, k, v, out are c x c,
    attn2 q and out c x c, k and v c x 768: r (14 c + 1536) values. Blocks: 5 at 320, 5 at 640,
    6 at 1280 (2 down, 3 up per level; the middle block at 1280)."""
    from ldm.unet import UNetConfig, UNetModel
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sd15())
    by_hand = sum(blocks * (14 * c + 1536) for c, blocks in ((320, 5), (640, 5), (1280, 6)))
    for rank in (1, 4, 16):
        assert lora.count(unet, rank, lora.UNET_TARGETS) == rank * by_hand
    assert by_hand * 4 * 4 / 1e6 == pytest.approx(3.19, abs=0.005)   # rank 4, float32: 3.19 MB
