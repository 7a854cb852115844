"""Read and write Stable Diffusion checkpoints: single files and diffusers folders.

Single file (`.safetensors`, `.ckpt`), the CompVis / A1111 / ComfyUI layout: UNet, VAE and text
encoder under their prefixes (ldm/compvis_layout.py), `model_ema.*` ignored (see below). `.ckpt`
files are pickles and are read with `torch.load(weights_only=True)` only: a pickle that needs
anything but tensors and plain containers (code, objects) is refused, never unpickled
(ldm/files.py reads the files).

Diffusers folders (unet/ vae/ text_encoder/ tokenizer/ [scheduler/]) are renamed to the
CompVis names by the explicit rules of ldm/diffusers_layout.py; diffusers itself is never
imported.

Both become `Parts` (CompVis-named weights and configs), then one strict load builds the model.
Everything that cannot be read from tensor shapes is decided by a rule, mostly the family's
convention (ldm/family.py), and `decided_by` on the returned model says which one (family,
configs, heads, prediction type, image size, tokenizer, pad token, ...).

EMA: CompVis training checkpoints hold both the trained weights (`model.diffusion_model.*`)
and an EMA copy (`model_ema.*`, names with the dots removed). We load `model.diffusion_model.*`,
which is what the CompVis inference configs (use_ema: False) and diffusers' converter (without
extract_ema) use; released "-ema-only" files already hold EMA weights there.
"""

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import CLIPTextConfig

from ldm import diffusers_layout, rules
from ldm import text as ldm_text
from ldm.compvis_layout import (UNET_PREFIX, VAE_PREFIX, detect_family,  # noqa: F401 (API)
                                unet_config_from_state_dict, vae_config_from_state_dict)
from ldm.diffusers_layout import diffusers_unet_name_to_compvis  # noqa: F401 (API)
from ldm.family import FAMILIES, SUPPORTED, family_named
from ldm.files import CheckpointError, describe_mismatch, file_format, read_single_file  # noqa: F401 (API)
from ldm.model import StableDiffusion
from ldm.rules import decide_prediction_type, find_tokenizer
from ldm.schedule import NoiseSchedule
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "weights", "toy-sd.safetensors")
METADATA_KEY = "svdiff_config"


@dataclass
class Parts:
    """A checkpoint read into CompVis-named weights and their configs, before any module is
    built. What the files may leave open (prediction type, image size, pad token) `load` decides."""

    family: str                     # a key of ldm.family.FAMILIES
    unet: dict                      # UNetModel state dict
    unet_config: UNetConfig
    vae: dict                       # AutoencoderKL state dict
    vae_config: VAEConfig
    text: dict                      # CLIPTextModel state dict (transformers 5 names)
    text_config: CLIPTextConfig
    decided_by: dict[str, str]      # what -> the rule that decided it, so far
    # what the prediction-type rules read: file metadata (ours, ModelSpec's), a .ckpt's global_step
    metadata: dict = field(default_factory=dict)
    yaml_path: str | None = None    # where a CompVis yaml beside a single file would be
    image_size: int | None = None   # stored in the file (decided_by says where); None: convention
    pad_token_id: int | None = None  # stored in our own files: the id the model was saved with
    pad_as_tokenizer: bool = False  # diffusers folders: pad as their tokenizer (as pipelines do)


# ----------------------------------------------------------------------------- diffusers folders

def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "model_index.json"))
        or all(os.path.isdir(os.path.join(path, p)) for p in ("unet", "vae", "text_encoder")))


def _read_json(path: str) -> dict:
    """A JSON object (a config file), else CheckpointError."""
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: not a config (a JSON {type(found).__name__}, not an object)")
    return found


def _component_weights(folder: str, meta: bool) -> dict:
    """The weights of one diffusers component folder (safetensors preferred, then .bin)."""
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                path = os.path.join(folder, stem + variant + ext)
                if os.path.isfile(path):
                    return read_single_file(path, meta)[0]
    raise CheckpointError(f"{folder}: no weights file (diffusion_pytorch_model.safetensors, "
                          "model.safetensors or a .bin)")


