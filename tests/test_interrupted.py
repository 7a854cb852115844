"""A run stopped at any moment (kill -9, Ctrl-C, a kill inside a checkpoint write) and continued
with --resume ends with exactly the shifts and losses of an uninterrupted run, bit for bit.

The kills are real: train.single runs in a subprocess, killed when log.csv shows a random
number of steps (so sometimes between saves, sometimes during one)."""

import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import spectral
from ldm import checkpoint
from tiny import tiny_model
from train import single

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 12, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    model = tiny_model("sd1", tokenizer_dir=str(root / "tokenizer"))
    checkpoint.save_single_file(str(root / "model.safetensors"), model)
    from PIL import Image
    (root / "images").mkdir()
    for i in range(2):
        Image.effect_noise((32, 32), 60 + 20 * i).convert("RGB").save(root / "images" / f"{i}.png")
    return root


def command(root, out, *extra):
    return [sys.executable, "-m", "train.single", "--model", str(root / "model.safetensors"),
            "--instance-dir", str(root / "images"), "--instance-prompt", "a sks star",
            "--prior-loss-weight", "0", "--batch-size", "1", "--sample-steps", "1",
            "--validation-every", "0", "--eval-samples", "0", "--svd-cache", str(root / "svd"),
            "--threads", "1", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--output-dir", str(out), *extra]


def start(root, out, *extra):
    # Ctrl-C reaches the trainer even when pytest itself runs as a background job, whose
    # children inherit an ignored SIGINT (and Python then installs no KeyboardInterrupt)
    return subprocess.Popen(command(root, out, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def steps_logged(out) -> int:
    try:
        with open(out / "log.csv", newline="") as file:
            return len(list(csv.DictReader(file)))
    except (OSError, csv.Error):
        return 0


def stop_after(process, out, steps: int, how: signal.Signals) -> str:
    """Send `how` once log.csv shows `steps` rows; returns what the process wrote to stderr."""
    deadline = time.time() + 120
    while steps_logged(out) < steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(how)
    return process.communicate(timeout=120)[1]


def results(out):
    deltas, metadata = spectral.load_shifts(out / "spectral_shifts.safetensors")
    with open(out / "log.csv", newline="") as file:
        losses = [row["loss"] for row in csv.DictReader(file)]
    return deltas, metadata["step"], losses


def assert_same_run(first, second):
    a, step_a, losses_a = results(first)
    b, step_b, losses_b = results(second)
    assert step_a == step_b == STEPS and losses_a == losses_b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(files):
    out = files / "whole"
    subprocess.run(command(files, out), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_moment_then_resume(files, whole, seed):
    out = files / f"killed-{seed}"
    steps = random.Random(seed).randint(SAVE_EVERY + 1, STEPS - 1)   # after the first save
    stop_after(start(files, out), out, steps, signal.SIGKILL)
    resumed = subprocess.run(command(files, out, "--resume"), capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(whole, out)


def test_ctrl_c_then_resume(files, whole):
    out = files / "ctrl-c"
    process = start(files, out)
    stderr = stop_after(process, out, 7, signal.SIGINT)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "; the last save is step " in last
    assert last.endswith("continue with the same command and --resume") and "Traceback" not in stderr
    resumed = subprocess.run(command(files, out, "--resume"), capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(whole, out)


class Killed(BaseException):
    """Stands for a kill: nothing in train() handles it."""


def test_kill_inside_a_checkpoint_write_then_resume(files, whole, monkeypatch):
    """The write of step 6's checkpoint dies half-way: the file on disk stays step 3's."""
    out = files / "killed-in-write"
    real_save = torch.save

    def dies_half_way(state, path):
        if state.get("step") == 6:
            real_save(state, path)
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
            raise Killed()
        return real_save(state, path)

    monkeypatch.setattr(torch, "save", dies_half_way)
    threads = torch.get_num_threads()
    with pytest.raises(Killed):
        single.main(command(files, out)[3:])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert single.main(command(files, out, "--resume")[3:]) == 0
    torch.set_num_threads(threads)
    assert_same_run(whole, out)
