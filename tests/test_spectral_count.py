"""spectral.count on full-size SD 1.5 (meta device) against diffusers' UNet and CLIP arithmetic."""

import torch

from spectral import count


def test_tiny_model_count():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 20),
                                torch.nn.LayerNorm(20), torch.nn.Embedding(5, 7))
    assert count.count(model) == {"layers": 5, "matrices": 8 + 8 + 5, "norm_vectors": 28, "norm_scalars": 2}


def test_sd15_counts_match_diffusers_unet_and_clip_arithmetic(capsys):
    from diffusers import UNet2DConditionModel
    from oracle import diffusers_unet_config
    from ldm.unet import UNetConfig

    ours = count.build("sd15")
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**diffusers_unet_config(UNetConfig.sd15()))
    assert count.count(ours["UNet"]) == count.count(theirs)

    # CLIP ViT-L/14 text: token (768) and position (77) tables, 12 layers of q k v out fc1 fc2
    # (768 each) and 2 layer norms, a final layer norm
    text = count.count(ours["text encoder"])
    assert text == {"layers": 99, "matrices": 768 + 77 + 12 * 6 * 768, "norm_vectors": 25 * 768, "norm_scalars": 25}

    count.main(["--family", "sd15"])
    out = capsys.readouterr().out
    both = out.splitlines()[4]
    assert both.split()[0] == "both" and both.split()[4] == "1.59" and both.split()[6] == "1.12"
    assert "shift file for both, full-vector norms: 1.67 MB" in out
