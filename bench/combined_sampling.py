"""Sampling after combining shifts, or with a LoRA, costs what the base model's sampling costs:
every combination (addition, interpolation, style mixing) and every LoRA file is merged into
plain weights once, so the sampler runs the same layers. Goal: 1.0x.

    python bench/combined_sampling.py            # bundled model, 8 images, 25 DDIM steps, 7 repeats

Two random shift files for the bundled model (same layers as train.single's result) are
combined each way with edit.shifts, and a random rank-4 LoRA file (the layers of --method lora)
is merged as edit.sample --lora merges it; then the base model and each merged one generate the
same batch in rounds (each model once per round, each round starting with the next model; the
first round, a warm-up, untimed), and the median time of each is printed beside its ratio to
the base's.
Merging itself (once per combination or file, before sampling) is timed apart.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spectral  # noqa: E402
from edit.shifts import apply_deltas, layer_chooser  # noqa: E402
from ldm import checkpoint  # noqa: E402
from train import lora  # noqa: E402


def random_deltas(model, seed: int) -> dict:
    """Deltas named as train.single's shift file names them, 0.05 N(0, 1) each."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for component, module in (("unet", model.unet), ("text", model.text_encoder)):
        for name, delta in spectral.attach(module, progress=False).named_deltas().items():
            deltas[f"{component}.{name}"] = 0.05 * torch.randn(delta.shape, generator=generator)
        spectral.detach(module)
    return deltas


def random_lora(path: Path, seed: int) -> None:
    """A rank-4 LoRA file for the bundled model, UNet and text encoder, B = 0.05 N(0, 1)."""
    model = checkpoint.load(checkpoint.DEFAULT_MODEL)
    fingerprint = model.base_fingerprint()   # before the adapters change the module tree
    generator = torch.Generator().manual_seed(seed)
    adapted = {"unet": lora.attach(model.unet, 4, lora.UNET_TARGETS, generator),
               "text": lora.attach(model.text_encoder, 4, lora.TEXT_TARGETS, generator)}
    for layer in (layer for layers in adapted.values() for layer in layers.values()):
        layer.lora_B.data = 0.05 * torch.randn(layer.lora_B.shape, generator=generator)
    lora.save(path, adapted, model.unet.config, {"base_fingerprint": fingerprint})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/combined_sampling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per model (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe = checkpoint.load(checkpoint.DEFAULT_MODEL)
    first, second = random_deltas(probe, 1), random_deltas(probe, 2)
    combinations = {"add": spectral.add(first, second),
                    "interpolate 0.3": spectral.interpolate(first, second, 0.3),
                    "mix coarse": spectral.mix(first, second, layer_chooser("coarse", probe.unet.config))}
    models = {"base": checkpoint.load(checkpoint.DEFAULT_MODEL)}
    for name, deltas in combinations.items():
        models[name] = checkpoint.load(checkpoint.DEFAULT_MODEL)
        start = time.perf_counter()
        apply_deltas(models[name], deltas, progress=False)
        print(f"merging '{name}': {time.perf_counter() - start:.2f} s, once")
    with tempfile.TemporaryDirectory() as folder:
        random_lora(Path(folder) / lora.RESULT_NAME, 3)
        models["LoRA r=4"] = checkpoint.load(checkpoint.DEFAULT_MODEL)
        start = time.perf_counter()
        lora.merge_file(models["LoRA r=4"], Path(folder) / lora.RESULT_NAME)
        print(f"merging 'LoRA r=4': {time.perf_counter() - start:.2f} s, once")
    prompts = ["a red star on the left"] * 8
    times = {name: [] for name in models}
    names = list(models)
    for repeat in range(1 + args.repeats):   # round 0 warms every model up and is not timed
        turn = repeat % len(names)            # each round starts with another model: no place bias
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            models[name].generate(prompts, steps=25, guidance=4.0, seed=0, progress=False)
            if repeat:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["base"])
    for name, values in times.items():
        print(f"{name:>16}: median {statistics.median(values) * 1000:.0f} ms, "
              f"{statistics.median(values) / base:.3f}x the base model's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
