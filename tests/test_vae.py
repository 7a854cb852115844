"""Our VAE against diffusers' AutoencoderKL (the oracle) holding the same weights."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldm.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from oracle import VAE_PREFIX, convert_vae, diffusers_vae, diffusers_vae_config, randomize

TOL = 1e-5

TINY = {
    "two_levels": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16),
    "three_levels": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, embed_dim=3,
                              resolution=32, scale_factor=0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(TINY))
def test_encode_decode_match_diffusers(name, dtype):
    """fp32 within 1e-5; float64 to rounding (1e-12)."""
    config = TINY[name]
    ours = randomize(AutoencoderKL(config)).eval()
    theirs = diffusers_vae(ours)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 24, 32, generator=g) * 2 - 1).to(dtype)
    with torch.no_grad():
        posterior = ours.encode(x)
        reference = theirs.encode(x).latent_dist
        z = torch.randn(posterior.mean.shape, generator=g).to(dtype)
        decoded, decoded_ref = ours.decode(z), theirs.decode(z).sample
    f = 2 ** (len(config.ch_mult) - 1)
    assert posterior.mean.shape == (2, config.embed_dim, 24 // f, 32 // f)
    assert decoded.shape == (2, 3, 24, 32)
    diffs = {"mean": (posterior.mean - reference.mean).abs().max().item(),
             "logvar": (posterior.logvar - reference.logvar).abs().max().item(),
             "decode": (decoded - decoded_ref).abs().max().item()}
    print(name, dtype, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= (TOL if dtype == torch.float32 else 1e-12)


def test_scaled_latents_and_sampling():
    config = TINY["three_levels"]
    vae = randomize(AutoencoderKL(config)).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        latents = vae.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, config.scale_factor * posterior.mean)
        a = vae.encode_latents(x, generator=torch.Generator().manual_seed(3))
        b = vae.encode_latents(x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, latents)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(posterior.mean))


def test_logvar_clamped():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.tensor([-100.0, 0.0, 100.0, 5.0]).view(1, 4, 1, 1)
                         .expand(1, 4, 2, 2)], dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.min() == -30 and posterior.logvar.max() == 20
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_full_size_keys_and_shapes():
    """The SD VAE (ch 128, ch_mult 1 2 4 4) on the meta device: converted keys and shapes are
    exactly what diffusers' AutoencoderKL expects."""
    config = VAEConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        theirs = DiffusersAutoencoderKL(**diffusers_vae_config(config))
    ours_sd = ours.state_dict()
    converted = convert_vae({VAE_PREFIX + k: v for k, v in ours_sd.items()}, config)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert len(converted) == len(ours_sd)
    # spot-check CompVis names: the decoder's up.N is indexed by resolution level
    assert ours_sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert ours_sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ours_sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    count = sum(p.numel() for p in ours.parameters())
    print(f"SD VAE parameters: {count / 1e6:.2f} M")
    assert count == sum(p.numel() for p in theirs.parameters())


def test_attention_levels_names():
    """attn_resolutions (unused by SD, no diffusers equivalent): CompVis keys per block."""
    config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(8,))
    vae = AutoencoderKL(config)
    keys = vae.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert "decoder.up.1.attn.1.q.weight" in keys and "decoder.up.0.attn.0.q.weight" not in keys
    assert vae.decode(vae.encode(torch.zeros(1, 3, 16, 16)).mode()).shape == (1, 3, 16, 16)
