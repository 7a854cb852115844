"""spectral.count on full-size SD 1.5 (meta device) against numbers derived without it.

Oracles: SD 1.5's layer shapes enumerated by hand from its config (channels 320/640/1280/1280,
2 res blocks a level, attention at the first three levels, context 768), the parameter shapes of
diffusers' own UNet2DConditionModel, and CLIP ViT-L/14's text encoder by arithmetic.
"""

import math
import re
from collections import Counter

import torch

from spectral import count


def test_tiny_model_count():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 20),
                                torch.nn.LayerNorm(20), torch.nn.Embedding(5, 7))
    assert count.count(model) == {"layers": 5, "matrices": 8 + 8 + 5, "norm_vectors": 28, "norm_scalars": 2}


class Tally(Counter):
    """Shift sizes by hand: min(m, n) per weight matrix (m, n); c (or 1) per norm of c channels."""

    def add(self, matrices=(), norms=()):
        self["layers"] += len(matrices) + len(norms)
        self["matrices"] += sum(min(m, n) for m, n in matrices)
        self["norm_vectors"] += sum(norms)
        self["norm_scalars"] += len(norms)


def sd15_unet_by_hand() -> Tally:
    """SD 1.5's UNet, layer by layer. Convs are c_out x (c_in * 9) (3x3) or c_out x c_in (1x1)."""
    levels, context, emb = [320, 640, 1280, 1280], 768, 1280
    tally = Tally()

    def res_block(c_in, c_out):      # norm, 3x3 conv, time projection, norm, 3x3 conv, 1x1 skip
        skip = [(c_out, c_in)] if c_in != c_out else []
        tally.add([(c_out, 9 * c_in), (c_out, emb), (c_out, 9 * c_out)] + skip, [c_in, c_out])

    def transformer(c):
        projections = [(c, c)] * 2                                  # proj_in, proj_out (1x1 convs)
        attention = [(c, c)] * 4                                    # self-attention q, k, v, out
        cross = [(c, c), (c, context), (c, context), (c, c)]        # k and v read the text context
        feed_forward = [(8 * c, c), (c, 4 * c)]                     # GEGLU: c -> 2 x 4c, then 4c -> c
        tally.add(projections + attention + cross + feed_forward, [c] * 4)   # GroupNorm, 3 LayerNorms

    # conv_in, the time-embedding MLP, conv_out, the output norm
    tally.add([(320, 4 * 9), (emb, 320), (emb, emb), (4, 9 * 320)], [320])
    c, skips = 320, [320]
    for level, width in enumerate(levels):                                     # input blocks
        for _ in range(2):
            res_block(c, width)
            c = width
            if level < 3:
                transformer(c)
            skips.append(c)
        if level < 3:
            tally.add([(c, 9 * c)])                                             # downsample, 3x3 stride 2
            skips.append(c)
    res_block(c, c)                                                            # middle block
    transformer(c)
    res_block(c, c)
    for level, width in reversed(list(enumerate(levels))):                     # output blocks
        for _ in range(3):
            res_block(c + skips.pop(), width)                                   # the skip concatenated
            c = width
            if level < 3:
                transformer(c)
        if level > 0:
            tally.add([(c, 9 * c)])                                             # upsample's conv
    return tally


def from_parameters(model: torch.nn.Module) -> Tally:
    """The same sizes from a model's own parameters: every ".weight" with 2+ dims is a matrix
    (c_out x the rest), every 1-d one a norm scale (true of SD's UNet)."""
    tally = Tally()
    for name, p in model.named_parameters():
        if name.endswith(".weight"):
            tally.add(matrices=[(p.shape[0], math.prod(p.shape[1:]))] if p.dim() > 1 else [],
                      norms=[p.numel()] if p.dim() == 1 else [])
    return tally


def test_sd15_counts_match_sd15_shapes_by_hand_and_diffusers(capsys):
    from diffusers import UNet2DConditionModel
    from oracle import diffusers_unet_config
    from ldm.unet import UNetConfig

    unet = sd15_unet_by_hand()
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**diffusers_unet_config(UNetConfig.sd15()))
    assert from_parameters(theirs) == unet
    # CLIP ViT-L/14 text: token (49408 x 768) and position (77 x 768) tables, 12 layers of
    # q k v out (768 x 768), fc1 (3072 x 768), fc2 (768 x 3072) and 2 layer norms, a final one
    text = Tally()
    text.add([(49408, 768), (77, 768)] + 12 * ([(768, 768)] * 4 + [(3072, 768), (768, 3072)]), [768] * 25)

    ours = count.build("sd15")
    assert count.count(ours["UNet"]) == unet and count.count(ours["text encoder"]) == text

    count.main(["--family", "sd15"])
    out = capsys.readouterr().out
    rows = {match[0]: match[1:] for match in re.findall(
        r"^(UNet|text encoder|both) +(\d+) +([\d,]+) +([\d,]+) +([\d.]+) +([\d,]+) +([\d.]+)$", out, re.MULTILINE)}
    for name, expected in {"UNet": unet, "text encoder": text, "both": unet + text}.items():
        values = [expected["layers"], expected["matrices"], expected["norm_vectors"],
                  4 * (expected["matrices"] + expected["norm_vectors"]) / 1e6, expected["norm_scalars"],
                  4 * (expected["matrices"] + expected["norm_scalars"]) / 1e6]
        assert rows[name] == tuple(f"{v:,}" if isinstance(v, int) else f"{v:.2f}" for v in values), name
    # the file: the payload plus, per layer, its name twice (tensor entry, metadata list) and
    # the entry's dtype / shape / offsets: 40 to 256 bytes a layer for names like these
    both = unet + text
    payload = 4 * (both["matrices"] + both["norm_vectors"]) / 1e6
    file_mb = float(re.search(r"shift file for both, full-vector norms: ([\d.]+) MB", out)[1])
    assert payload + 40e-6 * both["layers"] - 0.005 <= file_mb <= payload + 256e-6 * both["layers"] + 0.005
    # DESIGN.md's figures: ~1.7 MB with full-vector norm shifts, ~1.1 MB with one scalar per norm
    assert round(file_mb, 1) == 1.7 and round(float(rows["both"][5]), 1) == 1.1


def test_command_line_help_names_the_program_and_shows_defaults():
    parser = count.build_parser()
    assert parser.prog == "python -m spectral.count"
    assert all(action.help for action in parser._actions)
    text = " ".join(parser.format_help().split())
    assert "usage: python -m spectral.count" in text and "(default: sd15)" in text
