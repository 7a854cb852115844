"""Shift files: the trained deltas of SVDiff as safetensors, plus JSON metadata.

    W_delta = U diag(ReLU(sigma + delta)) Vh      delta (r,), r = min(m, n) for a weight W (m, n)
    gamma + delta                                 delta (c,) for a norm scale gamma (c,)

Only the deltas are stored: U, sigma, Vh and gamma come from the base model the file names.
A shift file for SD 1.5 is about 1.7 MB: one float32 per singular value of each weight matrix
plus one per norm channel.

    tensors   "<component>.<module path>" -> delta, float32, e.g.
              "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k" (320,)
              "text.transformer.encoder.layers.0.self_attn.q_proj"    (768,)
    metadata  every value a JSON string:
              format            "svdiff-shifts/1"
              layers            the entry names, sorted
              counts            {"layers": L, "parameters": P, "bytes": 4 P}
              base_fingerprint  identifies the base weights the shifts were trained on
              training_args     whatever the trainer passes (a dict)
              (and any other keys the caller adds)

Every refusal is a ShiftFileError with a one-line message: an unreadable file, a file from
another base model, missing / extra / wrongly shaped entries.

Files of mkshing/svdiff-pytorch are read by spectral/mkshing.py.
"""

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ldm.files import describe_mismatch, first_names

FORMAT = "svdiff-shifts/1"


class ShiftFileError(ValueError):
    """A shift file or delta dict that does not fit; the message is one line."""


def check_entries(deltas: Mapping[str, Tensor], expected: Mapping[str, tuple], source: str) -> None:
    """Refuse `deltas` unless its names are exactly `expected`'s and every shape matches."""
    problem = describe_mismatch({name: tuple(d.shape) for name, d in deltas.items()}, dict(expected))
    if problem:
        raise ShiftFileError(f"{source} does not fit this model: {problem}")


def write_atomically(write: Callable[[str], None], path: str | os.PathLike) -> None:
    """write(temporary) for a fresh temporary name in path's folder, then os.replace it onto
    `path`: readers and a crash at any moment see the old file or the whole new one, never half
    of one (a rename within one file system is atomic); a failed write removes its temporary.

    The result gets mode 0644: mkstemp makes its file 0600, private to the writer, while caches
    and shift files are meant to be read by others (as a plain open() would have allowed).
    """
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def save_shifts(path: str | os.PathLike, deltas: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Write {name: delta} as float32 safetensors; `metadata` values (e.g. base_fingerprint,
    training_args) are stored as JSON next to format, layers and counts."""
    tensors = {name: d.detach().to("cpu", torch.float32).contiguous() for name, d in deltas.items()}
    parameters = sum(t.numel() for t in tensors.values())
    header = {"format": FORMAT, "layers": sorted(tensors),
              "counts": {"layers": len(tensors), "parameters": parameters, "bytes": 4 * parameters},
              **(metadata or {})}
    save_file(tensors, path, metadata={key: json.dumps(value, default=str) for key, value in header.items()})


def read_safetensors(path, what: str = "shift file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """({name: tensor}, raw metadata) of a safetensors file; ShiftFileError when it cannot be read."""
    if not os.path.isfile(path):
        raise ShiftFileError(f"{path}: no such {what}")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ShiftFileError(f"{path}: not a readable safetensors file ({error})") from None


def load_shifts(path: str | os.PathLike, expect_fingerprint: str | None = None,
                expect_shapes: Mapping[str, tuple] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a shift file -> ({name: delta float32}, metadata with JSON decoded).

    expect_fingerprint: the base model's fingerprint; a file trained on another base is refused.
    expect_shapes: {name: shape} the caller will load into; anything else is refused.
    """
    tensors, raw = read_safetensors(path)
    if "format" not in raw:
        if tensors and all(name.endswith(".delta") for name in tensors):
            raise ShiftFileError(f"{path}: an mkshing/svdiff-pytorch file ('<module>.delta' keys); "
                                 "read it with spectral.load_mkshing")
        raise ShiftFileError(f"{path}: not an svdiff shift file (no 'format' metadata)")
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as error:
        raise ShiftFileError(f"{path}: metadata is not JSON ({error})") from None
    if str(metadata["format"]).startswith("svdiff-lora"):
        raise ShiftFileError(f"{path}: a LoRA file, not a spectral shift file (edit.sample reads it "
                             "with --lora)")
    if metadata["format"] != FORMAT:
        raise ShiftFileError(f"{path}: format {metadata['format']!r}, this version reads {FORMAT!r}")
    if sorted(tensors) != metadata.get("layers"):
        raise ShiftFileError(f"{path}: its tensors do not match its own layer list (damaged file?)")
    bad = [n for n, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise ShiftFileError(f"{path}: non-float or non-finite values in {first_names(bad)}")
    found = metadata.get("base_fingerprint")
    if expect_fingerprint is not None and found != expect_fingerprint:
        raise ShiftFileError(f"{path} was trained on another base model (fingerprint {str(found)[:16]}, "
                             f"this model {expect_fingerprint[:16]})")
    if expect_shapes is not None:
        check_entries(tensors, expect_shapes, str(path))
    return {name: t.float() for name, t in tensors.items()}, metadata
