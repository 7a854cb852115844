"""Shift files: round trip and every refusal; atomic writes."""

import os

import pytest
import torch
from safetensors.torch import save_file

from spectral.io import ShiftFileError, load_shifts, save_shifts, write_atomically

FINGERPRINT = "ab" * 16


@pytest.fixture
def deltas():
    torch.manual_seed(0)
    return {"unet.input_blocks.1.1.proj_in": torch.randn(8), "unet.out.0": torch.randn(16),
            "text.transformer.encoder.layers.0.self_attn.q_proj": torch.randn(12)}


def shapes(d):
    return {k: tuple(v.shape) for k, v in d.items()}


def test_round_trip_keeps_values_and_metadata(tmp_path, deltas):
    path = tmp_path / "shift.safetensors"
    args = {"lr": 1e-3, "steps": 500, "prompt": "a photo of sks dog", "dir": tmp_path}
    save_shifts(path, deltas, {"base_fingerprint": FINGERPRINT, "training_args": args})
    loaded, metadata = load_shifts(path, expect_fingerprint=FINGERPRINT, expect_shapes=shapes(deltas))
    assert loaded.keys() == deltas.keys() and all(torch.equal(loaded[k], deltas[k]) for k in deltas)
    assert metadata["format"] == "svdiff-shifts/1" and metadata["base_fingerprint"] == FINGERPRINT
    assert metadata["layers"] == sorted(deltas)
    assert metadata["counts"] == {"layers": 3, "parameters": 36, "bytes": 144}
    assert metadata["training_args"] == {**args, "dir": str(tmp_path)}
    assert os.path.getsize(path) < 144 + 2048


def one_line(error):
    return "\n" not in str(error.value)


def test_refuses_another_base_model(tmp_path, deltas):
    path = tmp_path / "shift.safetensors"
    save_shifts(path, deltas, {"base_fingerprint": FINGERPRINT})
    with pytest.raises(ShiftFileError, match="trained on another base model") as error:
        load_shifts(path, expect_fingerprint="cd" * 16)
    assert one_line(error)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("unet.out.0"), r"1 missing \(unet.out.0\)$"),
    (lambda d: d.update({"unet.extra": torch.zeros(2)}), r"1 unexpected \(unet.extra\)$"),
    (lambda d: d.update({"unet.out.0": torch.zeros(15)}), r"1 of another shape \(unet.out.0: \(15,\) where \(16,\) is expected\)"),
])
def test_refuses_entries_that_do_not_fit(tmp_path, deltas, change, message):
    expected = shapes(deltas)
    change(deltas)
    path = tmp_path / "shift.safetensors"
    save_shifts(path, deltas)
    with pytest.raises(ShiftFileError, match=message) as error:
        load_shifts(path, expect_shapes=expected)
    assert one_line(error)


def test_refuses_unreadable_foreign_and_damaged_files(tmp_path, deltas):
    with pytest.raises(ShiftFileError, match="no such shift file"):
        load_shifts(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ShiftFileError, match="not a readable safetensors file") as error:
        load_shifts(garbage)
    assert one_line(error)
    path = tmp_path / "shift.safetensors"
    save_shifts(path, deltas)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ShiftFileError, match="not a readable safetensors file"):
        load_shifts(truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ShiftFileError, match="not an svdiff shift file"):
        load_shifts(plain)
    mkshing = tmp_path / "spectral_shifts.safetensors"
    save_file({"conv_in.delta": torch.zeros(2)}, mkshing)
    with pytest.raises(ShiftFileError, match="load_mkshing"):
        load_shifts(mkshing)
    relabeled = tmp_path / "relabeled.safetensors"
    save_file({"a": torch.zeros(2)}, relabeled, metadata={"format": '"svdiff-shifts/1"', "layers": '["b"]'})
    with pytest.raises(ShiftFileError, match="do not match its own layer list"):
        load_shifts(relabeled)
    nan = tmp_path / "nan.safetensors"
    save_shifts(nan, {"a": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ShiftFileError, match="non-finite values in a"):
        load_shifts(nan)


# ---------------------------------------------------------------------- atomic writes

def test_write_atomically_replaces_the_file_whole_and_readable(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    write_atomically(lambda temporary: open(temporary, "wb").write(b"new"), path)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]
    assert os.stat(path).st_mode & 0o777 == 0o644          # not mkstemp's private 0600


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def half_then_crash(temporary):
        open(temporary, "wb").write(b"ne")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomically(half_then_crash, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
