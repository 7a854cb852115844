"""Reading checkpoint files into {name: tensor} + metadata, safely.

`.safetensors` is read directly (or only its header, for the meta device). `.ckpt` files are
pickles: they are read with `torch.load(weights_only=True)` only, so a pickle that needs
anything but tensors and plain containers (code, objects) is refused, never unpickled.
Every problem is a `CheckpointError` with a one-line message.
"""

import json
import os
import pickle
import re
import warnings
import zipfile

import torch


class CheckpointError(Exception):
    """A file we cannot or will not load; the message is one line, shown as is by the CLIs."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(path: str) -> tuple[dict, dict]:
    """(tensor entries, metadata) from the JSON header: 8 bytes little-endian length N, then N
    bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}. Checks that
    every tensor's bytes lie inside the file, so a truncated download is caught here."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} "
                                  f"bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            _check_header(header, metadata)
            end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError,
                TypeError, IndexError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: "
                                  f"{e})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (tensors need {8 + n + end} "
                              f"bytes, the file has {size})")
    return header, metadata


def _check_header(header: dict, metadata: dict) -> None:
    """ValueError unless every entry has a shape of non-negative ints and two int data offsets,
    and the metadata maps strings to strings (what the format allows), so that a damaged header
    is caught here rather than by whatever reads it next."""
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not a map of strings")
    for name, entry in header.items():
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets)):
            raise ValueError(f"entry {name!r}: shape {shape!r}, data_offsets {offsets!r}")


def _read_safetensors(path: str, meta: bool) -> tuple[dict, dict]:
    header, metadata = _safetensors_header(path)
    if meta:  # shapes only: nothing but the header is read
        return {k: torch.empty(e["shape"], dtype=_SAFETENSORS_DTYPES.get(e["dtype"], torch.uint8),
                               device="meta") for k, e in header.items()}, metadata
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu"), metadata
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None


def load_pickle(path, mmap: bool = False):
    """What a torch.save file holds, read with weights_only: tensors and plain containers only.
    A pickle that needs code is refused, never run; a damaged file is refused too (both
    CheckpointError, one line)."""
    if file_format(path) != "pickle":
        raise CheckpointError(f"{path}: not a PyTorch file (neither a torch zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of some files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|Unsupported class (\S+)", str(e))
        name = found and (found.group(1) or found.group(2))
        what = f" (it asks for {name})" if name else ""
        if name and name.startswith(("pytorch_lightning.", "lightning.")):
            what += ", a training callback saved beside the weights"
        raise CheckpointError(f"{path}: refused: this pickle needs more than tensors to load"
                              f"{what}; it was not unpickled. Convert it to .safetensors with a "
                              "tool you trust") from None
    except Exception as e:  # corrupt zip, truncated stream, ...
        # the first sentence: torch's messages go on for lines about what may have happened
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: unreadable PyTorch file ({type(e).__name__}: {first})") \
            from None


def _read_pickle(path: str, meta: bool) -> tuple[dict, dict]:
    """A torch.save file, tensors and containers only. Returns (state dict, {"global_step": ..})."""
    obj = load_pickle(path, mmap=zipfile.is_zipfile(path))
    extras = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("global_step"), int):
            extras["global_step"] = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state_dict = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if meta:
        state_dict = {k: v.to("meta") for k, v in state_dict.items()}
    return state_dict, extras


def describe_mismatch(found: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """None when `found` has exactly the names of `expected`, each with its shape; else one
    line: "1 missing (a.b), 2 unexpected (c, d), 1 of another shape (e: (3,) where (4,) is
    expected)". Both map names to shapes (tuples)."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return None
    parts = [f"{len(missing)} missing ({first_names(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({first_names(unexpected)})"] if unexpected else []
    if wrong:
        parts.append(f"{len(wrong)} of another shape ({wrong[0]}: {tuple(found[wrong[0]])} where "
                     f"{tuple(expected[wrong[0]])} is expected)")
    return ", ".join(parts)


def first_names(names, limit: int = 3) -> str:
    """The first few names, sorted, for a one-line message: "a, b, c, ... (12 in all)"."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def file_format(path: str) -> str | None:
    """"safetensors", "pickle" (torch.save, zip or legacy) or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if head[:4] == b"PK\x03\x04":  # torch zip archive
        return "pickle"
    # safetensors: the header's length (8 bytes, little-endian), then its JSON. Tested before a
    # bare pickle's b"\x80": one header length in 256 starts with that byte too
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # a bare pickle (protocol 2 or later: legacy torch.save)
        return "pickle"
    return None


def read_single_file(path: str, meta: bool = False) -> tuple[dict, dict]:
    """(state dict, metadata) of a .safetensors or torch.save file, told apart by content.
    meta=True gives tensors on the meta device (shapes and dtypes only)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a diffusers folder (no "
                              "model_index.json nor unet/ vae/ text_encoder/)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if not os.path.isfile(path):  # a device, a pipe: reading could block or never end
        raise CheckpointError(f"{path}: not a regular file")
    try:
        kind = file_format(path)
        if kind is None:
            raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch "
                                  "file)")
        read = _read_safetensors if kind == "safetensors" else _read_pickle
        state_dict, metadata = read(path, meta)
    except OSError as e:  # unreadable (permissions, I/O error)
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not state_dict:
        raise CheckpointError(f"{path}: contains no tensors")
    return state_dict, metadata
