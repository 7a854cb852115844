"""edit.shifts / edit.sample --shift, --interpolate, --mix: shift files merged into a fresh base
equal the model with the same combined deltas attached (the identity W = U diag(ReLU(sigma +
combination)) V^T), the named layer groups hold the layers they say, and files for another base
are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

import spectral
from edit import sample
from edit.shifts import apply_deltas, apply_shifts, layer_chooser, parse_shift
from ldm import checkpoint as ckpt
from ldm.unet import UNetConfig, UNetModel
from tiny import tiny_model
from train import lora


def random_shift(model, seed, components=("unet", "text")):
    """Random deltas named as the model's attached layers would be. Attaching and detaching
    rounds the weights, so take the model's fingerprint before calling this."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for component in components:
        module = {"unet": model.unet, "text": model.text_encoder}[component]
        for name, d in spectral.attach(module, progress=False).named_deltas().items():
            deltas[f"{component}.{name}"] = 0.05 * torch.randn(d.shape, generator=g)
        spectral.detach(module)
    return deltas


def save(path, deltas, base):
    spectral.save_shifts(str(path), deltas, {"base_fingerprint": base})


def output(model, prompt="a photo"):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), model.encode_prompts([prompt]))


def attached_reference(tokenizer_dir, deltas):
    """A fresh base with `deltas` loaded into attached layers (no merge)."""
    model = tiny_model("sd1", tokenizer_dir=tokenizer_dir)
    for component, module in (("unet", model.unet), ("text", model.text_encoder)):
        own = {k[len(component) + 1:]: v for k, v in deltas.items() if k.startswith(component + ".")}
        spectral.attach(module, progress=False)
        spectral.load_deltas(module, own)
    return model


