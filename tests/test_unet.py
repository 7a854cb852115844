"""Our UNet against diffusers' UNet2DConditionModel (the oracle) holding the same weights."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.unet import Attention, UNetConfig, UNetModel
from oracle import UNET_PREFIX, convert_unet, diffusers_unet, diffusers_unet_config, randomize

TOL = 1e-5

TINY = {  # name -> config; widths are multiples of 32 (GroupNorm groups)
    "sd1_conv_heads": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                                 num_res_blocks=1, num_heads=4, context_dim=24),
    "sd2_linear_head_channels": UNetConfig(model_channels=32, channel_mult=(1, 2, 2),
                                           attention_resolutions=(2, 4), num_res_blocks=2,
                                           num_heads=-1, num_head_channels=16, context_dim=40,
                                           use_linear_in_transformer=True, upcast_attention=True),
    "depth2_three_levels": UNetConfig(model_channels=64, channel_mult=(1, 1, 2), attention_resolutions=(4,),
                                      num_res_blocks=1, num_heads=2, context_dim=16, transformer_depth=2,
                                      in_channels=3, out_channels=5),
}


def inputs(config: UNetConfig, batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([999, 3][:batch] + [500] * max(0, batch - 2))
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(name, dtype):
    """fp32 within 1e-5; float64 to rounding (1e-12), which leaves no room for a real mistake."""
    config = TINY[name]
    ours = randomize(UNetModel(config)).eval()
    theirs = diffusers_unet(ours)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, t, context = (v.to(dtype) if v.is_floating_point() else v for v in inputs(config))
    with torch.no_grad():
        a = ours(x, t, context)
        b = theirs(x, t, encoder_hidden_states=context).sample
    diff = (a - b).abs().max().item()
    print(f"{name} {dtype}: max abs diff {diff:.2e} (output std {b.std():.2f})")
    assert a.shape == (2, config.out_channels, 16, 16)
    assert diff <= (TOL if dtype == torch.float32 else 1e-12)


def test_float_timesteps_and_scalar():
    config = TINY["sd1_conv_heads"]
    model = randomize(UNetModel(config)).eval()
    x, _, context = inputs(config)
    with torch.no_grad():
        a = model(x, torch.tensor([250, 250]), context)
        b = model(x, torch.tensor(250.0), context)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_keys_and_shapes(preset):
    """SD 1.5 / 2.1 on the meta device: our converted state dict is exactly what diffusers'
    model expects, key for key and shape for shape."""
    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        ours = UNetModel(config)
        theirs = UNet2DConditionModel(**diffusers_unet_config(config))
    converted = convert_unet({UNET_PREFIX + k: v for k, v in ours.state_dict().items()}, config)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert len(converted) == len(ours.state_dict())  # nothing dropped or duplicated on the way
    count = sum(p.numel() for p in ours.parameters())
    print(f"{preset} UNet parameters: {count / 1e6:.2f} M")
    if preset == "sd15":
        assert round(count / 1e6, 2) == 859.52
    assert count == sum(p.numel() for p in theirs.parameters())


def test_attention_probe():
    config = TINY["sd2_linear_head_channels"]
    model = randomize(UNetModel(config)).eval()
    x, t, context = inputs(config)
    with torch.no_grad():
        plain = model(x, t, context)
    seen = []

    def probe(module, probs):
        seen.append((module, probs))

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attentions:
        m.attention_probe = probe
    with torch.no_grad():
        probed = model(x, t, context)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=0)
    assert len(seen) == len(attentions)
    cross = [(m, p) for m, p in seen if m.to_k.in_features == config.context_dim]
    assert cross
    for module, probs in seen:
        B, heads, Lq, Lk = probs.shape
        assert (B, heads) == (2, module.heads)
        assert Lk == (7 if (module, probs) in cross else Lq)
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, heads, Lq))
    # the probe sees the named modules callers would select by name
    names = {name for name, m in model.named_modules() if m is cross[0][0]}
    assert names and next(iter(names)).endswith("attn2")


def test_gradient_checkpointing_same_grads():
    config = TINY["sd1_conv_heads"]
    model = randomize(UNetModel(config)).train()
    x, t, context = inputs(config)

    def grads():
        model.zero_grad()
        model(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_upcast_attention_in_bfloat16():
    """upcast_attention: probabilities in fp32 inside a bf16 model, output back in bf16."""
    config = TINY["sd2_linear_head_channels"]
    model = randomize(UNetModel(config)).eval()
    x, t, context = inputs(config)
    with torch.no_grad():
        reference = model(x, t, context)
        model.to(torch.bfloat16)
        dtypes = set()
        for m in model.modules():
            if isinstance(m, Attention):
                m.attention_probe = lambda module, probs: dtypes.add(probs.dtype)
        out = model(x.bfloat16(), t, context.bfloat16())
    assert dtypes == {torch.float32} and out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()
