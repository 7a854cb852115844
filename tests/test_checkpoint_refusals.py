"""ldm.checkpoint refusals: real-looking files with one thing wrong, malicious pickles (never
unpickled), broken diffusers folders and weights that do not fit: each gives one line."""

import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ldm import checkpoint as ckpt
from oracle import UNET_PREFIX, VAE_PREFIX
from test_checkpoint import compvis_state_dict, write_diffusers_folder
from tiny import tiny_model


class Payload:
    """Unpickling this runs os.system: a file appears if the payload ever runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(tmp_path) -> dict:
    """name -> (path, expected message part). Real-looking files with one thing wrong."""
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    good = tmp_path / "good.safetensors"
    ckpt.save_single_file(str(good), model)
    data = good.read_bytes()
    files = {}

    def write(name, content):
        (tmp_path / name).write_bytes(content)
        return str(tmp_path / name)

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Payload(marker)}, evil)
    legacy = tmp_path / "evil-legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    sdxl = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
            UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    files.update({
        "missing": (str(tmp_path / "nope.safetensors"), "no such file"),
        "directory": (str(tmp_path / "tokenizer"), "is a directory, not a diffusers folder"),
        "empty": (write("empty.ckpt", b""), "empty file"),
        "truncated": (write("truncated.safetensors", data[: len(data) // 2]), "truncated"),
        "corrupt header": (write("corrupt.safetensors", data[:8] + b"{" + b"\xff" * 40 +
                                 data[49:]), "corrupt safetensors header"),
        "random": (write("random.bin", os.urandom(4096)), "not a checkpoint"),
        "zip not torch": (write("other.ckpt", b"PK\x03\x04" + os.urandom(100)),
                          "unreadable PyTorch file"),
        "pickle with code": (str(evil), "refused: this pickle needs more than tensors"),
        "legacy pickle with code": (str(legacy), "refused"),
        "lora": (str(tmp_path / "lora.safetensors"), "a LoRA file"),
        "sdxl": (str(tmp_path / "sdxl.safetensors"), "an SDXL checkpoint"),
    })
    return files, marker


def test_bad_files_give_one_line_errors(tmp_path):
    files, marker = bad_files(tmp_path)
    for name, (path, message) in files.items():
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.load(path)
        text = str(info.value)
        assert message in text and "\n" not in text, (name, text)
    assert not marker.exists()  # the payload never ran


def test_malicious_pickle_never_runs(tmp_path):
    """Also when read for inspection (memory-mapped, meta)."""
    flag = tmp_path / "flag"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload(flag)}, path)
    for device in ("cpu", "meta"):
        with pytest.raises(ckpt.CheckpointError, match="it asks for .*system"):
            ckpt.load(str(path), device=device)
    assert not flag.exists()


def test_diffusers_folder_problems(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="without unet/config.json"):
        ckpt.load(str(tmp_path))
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    write_diffusers_folder(model, tmp_path)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {**config, "addition_embed_type": "text_time"}))
    with pytest.raises(ckpt.CheckpointError, match="SDXL"):
        ckpt.load(str(tmp_path))
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    os.remove(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no weights file"):
        ckpt.load(str(tmp_path))


def test_inconsistent_weights_give_one_line_errors(tmp_path):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    cases = {
        "does not build an SD model": {UNET_PREFIX + "input_blocks.0.0.weight":
                                       torch.zeros(20, 4, 3, 3)},  # GroupNorm(32, 20)
        "incomplete checkpoint": {UNET_PREFIX + "middle_block.1.proj_in.weight": None},
        "incomplete checkpoint (no model.diffusion_model.input_blocks.0.0.weight)":
            {UNET_PREFIX + "input_blocks.0.0.weight": None},
        "UNet weights do not fit its config: 1 unexpected (middle_block.1.extra.weight)":
            {UNET_PREFIX + "middle_block.1.extra.weight": torch.zeros(2)},
        "of another shape": {VAE_PREFIX + "decoder.conv_out.bias": torch.zeros(5)},
    }
    for message, change in cases.items():
        sd = compvis_state_dict(model)
        for k, v in change.items():
            if v is None:
                del sd[k]
            else:
                sd[k] = v
        torch.save(sd, tmp_path / "broken.ckpt")
        with pytest.raises(ckpt.CheckpointError, match=re.escape(message)) as info:
            ckpt.load(str(tmp_path / "broken.ckpt"))
        assert "\n" not in str(info.value)


def write_header(path, header: dict) -> str:
    """A safetensors file of this JSON header and 64 bytes of data."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(64))
    return str(path)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_damaged_headers_not_regular_files_and_configs_give_one_line(tmp_path, device):
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = {
        write_header(tmp_path / "offsets.safetensors", {"a": {**entry, "data_offsets": ["0", "8"]}}):
            "corrupt safetensors header (ValueError: entry 'a'",
        write_header(tmp_path / "shape.safetensors", {"a": {**entry, "shape": [-1]}}):
            "corrupt safetensors header (ValueError: entry 'a'",
        write_header(tmp_path / "metadata.safetensors", {"__metadata__": {"format": 5}, "a": entry}):
            "__metadata__ is not a map of strings",
        os.devnull: "not a regular file",
    }
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    write_diffusers_folder(model, tmp_path / "folder")
    unet_config = json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())
    configs = {"text_encoder": ("[]", "not a config (a JSON list, not an object)"),
               "unet": (json.dumps({**unet_config, "cross_attention_dim": None}),
                        "its config does not build an SD model")}
    for component, (content, message) in configs.items():
        folder = tmp_path / f"folder-{component}"
        shutil.copytree(tmp_path / "folder", folder)
        (folder / component / "config.json").write_text(content)
        cases[str(folder)] = message
    text = json.loads((tmp_path / "folder" / "text_encoder" / "config.json").read_text())
    (tmp_path / "folder" / "text_encoder" / "config.json").write_text(
        json.dumps({**text, "hidden_size": "64"}))  # transformers 5 checks types itself
    cases[str(tmp_path / "folder")] = "bad text encoder config (Validation error for field"
    for path, message in cases.items():
        with pytest.raises(ckpt.CheckpointError) as refused:
            ckpt.load(path, device=device)
        assert message in str(refused.value) and "\n" not in str(refused.value), path
