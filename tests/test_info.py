"""python -m ldm.info: what it prints for tiny and full-size files, and one-line refusals."""

import json
import pickle
import subprocess
import sys
import time
import warnings

import pytest
import torch

from ldm import checkpoint as ckpt
from ldm import info
from ldm.family import FAMILIES
from ldm.text import TextEncoder, compvis_text_state_dict
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig
from test_checkpoint_refusals import Payload, bad_files
from tiny import tiny_model


def run_info(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm.info", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def full_size_keys(family: str) -> dict:
    """name -> shape of a full-size SD 1.5 / 2.1 single file, from our modules on meta; SD 2
    gets what real SD 2 files carry beyond the used text blocks (block 23, text_projection)."""
    unet_config = UNetConfig.sd15() if family == "sd1" else UNetConfig.sd21()
    with torch.device("meta"):
        unet, vae = UNetModel(unet_config), AutoencoderKL(VAEConfig())
        text = TextEncoder(FAMILIES[family].text_config(), tokenizer=None, pad_token_id=0)
    shapes = {ckpt.UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
    shapes.update({ckpt.VAE_PREFIX + k: v.shape for k, v in vae.state_dict().items()})
    text_sd = compvis_text_state_dict(text, family)
    shapes.update({k: v.shape for k, v in text_sd.items()})
    if family == "sd2":
        openclip = FAMILIES["sd2"].text_prefix
        prefix = openclip + "transformer.resblocks."
        shapes.update({k.replace(f"{prefix}22.", f"{prefix}23."): v.shape
                       for k, v in text_sd.items() if k.startswith(f"{prefix}22.")})
        shapes[openclip + "text_projection"] = torch.Size([1024, 1024])
        shapes[openclip + "logit_scale"] = torch.Size([])
    return shapes


def write_sparse_safetensors(path, shapes: dict) -> int:
    """A valid fp16 safetensors file of these shapes whose data is a hole (all zeros, no disk
    blocks): a 2-4 GB checkpoint in a few KB of disk, for header-only readers."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


@pytest.mark.parametrize("family, counts, prediction", [
    ("sd1", ("UNet 859.52 M", "VAE 83.65 M", "text 123.06 M"), "epsilon"),
    ("sd2", ("UNet 865.91 M", "VAE 83.65 M", "text 340.39 M"), "v_prediction"),
])
def test_full_size_file_read_from_header_only(tmp_path, capsys, family, counts, prediction):
    path = tmp_path / f"{family}.safetensors"
    size = write_sparse_safetensors(path, full_size_keys(family))
    assert size > 1.5e9
    start = time.perf_counter()
    assert info.main([str(path)]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(out, f"{seconds:.2f} s")
    for count in counts:
        assert count in out
    assert f"prediction  {prediction}" in out
    assert "float16" in out and ("SD 1.x" if family == "sd1" else "SD 2.x") in out
    assert seconds < 10  # header only; reading 2-4 GB would take far longer here
    loaded = ckpt.load(str(path), device="meta")  # the inferred config is SD's own
    assert loaded.unet.config == (UNetConfig.sd15() if family == "sd1" else UNetConfig.sd21())
    assert loaded.vae.config == VAEConfig()


def test_tiny_file(tmp_path):
    model = tiny_model("sd2", tokenizer_dir=str(tmp_path / "tokenizer"))
    path = tmp_path / "tiny.safetensors"
    ckpt.save_single_file(str(path), model)
    result = run_info(path, "--prediction-type", "epsilon")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines()
                 if line.split(None, 1)[0] in ("family", "prediction", "parameters", "tokenizer"))
    assert lines["family"].startswith("SD 2.x")
    assert lines["prediction"].startswith("epsilon") and "given explicitly" in lines["prediction"]
    unet = sum(p.numel() for p in model.unet.parameters()) / 1e6
    assert f"UNet {unet:.2f} M" in lines["parameters"]
    assert str(tmp_path / "tokenizer") in lines["tokenizer"]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    files, marker = bad_files(tmp_path)
    for name, (path, message) in files.items():
        assert info.main([path]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, name
        assert captured.err.startswith("error: ") and message in captured.err, name
    assert not marker.exists()
    # the real command line: exit status 2, one line, no traceback
    for path in (files["pickle with code"][0], files["truncated"][0]):
        result = run_info(path)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not marker.exists()


def test_a_pickle_payload_is_refused_in_one_line_without_torchs_warning(tmp_path):
    """A bare pickle of protocol 4 (Python's default): torch warns that its own is 2, and that
    warning must not join the refusal."""
    marker, path = tmp_path / "payload-ran", tmp_path / "payload.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:  # what the refusal must keep quiet
        warnings.simplefilter("always")
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    assert any("pickle protocol" in str(w.message) for w in caught)
    result = run_info(path)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: refused: this pickle needs more than tensors")
    assert not marker.exists()


def test_help_says_every_default():
    parser = info.build_parser()
    assert parser.prog == "python -m ldm.info"
    arguments = [a for a in parser._actions if a.dest != "help"]
    assert {a.dest for a in arguments} == {"path", "tokenizer", "prediction_type"}
    for argument in arguments:
        assert argument.help and "default" in argument.help, argument.dest
    result = run_info("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m ldm.info")
    assert "Supported: SD 1.x" in result.stdout
