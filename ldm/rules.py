"""The rules that decide what a checkpoint's weights leave open, each returning (value, rule) so
the loader can record in `decided_by` which rule decided (ldm/checkpoint.py):

- what the network predicts (eps or v): explicit, file metadata, a yaml beside the file, a .ckpt's
  training step, else the family's convention;
- the tokenizer: --tokenizer DIR, tokenizer/ beside the weights, an installed CLIP vocabulary;
  and whichever it is, its vocabulary must be as long as the text encoder's token table
  (ids past the table raise IndexError at the first prompt; fewer tokens mean another vocabulary);
- which program made the model, when the file names it (metadata), so callers can pick
  defaults by what a model is rather than where its file lies.
"""

import os
import re

from ldm import text as ldm_text
from ldm.family import family_named
from ldm.files import CheckpointError
from ldm.schedule import PREDICTION_TYPES

# the program that wrote the bundled toy model; what StableDiffusion.made_by says for its files
TOY_PRETRAIN = "train.toy.pretrain"
# safetensors metadata key -> the program it names (the key holds that program's settings)
MADE_BY_KEYS = {"train.toy.pretrain": TOY_PRETRAIN}


def decide_prediction_type(family: str, explicit: str | None = None, metadata: dict | None = None,
                           yaml_path: str | None = None, global_step: int | None = None
                           ) -> tuple[str, str]:
    """(prediction type, rule). Order: the explicit argument; file metadata (ours, or ModelSpec's
    "modelspec.prediction_type"); a CompVis yaml beside the file ("parameterization: v", the
    A1111 convention); a .ckpt's training step where it tells the family's releases apart (SD 2:
    875000 is 512-base, eps; diffusers' rule); else the family convention: SD 1.x eps; SD 2.x v,
    as the 768-v models are (SD 2 512-base users pass --prediction-type epsilon)."""
    if explicit is not None:
        _check_prediction_type(explicit)
        return explicit, "given explicitly"
    metadata = metadata or {}
    if metadata.get("prediction_type"):
        return _check_prediction_type(metadata["prediction_type"]), "file metadata"
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("epsilon", "v"):
        return ("v_prediction" if spec == "v" else "epsilon"), "modelspec.prediction_type metadata"
    if yaml_path and os.path.isfile(yaml_path):
        with open(yaml_path, errors="replace") as f:
            v = re.search(r"^\s*parameterization:\s*['\"]?v['\"]?\s*$", f.read(), re.M)
        return ("v_prediction" if v else "epsilon"), f"parameterization in {yaml_path}"
    conventions = family_named(family)
    if conventions.epsilon_checkpoint is not None and global_step is not None:
        step, release = conventions.epsilon_checkpoint
        found = "epsilon" if global_step == step else conventions.prediction_type
        return found, (f"{conventions.display_name} .ckpt global_step {global_step} ({step}: "
                       f"{release}, epsilon; other steps: {conventions.prediction_type})")
    return conventions.prediction_type, "convention: " + conventions.prediction_note


def _check_prediction_type(value: str) -> str:
    if value not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, "
                              f"got {value!r}")
    return value


def find_tokenizer(path: str, tokenizer_dir: str | None, token_rows: int, required: bool):
    """(CLIPTokenizer or None, rule): --tokenizer DIR; tokenizer/ beside the single file or in
    the diffusers folder; the CLIP BPE vocabulary of an installed package. A tokenizer whose
    length is not `token_rows` (the text encoder's token table) is refused, naming both sizes.
    None only when nothing was found, nothing was asked for and `required` is False (the meta
    device: inspecting needs no tokenizer); otherwise CheckpointError."""
    try:
        if tokenizer_dir is not None:
            found = ldm_text.load_tokenizer(tokenizer_dir), f"given: {tokenizer_dir}"
        else:
            found = _implicit_tokenizer(path)
    except ldm_text.TokenizerNotFound as e:
        if required or tokenizer_dir is not None:
            raise CheckpointError(str(e)) from None
        return None, f"none found ({e})"
    tokenizer, rule = found
    if len(tokenizer) != token_rows:
        raise CheckpointError(
            f"{path}: the tokenizer ({rule}) has {len(tokenizer)} tokens but the text encoder's "
            f"token table has {token_rows} rows: pass --tokenizer DIR, the tokenizer folder the "
            "model came with")
    return found


def _implicit_tokenizer(path: str):
    """(tokenizer, rule) found without --tokenizer: tokenizer/ beside the weights, else an
    installed CLIP BPE vocabulary, else TokenizerNotFound."""
    beside = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer")
    if os.path.isdir(beside):
        return ldm_text.load_tokenizer(beside), f"beside the weights: {beside}"
    return ldm_text.load_tokenizer(None), "installed CLIP BPE vocabulary"


def made_by(metadata: dict) -> tuple[str | None, str]:
    """(the program that made the model, rule) from a file's metadata keys (MADE_BY_KEYS); None
    when the file names none, as real SD files do."""
    for key, program in MADE_BY_KEYS.items():
        if key in metadata:
            return program, f"file metadata ({key})"
    return None, "no program named in the file"
