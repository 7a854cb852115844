"""edit.shifts / edit.sample --shift: shift files merged into a fresh base equal the model with
the same deltas attached (the identity W = U diag(ReLU(sigma + sum_i w_i delta_i)) V^T), and
files for another base are refused."""

import pytest
import torch

import spectral
from edit import sample
from edit.shifts import apply_shifts, parse_shift
from ldm import checkpoint as ckpt
from tiny import tiny_model


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