def test_parse_shift(tmp_path):
    assert parse_shift("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_shift("dir/a.safetensors:0.25") == ("dir/a.safetensors", 0.25)
    assert parse_shift("dir/a.safetensors:-1") == ("dir/a.safetensors", -1.0)
    assert parse_shift("C:\\x\\a.safetensors") == ("C:\\x\\a.safetensors", 1.0)
    # a weight that is not a finite number is refused, not read as part of the path
    for weight, message in (("nan", "finite number"), ("inf", "finite number"), ("abc", "not a number"),
                            ("", "not a number")):
        with pytest.raises(ValueError, match=message):
            parse_shift(f"dir/a.safetensors:{weight}")
    # unless the whole text names an existing file: then the ':' is the file's own
    named = tmp_path / "run:abc"
    named.write_bytes(b"")
    assert parse_shift(str(named)) == (str(named), 1.0)
    assert parse_shift(f"{named}:0.5") == (str(named), 0.5)


def test_two_weighted_files_merge_to_the_weighted_sum(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the SVD cache goes under the temporary home
    tok = str(tmp_path / "tok")
    base = tiny_model("sd1", tokenizer_dir=tok)
    base_fingerprint = base.base_fingerprint()
    first, second = random_shift(base, 1), random_shift(base, 2, components=("unet",))
    save(tmp_path / "a.safetensors", first, base_fingerprint)
    save(tmp_path / "b.safetensors", second, base_fingerprint)

    merged = tiny_model("sd1", tokenizer_dir=tok)
    apply_shifts(merged, [(str(tmp_path / "a.safetensors"), 0.7), (str(tmp_path / "b.safetensors"), 0.3)],
                 progress=False)
    assert not spectral.layers.shifted_modules(merged.unet)  # merged: plain layers again

    expected = {k: 0.7 * v + 0.3 * second.get(k, torch.zeros_like(v)) for k, v in first.items()}
    reference = attached_reference(tok, expected)
    torch.testing.assert_close(output(merged), output(reference), rtol=1e-5, atol=1e-5)
    assert (output(merged) - output(tiny_model("sd1", tokenizer_dir=tok))).abs().max() > 1e-3


def test_shift_for_another_base_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = str(tmp_path / "tok")
    base, other = tiny_model("sd1", tokenizer_dir=tok), tiny_model("sd1", tokenizer_dir=tok, seed=1)
    base_fingerprint = base.base_fingerprint()
    save(tmp_path / "a.safetensors", random_shift(base, 1), base_fingerprint)
    with pytest.raises(spectral.ShiftFileError, match="another base model"):
        apply_shifts(other, [(str(tmp_path / "a.safetensors"), 1.0)], progress=False)


def test_cli_shift(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = str(tmp_path / "tokenizer")
    base = tiny_model("sd1", tokenizer_dir=tok)
    ckpt.save_single_file(str(tmp_path / "tiny.safetensors"), base)
    loaded = ckpt.load(str(tmp_path / "tiny.safetensors"))
    base_fingerprint = loaded.base_fingerprint()
    save(tmp_path / "a.safetensors", random_shift(loaded, 1), base_fingerprint)
    common = ["--model", str(tmp_path / "tiny.safetensors"), "--prompt", "a photo", "--num-images", "1",
              "--sample-steps", "2", "--size", "16", "--quiet", "--plain"]
    assert sample.main(common + ["--output", str(tmp_path / "base.png")]) == 0
    assert sample.main(common + ["--shift", str(tmp_path / "a.safetensors:2"),
                                 "--output", str(tmp_path / "shifted.png")]) == 0
    assert (tmp_path / "base.png").read_bytes() != (tmp_path / "shifted.png").read_bytes()
    # a half-precision run checks the file against the float32 weights it was trained on
    assert sample.main(common + ["--shift", str(tmp_path / "a.safetensors"), "--dtype", "bfloat16",
                                 "--output", str(tmp_path / "half.png")]) == 0

    save(tmp_path / "other.safetensors", {"unet.out.2": torch.zeros(4)}, "0" * 32)
    assert sample.main(common + ["--shift", str(tmp_path / "other.safetensors"),
                                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base model" in err[0]


def test_cli_lora_adds_the_update_once_and_weight_0_is_the_base(tmp_path, monkeypatch):
    """edit.sample --lora FILE:W merges W B A into the weights: W = 0 draws the base model's
    image exactly; W = 1 draws what the model with the adapters attached draws, and so does
    the file given twice at weight 0.5 (each checked against the base, not the first merge)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    base = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    ckpt.save_single_file(str(tmp_path / "tiny.safetensors"), base)
    model = ckpt.load(str(tmp_path / "tiny.safetensors"))
    adapted = {"unet": lora.attach(model.unet, 2, lora.UNET_TARGETS, torch.Generator().manual_seed(0)),
               "text": lora.attach(model.text_encoder, 2, lora.TEXT_TARGETS, torch.Generator().manual_seed(1))}
    for layer in (layer for layers in adapted.values() for layer in layers.values()):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    lora.save(tmp_path / "lora.safetensors", adapted, model.unet.config,
              {"base_fingerprint": ckpt.load(str(tmp_path / "tiny.safetensors")).base_fingerprint()})
    common = ["--model", str(tmp_path / "tiny.safetensors"), "--prompt", "a photo", "--num-images", "1",
              "--sample-steps", "2", "--size", "16", "--quiet", "--plain"]
    grids = {}
    for name, extra in (("base", []), ("zero", ["--lora", f"{tmp_path}/lora.safetensors:0"]),
                        ("one", ["--lora", f"{tmp_path}/lora.safetensors"]),
                        ("halves", ["--lora", f"{tmp_path}/lora.safetensors:0.5"] * 2)):
        assert sample.main(common + extra + ["--output", str(tmp_path / f"{name}.png")]) == 0
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    attached = model.generate(["a photo"], steps=2, height=16, width=16, seed=0, progress=False)
    assert np.array_equal(grids["zero"], grids["base"])
    assert not np.array_equal(grids["one"], grids["base"])
    expected = (attached[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    for name in ("one", "halves"):
        inner = grids[name][2:-2, 2:-2]                               # inside the grid's 2-pixel border
        assert np.abs(inner.astype(int) - expected.astype(int)).max() <= 1, name   # float32 rounding


# --- interpolation and style mixing ---------------------------------------------------------------

def test_interpolation_is_relu_after_combining(tmp_path, monkeypatch):
    """alpha A + (1 - alpha) B merged equals the attached layers holding that sum (the ReLU of
    sigma + the combination, not a combination of ReLUs: the deltas are large enough to clip)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = str(tmp_path / "tok")
    base = tiny_model("sd1", tokenizer_dir=tok)
    first, second = random_shift(base, 1), random_shift(base, 2)
    first = {k: 40 * v for k, v in first.items()}             # pushes some sigma + delta below 0
    merged = tiny_model("sd1", tokenizer_dir=tok)
    apply_deltas(merged, spectral.interpolate(first, second, 0.3), progress=False)
    expected = {k: 0.3 * first[k] + 0.7 * second[k] for k in first}
    torch.testing.assert_close(output(merged), output(attached_reference(tok, expected)), rtol=1e-5, atol=1e-5)


def sd15_layer_names():
    """Shift-file names of SD 1.5's UNet layers (built on the meta device: no memory)."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig())
    return [f"unet.{name}" for name in spectral.layers.targets(unet)], unet.config


def test_named_groups_hold_the_layers_their_documentation_says():
    names, config = sd15_layer_names()
    chosen = lambda spec: {n for n in names if layer_chooser(spec, config)(n)}
    block = lambda n: int(n.split(".")[2])
    assert chosen("down") == {n for n in names if n.startswith("unet.input_blocks.")}
    assert chosen("coarse") == {n for n in names if (n.startswith("unet.input_blocks.") and block(n) >= 7)
                                or n.startswith("unet.middle_block.")
                                or (n.startswith("unet.output_blocks.") and block(n) <= 5)}
    assert chosen("fine") == {n for n in names if (n.startswith("unet.input_blocks.") and block(n) <= 6)
                              or (n.startswith("unet.output_blocks.") and block(n) >= 6)
                              or n.startswith("unet.out.")}
    assert chosen("cross-attention") == {n for n in names if ".attn2." in n} and len(chosen("cross-attention")) == 16 * 4
    assert chosen("up,mid") == {n for n in names if n.startswith(("unet.output_blocks.", "unet.middle_block."))}
    assert not any(chosen(group) & {"unet.time_embed.0", "unet.time_embed.2"} for group in ("coarse", "fine"))
    text = ["text.transformer.encoder.layers.0.self_attn.q_proj", "text.transformer.final_layer_norm"]
    assert all(layer_chooser("text", config)(n) for n in text) and not chosen("text")
    assert chosen("unet.output_blocks.1*") == {n for n in names if n.startswith("unet.output_blocks.1")}
    with pytest.raises(ValueError, match="unknown group 'middle'"):
        layer_chooser("middle", config)


def test_cli_interpolate_and_mix(tmp_path, monkeypatch, capsys):
    """--interpolate's rows at alpha 1 and 0 are --shift A's and --shift B's images (the base
    weights restored between rows); --mix coarse is the attached model with A's deltas on the
    coarse layers and B's elsewhere."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = str(tmp_path / "tokenizer")
    base = tiny_model("sd1", tokenizer_dir=tok)
    ckpt.save_single_file(str(tmp_path / "tiny.safetensors"), base)
    fingerprint = ckpt.load(str(tmp_path / "tiny.safetensors")).base_fingerprint()
    first, second = random_shift(base, 1), random_shift(base, 2)
    save(tmp_path / "a.safetensors", first, fingerprint)
    save(tmp_path / "b.safetensors", second, fingerprint)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    common = ["--model", str(tmp_path / "tiny.safetensors"), "--prompt", "a photo", "--num-images", "1",
              "--sample-steps", "2", "--size", "16", "--quiet", "--plain"]
    grid = lambda name: np.asarray(Image.open(tmp_path / name))
    for args, name in (([ "--shift", a], "a.png"), (["--shift", b], "b.png"),
                       (["--interpolate", a, b, "--alpha", "1,0"], "ab.png")):
        assert sample.main(common + args + ["--output", str(tmp_path / name)]) == 0
    tile = lambda image, row: image[2 + 18 * row:18 + 18 * row, 2:18]
    np.testing.assert_array_equal(tile(grid("ab.png"), 0), tile(grid("a.png"), 0))
    np.testing.assert_array_equal(tile(grid("ab.png"), 1), tile(grid("b.png"), 0))

    mixed = ckpt.load(str(tmp_path / "tiny.safetensors"))
    choose = layer_chooser("coarse", mixed.unet.config)
    expected = spectral.mix(first, second, choose)
    assert any(choose(n) for n in expected) and not all(choose(n) for n in expected)
    model = ckpt.load(str(tmp_path / "tiny.safetensors"))
    apply_deltas(model, dict(expected), progress=False)
    torch.testing.assert_close(output(model), output(attached_reference(tok, expected)), rtol=1e-5, atol=1e-5)
    assert sample.main(common + ["--mix", a, b, "--mix-layers", "coarse", "--output", str(tmp_path / "mix.png")]) == 0
    reference = ckpt.load(str(tmp_path / "tiny.safetensors"))
    apply_deltas(reference, dict(expected), progress=False)
    image = reference.generate(["a photo"], steps=2, seed=0, height=16, width=16, progress=False)
    pixels = (image[0] * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(tile(grid("mix.png"), 0).astype(int) - pixels).max() <= 1

    for args, message in ((["--interpolate", a, b, "--alpha", "0,1.5"], "each alpha must be in [0, 1], got 1.5"),
                          (["--interpolate", a, b, "--alpha", "nan"], "each alpha must be in [0, 1], got nan"),
                          (["--alpha", "0.5"], "--alpha weighs the two files of --interpolate"),
                          (["--mix", a, b], "--mix A B and --mix-layers GROUPS go together"),
                          (["--mix", a, b, "--mix-layers", "bottom"], "unknown group 'bottom'"),
                          (["--mix", a, b, "--mix-layers", "unet.output_blocks"], "names no layer of the files"),
                          (["--mix", a, b, "--mix-layers", "coarse", "--shift", a], "give one way of combining")):
        try:
            code = sample.main(common + args + ["--output", str(tmp_path / "bad.png")])
        except SystemExit as error:   # argparse's own refusals
            code = error.code
        assert code == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("usage")]
        assert len(err) >= 1 and message in err[-1], err
    save(tmp_path / "other.safetensors", {"unet.out.2": torch.zeros(4)}, "0" * 32)
    assert sample.main(common + ["--interpolate", a, str(tmp_path / "other.safetensors"),
                                 "--output", str(tmp_path / "bad.png")]) == 2
    assert "another base model" in capsys.readouterr().err