def _diffusers_parts(path: str, meta: bool) -> Parts:
    for part in ("unet", "vae", "text_encoder"):
        if not os.path.isfile(os.path.join(path, part, "config.json")):
            raise CheckpointError(f"{path}: a diffusers folder without {part}/config.json (only "
                                  f"{SUPPORTED} pipelines with unet, vae, text_encoder load)")
    unet_json = _read_json(os.path.join(path, "unet", "config.json"))
    try:
        unet_config, heads_rule = diffusers_layout.unet_config(unet_json)
        if unet_config.in_channels != 4:
            raise ValueError(f"UNet in_channels {unet_config.in_channels} (inpainting, depth, "
                             "pix2pix or upscaler); text-to-image models have 4")
        text_config = ldm_text.text_config_from_dict(
            _read_json(os.path.join(path, "text_encoder", "config.json")))
        family, family_rule = diffusers_layout.detect_family(unet_config, text_config.hidden_act)
        vae_config = diffusers_layout.vae_config(
            _read_json(os.path.join(path, "vae", "config.json")), FAMILIES[family].latent_scale)
        unet_sd = diffusers_layout.unet_state_dict(
            _component_weights(os.path.join(path, "unet"), meta), unet_config)
        vae_sd = diffusers_layout.vae_state_dict(
            _component_weights(os.path.join(path, "vae"), meta), vae_config)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete diffusers folder (no {e.args[0]!r} in a "
                              "config or weights file)") from None
    except (ValueError, TypeError) as e:  # TypeError: a config value of the wrong type
        raise CheckpointError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    text_sd = diffusers_layout.text_state_dict(
        _component_weights(os.path.join(path, "text_encoder"), meta))
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler_config = _read_json(scheduler) if os.path.isfile(scheduler) else {}
    decided = {"family": family_rule,
               "unet_config": "diffusers unet/config.json; " + heads_rule,
               "vae_config": "diffusers vae/config.json",
               "text_config": "diffusers text_encoder/config.json"}
    # diffusers pipelines default to sample_size latents, times the VAE factor
    sample_size = unet_json.get("sample_size")
    image_size = sample_size * 2 ** (len(vae_config.ch_mult) - 1) if type(sample_size) is int \
        and sample_size > 0 else None
    if image_size:
        decided["image_size"] = "diffusers unet sample_size"
    return Parts(family=family, unet=unet_sd, unet_config=unet_config, vae=vae_sd,
                 vae_config=vae_config, text=text_sd, text_config=text_config,
                 decided_by=decided,
                 metadata={"prediction_type": scheduler_config.get("prediction_type")},
                 image_size=image_size, pad_as_tokenizer=True)


# ----------------------------------------------------------------------------- single files

def _single_file_parts(path: str, meta: bool) -> Parts:
    """Our own files load back exactly from the config in their metadata; other files get
    configs from shapes and the family's conventions."""
    state_dict, metadata = read_single_file(path, meta)
    if "svdiff-shifts" in metadata.get("format", ""):  # spectral/io.py's files (a JSON string)
        raise CheckpointError(f"{path}: no Stable Diffusion UNet keys: a spectral-shift file "
                              "(trained deltas), not a base model; apply it with python -m "
                              "edit.sample --shift FILE")
    try:
        family, family_rule = detect_family(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    stored, configs = _stored_config(path, metadata)
    if stored:
        family, family_rule = stored["family"], f"file metadata ({METADATA_KEY})"
    # our own files (metadata) hold exactly the text layers used; SD 2 files from elsewhere may
    # hold one more, never read (ldm.text.used_text_blocks)
    layers, blocks_rule = (stored["text"]["num_hidden_layers"], None) if stored else \
        ldm_text.used_text_blocks(state_dict, family)
    unet_sd, vae_sd, text_sd = _components(path, state_dict, family, layers)
    decided = {"family": family_rule, **_ignored_keys(state_dict)}
    if stored:
        decided.update(dict.fromkeys(("unet_config", "vae_config", "text_config"),
                                     f"file metadata ({METADATA_KEY})"))
        if stored.get("image_size"):
            decided["image_size"] = "file metadata"
    else:
        configs, rules = _configs_from_shapes(path, unet_sd, vae_sd, text_sd, family)
        decided.update(rules)
        if blocks_rule:
            decided["text_config"] += "; " + blocks_rule
    return Parts(family=family, unet=unet_sd, unet_config=configs[0], vae=vae_sd,
                 vae_config=configs[1], text=text_sd, text_config=configs[2],
                 decided_by=decided, metadata={**metadata, **stored},
                 yaml_path=os.path.splitext(path)[0] + ".yaml",
                 image_size=stored.get("image_size"), pad_token_id=stored.get("pad_token_id"))


def _components(path: str, state_dict: dict, family: str, text_layers: int | None
                ) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) state dicts of a single file: prefixes stripped, the text
    encoder in CLIPTextModel names with its first `text_layers` blocks (SD 1: None, all)."""
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    # (some VAE checkpoints keep their training loss, LPIPS and discriminator, under loss.*)
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)
              and not k.startswith(VAE_PREFIX + "loss.")}
    try:
        text_sd = ldm_text.hf_text_state_dict(state_dict, family, num_layers=text_layers)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return unet_sd, vae_sd, text_sd


def _configs_from_shapes(path: str, unet_sd: dict, vae_sd: dict, text_sd: dict, family: str
                         ) -> tuple[tuple, dict[str, str]]:
    """((UNet, VAE, text configs), their decided_by rules) for a file without our metadata."""
    try:
        unet_config, unet_rule = unet_config_from_state_dict(unet_sd, family)
        vae_config = vae_config_from_state_dict(vae_sd, family)
        text_config = ldm_text.text_config_from_state_dict(text_sd, family)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {e.args[0]})") from None
    rules = {"unet_config": unet_rule,
             "vae_config": f"shapes; latent scale {vae_config.scale_factor} by convention",
             "text_config": "shapes; 64-channel heads by convention"}
    return (unet_config, vae_config, text_config), rules


def _stored_config(path: str, metadata: dict) -> tuple[dict, tuple | None]:
    """(the full config our own files carry (save_single_file), (UNet, VAE, text configs) built
    from it), or ({}, None) for other files."""
    if METADATA_KEY not in metadata:
        return {}, None
    try:
        stored = json.loads(metadata[METADATA_KEY])
        family_named(stored["family"])
        return stored, (UNetConfig(**stored["unet"]), VAEConfig(**stored["vae"]),
                        ldm_text.text_config_from_dict(stored["text"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt {METADATA_KEY} metadata ({type(e).__name__}: "
                              f"{e})") from None


def _ignored_keys(state_dict: dict) -> dict[str, str]:
    """decided_by entries for the keys a single file holds beyond UNet, VAE and text encoder."""
    ignored = [k for k in state_dict if not k.startswith((UNET_PREFIX, VAE_PREFIX,
                                                          "cond_stage_model."))]
    ema = sum(k.startswith("model_ema.") for k in ignored)
    decided = {"weights": "model.diffusion_model.*" + (
        f" (the non-EMA weights; {ema} model_ema.* keys ignored)" if ema else "")}
    if len(ignored) > ema:
        decided["ignored"] = f"{len(ignored) - ema} other keys (e.g. " + \
            ", ".join([k for k in ignored if not k.startswith("model_ema.")][:3]) + ")"
    return decided


# ----------------------------------------------------------------------------- loading

def _pad_token_id(parts: Parts, tokenizer) -> tuple[int, str]:
    """(the id prompts are padded with, rule): the id our own file was saved with; a diffusers
    folder's tokenizer's own pad token (what diffusers pipelines pad with); else the family's
    rule (SD 1: <|endoftext|>, SD 2: id 0), also for a folder inspected without a tokenizer."""
    if parts.pad_token_id is not None:
        return parts.pad_token_id, f"file metadata ({METADATA_KEY})"
    if parts.pad_as_tokenizer and tokenizer is not None:
        return tokenizer.pad_token_id, "the diffusers tokenizer's pad token"
    eos = tokenizer.eos_token_id if tokenizer is not None else parts.text_config.eos_token_id
    return FAMILIES[parts.family].pad_token_id(eos), "convention: " + FAMILIES[parts.family].pad_rule


def _load_strict(module: torch.nn.Module, state_dict: dict, what: str, dtype, device) -> None:
    """Strict load (assign: no second copy) after our own key and shape check, which gives a
    one-line error. Consumes `state_dict`."""
    problem = describe_mismatch({k: v.shape for k, v in state_dict.items()},
                                {k: v.shape for k, v in module.state_dict().items()})
    if problem:
        raise CheckpointError(f"{what} weights do not fit its config: {problem}")
    for k, v in state_dict.items():  # in place, so each file tensor is freed once copied
        # a fresh torch allocation on the target device: file buffers (and mmap pages) are not
        # 64-byte aligned, which changes vectorized kernels' rounding; outputs then match the
        # saved model's bit for bit
        keep = dtype is None or not v.is_floating_point()
        state_dict[k] = v.to(device=device, dtype=v.dtype if keep else dtype, copy=True)
    module.load_state_dict(state_dict, strict=True, assign=True)


def load(path: str = DEFAULT_MODEL, tokenizer_dir: str | None = None,
         prediction_type: str | None = None, device="cpu",
         dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """A StableDiffusion from a single file (.safetensors / .ckpt) or a diffusers folder.

    dtype=None keeps the file's dtypes. device="meta" reads only shapes (the safetensors
    header) and builds the modules without memory, for inspection (python -m ldm.info); the
    tokenizer is then optional."""
    path = os.fspath(path)
    if path == DEFAULT_MODEL and not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file (the bundled toy model; python -m "
                              "train.toy.pretrain builds it)")
    meta = torch.device(device).type == "meta"
    parts = _diffusers_parts(path, meta) if is_diffusers_folder(path) else \
        _single_file_parts(path, meta)
    decided = parts.decided_by
    prediction, decided["prediction_type"] = decide_prediction_type(
        parts.family, prediction_type, parts.metadata, parts.yaml_path,
        parts.metadata.get("global_step"))
    image_size = parts.image_size
    if image_size is None:
        image_size, decided["image_size"] = FAMILIES[parts.family].default_image_size(prediction)
    # the rows the weights hold, which token ids index (the config's vocab_size may disagree,
    # which the strict load below reports)
    table = parts.text.get("embeddings.token_embedding.weight")
    rows = parts.text_config.vocab_size if table is None else table.shape[0]
    tokenizer, decided["tokenizer"] = find_tokenizer(path, tokenizer_dir, rows, required=not meta)
    pad, decided["pad_token"] = _pad_token_id(parts, tokenizer)
    made_by, decided["made_by"] = rules.made_by(parts.metadata)
    try:
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
            unet, vae = UNetModel(parts.unet_config), AutoencoderKL(parts.vae_config)
            text_encoder = ldm_text.TextEncoder(parts.text_config, tokenizer, pad_token_id=pad)
    except (ValueError, RuntimeError, TypeError) as e:  # e.g. widths GroupNorm(32) cannot
        # split, a config value of the wrong type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: its config does not build an SD model ({first})") from None
    try:
        _load_strict(unet, parts.unet, "UNet", dtype, device)
        _load_strict(vae, parts.vae, "VAE", dtype, device)
        _load_strict(text_encoder.transformer, parts.text, "text encoder", dtype, device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for module in (unet, vae, text_encoder):
        _rebuild_buffers(module, meta)
    model = StableDiffusion(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                            schedule=NoiseSchedule(), family=parts.family,
                            prediction_type=prediction, decided_by=decided, source=path,
                            image_size=image_size, made_by=made_by)
    return model if meta else model.to(device)


def _rebuild_buffers(module: torch.nn.Module, meta: bool) -> None:
    """Non-persistent buffers are not in any file, so building on the meta device leaves them
    empty. The only one is CLIP's position_ids = arange(max_positions), rebuilt here."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta or meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} has no value after loading")
        owner = module.get_submodule(name.rsplit(".", 1)[0])
        owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape),
                              persistent=False)


# ----------------------------------------------------------------------------- writing

def save_single_file(path: str, model: StableDiffusion,
                     extra_metadata: dict[str, str] | None = None) -> None:
    """Write `model` as one CompVis-layout .safetensors file with its full config in the
    metadata ("svdiff_config"), so it loads back exactly, without conventions."""
    state_dict = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    state_dict.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    state_dict.update(ldm_text.compvis_text_state_dict(model.text_encoder, model.family))
    config = {"unet": asdict(model.unet.config), "vae": asdict(model.vae.config),
              "text": model.text_encoder.transformer.config.to_dict(), "family": model.family,
              "prediction_type": model.prediction_type,
              "pad_token_id": model.text_encoder.pad_token_id, "image_size": model.image_size}
    metadata = {METADATA_KEY: json.dumps(config, default=str), "format": "pt",
                **(extra_metadata or {})}
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path, metadata)
