"""Spectral shifts against LoRA and a full fine-tune on the bundled tiny model (README, "Spectral
shifts, LoRA and a full fine-tune"; the paper's sec. 4.4-4.5).

    python bench/compare.py [--seeds 0,1,2] [--steps 300] [--eval-samples 50] [--output-dir runs/compare]

1. The table. Every method trains train.single's example subject (the sks striped star) with the
   same data, steps and batch, for each seed and lambda = 1 and 0 (`python -m train.single
   --seed S --prior-loss-weight L` plus the method's flags; two runs at a time, one thread
   each). Fidelity and drift are the run's own headline (50 samples per prompt; the drift counts
   the subject's pattern and the rise in its colors over the base model). Trainable parameters:
   the tensors of the run's checkpoint; file size: its result file (a full fine-tune's UNet
   weights in float32, as there is no smaller file to share); peak memory: the peak resident
   memory of the run's process (all of it: model, data, sampling); step time: one training
   step of the lambda = 1 batch, median of interleaved repeats of its CPU time, against the
   frozen base (everything frozen, backward to the latents only), measured after the runs.
2. Combining. The zwx checker star trained alone too (seed 0, lambda = 1) with spectral shifts,
   LoRA r = 4 and the full fine-tune; then each pair added into the base model (spectral:
   ReLU(sigma + d_sks + d_zwx); LoRA: W + B1 A1 + B2 A2; full: W + (W1 - W) + (W2 - W)) and
   measured as train.multi is (subjects.measure_subjects: both subjects asked together in
   unplaced phrasings, mixing, each alone, drift), beside each subject's fidelity before
   combining.
3. Interpolation: ReLU(sigma + alpha d_sks + (1 - alpha) d_zwx), alpha 0 .. 1: the share of
   "a sks star" samples showing sks and of "a zwx star" samples showing zwx.
4. Style mixing: the layer groups of edit/shifts.py (coarse, fine, text) from the sks shift,
   every other layer from the zwx shift: what "a sks star" and "a zwx star" then show (the
   reader's pattern of the object: sks, zwx, a hybrid, or plain).

Grids (edit.sample, the same seeds in every row): OUTPUT_DIR/interpolation.png and
mixing-{coarse,fine,text}.png. Prints markdown tables (the numbers also go to
OUTPUT_DIR/results.json); about 27 minutes on 2 CPU cores with the defaults.
"""

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import spectral
from edit import sample, shifts
from ldm.checkpoint import DEFAULT_MODEL, load
from train import lora, single
from train.toy import reader, subjects
from train.trainable import freeze, make_trainable

METHODS = {   # label -> train.single flags
    "spectral shifts (UNet + text)": [],
    "LoRA r = 1": ["--method", "lora", "--lora-rank", "1"],
    "LoRA r = 4": ["--method", "lora", "--lora-rank", "4"],
    "LoRA r = 16": ["--method", "lora", "--lora-rank", "16"],
    "full UNet fine-tune": ["--method", "full"],
}
COMBINED = ("spectral shifts (UNet + text)", "LoRA r = 4", "full UNet fine-tune")
SKS, ZWX = subjects.EXAMPLE, subjects.Example("checker_star", "a zwx star", "a star")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIXES = ("coarse", "fine", "text")
HEADLINE = re.compile(r"subject fidelity (\d+)%.*prior drift (\d+)%")


def folder_name(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


# ----------------------------------------------------------------------------- training runs

def train(folder: Path, flags: list[str], args) -> dict:
    """One `python -m train.single` in its own process; its headline numbers, peak memory,
    trained values and result size."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "train.single", "--output-dir", str(folder), "--overwrite",
               "--steps", str(args.steps), "--validation-every", "0", "--eval-samples",
               str(args.eval_samples), "--svd-cache", str(args.output_dir / "svd"), *flags]
    with open(folder / "run.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    text = (folder / "run.log").read_text()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {folder / 'run.log'}")
    found = HEADLINE.search(text)
    if not found and "--instance-dir" not in flags:   # the example's runs end with the headline
        raise SystemExit(f"no fidelity / drift headline in {folder / 'run.log'}")
    parameters = torch.load(folder / "checkpoint.pt", weights_only=True)["parameters"]
    result = [p for p in folder.glob("*.safetensors")]
    numel = sum(p.numel() for p in parameters.values())
    return {"fidelity": int(found.group(1)) / 100 if found else None,
            "drift": int(found.group(2)) / 100 if found else None,
            "peak_mb": usage.ru_maxrss / 1024, "parameters": numel,
            "file_mb": (result[0].stat().st_size if result else 4 * numel) / 2**20}


def zwx_flags(folder: Path) -> list[str]:
    images = subjects.write_instance_images(ZWX.subject, str(folder / "instance-images"))
    return ["--instance-dir", images, "--instance-prompt", ZWX.instance_prompt,
            "--class-prompt", ZWX.class_prompt]


def all_runs(args) -> dict:
    """(label, seed, lambda) -> numbers, and ("zwx", label) -> numbers; two processes at a time."""
    jobs = {(label, seed, weight): (args.output_dir / folder_name(label) / f"seed{seed}-lambda{weight:g}",
                                    flags + ["--seed", str(seed), "--prior-loss-weight", str(weight)])
            for label, flags in METHODS.items() for seed in args.seeds for weight in (1.0, 0.0)}
    for label in COMBINED:
        folder = args.output_dir / "zwx" / folder_name(label)
        jobs["zwx", label] = folder, METHODS[label] + zwx_flags(folder)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {key: pool.submit(train, folder, flags, args) for key, (folder, flags) in jobs.items()}
        done = {}
        for number, (key, future) in enumerate(futures.items(), 1):
            done[key] = future.result()
            print(f"[{number}/{len(jobs)}, {time.perf_counter() - start:.0f} s] {key}: {done[key]}", flush=True)
    return done, {key: folder for key, (folder, _) in jobs.items()}


# ----------------------------------------------------------------------------- step time

def step_times(args, repeats: int = 15) -> dict[str, float]:
    """Median CPU seconds of one training step of the lambda = 1 batch (B subject + B prior
    latents, text encoder in the graph), per method, over interleaved repeats; "frozen base":
    nothing trained, backward to the latents only."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    variants = {}
    for label in ["frozen base", *METHODS]:
        model = load(DEFAULT_MODEL)
        optimizer = None
        if label != "frozen base":   # the run's own settings, resolved as train.single does
            config = single.parse_args([*METHODS[label], "--svd-cache", str(args.output_dir / "svd")])
            config = single.resolve(single.with_example(config), model, model.base_fingerprint())
            trainable = make_trainable(model, config)
            optimizer = torch.optim.AdamW(trainable.param_groups(config.lr, config.lr_1d))
        else:
            freeze(model)
        model.unet.train()
        variants[label] = model, optimizer
    size = model.image_size // model.latent_factor
    latents = torch.randn(16, model.vae.config.embed_dim, size, size, generator=generator)
    t = torch.randint(0, 1000, (16,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    times = {label: [] for label in variants}
    for repeat in range(repeats + 1):
        for label, (model, optimizer) in variants.items():
            began = time.process_time()
            tokens = model.text_encoder.tokenize([SKS.instance_prompt] * 8 + [SKS.class_prompt] * 8)
            x = latents.clone().requires_grad_(optimizer is None)
            loss = single.diffusion_loss(model, x, model.text_encoder(tokens), t, noise).mean()
            loss.backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if repeat:   # the first round warms up
                times[label].append(time.process_time() - began)
    return {label: statistics.median(values) for label, values in times.items()}


# ----------------------------------------------------------------------------- combining

def base_model():
    return load(DEFAULT_MODEL)


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A full fine-tune's trained UNet weights, from its checkpoint ("unet.<name>")."""
    return torch.load(folder / "checkpoint.pt", weights_only=True)["parameters"]


def combined_model(label: str, folders: list[Path]):
    """The base model with the runs in `folders` added, as `label`'s method adds them."""
    model = base_model()
    if label.startswith("spectral"):
        shifts.apply_shifts(model, [(str(f / "spectral_shifts.safetensors"), 1.0) for f in folders],
                            progress=False)
    elif label.startswith("LoRA"):
        fingerprint = model.base_fingerprint()
        for folder in folders:
            lora.merge_file(model, folder / lora.RESULT_NAME, 1.0, fingerprint)
    else:
        state = model.unet.state_dict()
        base = {k: v.clone() for k, v in state.items()}
        with torch.no_grad():
            for folder in folders:
                for name, value in full_weights(folder).items():
                    key = name.removeprefix("unet.")
                    state[key] += value - base[key]
    return model


def generate(model, prompts: list[str], args):
    return model.generate(prompts, steps=25, guidance=model.default_guidance, seed=args.seed_eval,
                          progress=False, batch_size=50)


def share(model, prompt: str, subject: str, args, image_reader) -> float:
    """Share of --eval-samples images of `prompt` (+ placements) showing `subject`."""
    images = generate(model, subjects.placed(prompt, args.eval_samples), args)
    return reader.subject_fidelity(reader.read(images, image_reader), subject)


def combining(folders: dict, args, image_reader) -> dict:
    rows = {}
    pair = [(SKS.subject, SKS.instance_prompt, SKS.class_prompt), (ZWX.subject, ZWX.instance_prompt, ZWX.class_prompt)]
    base = base_model()
    base_readings = subjects.base_class_readings(base, pair, args.eval_samples, 25, base.default_guidance, args.seed_eval)
    for label in COMBINED:
        runs = [folders[label, args.seeds[0], 1.0], folders["zwx", label]]
        alone = [share(combined_model(label, [run]), e.instance_prompt, e.subject, args, image_reader)
                 for run, e in zip(runs, (SKS, ZWX))]
        model = combined_model(label, runs)
        both = subjects.measure_subjects(model, pair, args.eval_samples, 25, model.default_guidance, args.seed_eval,
                                         base_readings)
        rows[label] = {**both, "before": alone,
                       "combined": [share(model, e.instance_prompt, e.subject, args, image_reader) for e in (SKS, ZWX)]}
    return rows


def patterns(model, prompt: str, args, image_reader) -> dict[str, float]:
    """What `prompt`'s images show: the share whose objects carry sks's pattern, zwx's, a
    hybrid, or are plain (an image counts once, by its first patterned object)."""
    counts = {"sks": 0, "zwx": 0, "hybrid": 0, "plain": 0}
    names = {SKS.subject: "sks", ZWX.subject: "zwx"}
    for objects in reader.read(generate(model, subjects.placed(prompt, args.eval_samples), args), image_reader):
        found = [o["pattern"] for o in objects if o["pattern"] != "plain"]
        counts[names.get(found[0], "hybrid") if found else "plain"] += 1
    return {k: v / args.eval_samples for k, v in counts.items()}


def spectral_sweeps(folders: dict, args, image_reader) -> tuple[dict, dict]:
    label = "spectral shifts (UNet + text)"
    files = [folders[label, args.seeds[0], 1.0] / "spectral_shifts.safetensors",
             folders["zwx", label] / "spectral_shifts.safetensors"]
    first, second = shifts.read_deltas(base_model(), [str(f) for f in files])
    interpolation = {}
    for alpha in ALPHAS:
        model = base_model()
        shifts.apply_deltas(model, spectral.interpolate(first, second, alpha), progress=False)
        interpolation[alpha] = [share(model, e.instance_prompt, e.subject, args, image_reader) for e in (SKS, ZWX)]
    mixing = {}
    for group in MIXES:
        model = base_model()
        chooser = shifts.layer_chooser(group, model.unet.config)
        shifts.apply_deltas(model, spectral.mix(first, second, chooser), progress=False)
        mixing[group] = {e.instance_prompt: patterns(model, e.instance_prompt, args, image_reader) for e in (SKS, ZWX)}
    for argv in (["--interpolate", *map(str, files), "--alpha", ",".join(map(str, ALPHAS)),
                  "--output", str(args.output_dir / "interpolation.png")],
                 *(["--mix", *map(str, files), "--mix-layers", group,
                    "--output", str(args.output_dir / f"mixing-{group}.png")] for group in MIXES)):
        if sample.main([*argv, "--prompt", SKS.instance_prompt, "--prompt", ZWX.instance_prompt, "--num-images",
                        "8", "--overwrite", "--quiet", "--svd-cache", str(args.output_dir / "svd")]):
            raise SystemExit(f"python -m edit.sample {' '.join(argv)} failed")
    return interpolation, mixing


# ----------------------------------------------------------------------------- tables

def spread(values: list[float], percent: bool = True) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.0f}{unit}"
    return f"{mean:.0f}{unit} ± {statistics.stdev(values) * scale:.0f}"


def size(megabytes: float) -> str:
    return f"{megabytes:.1f} MB" if megabytes >= 1 else f"{megabytes * 1024:.0f} KB"


def print_tables(runs: dict, times: dict, combined: dict, interpolation: dict, mixing: dict, args) -> None:
    print(f"\n{len(args.seeds)} seeds ({','.join(map(str, args.seeds))}), {args.steps} steps, "
          f"{args.eval_samples} samples per prompt; mean ± standard deviation over seeds\n")
    print("| method | trainable params | file size | subject fidelity | prior drift, lambda = 1 "
          "| fidelity, lambda = 0 | prior drift, lambda = 0 | step time vs frozen base | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in METHODS:
        one = [runs[label, s, 1.0] for s in args.seeds]
        zero = [runs[label, s, 0.0] for s in args.seeds]
        print(f"| {label} | {one[0]['parameters']:,} | {size(one[0]['file_mb'])} "
              f"| {spread([r['fidelity'] for r in one])} | {spread([r['drift'] for r in one])} "
              f"| {spread([r['fidelity'] for r in zero])} | {spread([r['drift'] for r in zero])} "
              f"| {times[label] / times['frozen base']:.2f}x "
              f"| {statistics.mean(r['peak_mb'] for r in one):.0f} MB |")
    print(f"\nthe frozen base's step: {times['frozen base'] * 1000:.0f} ms of CPU\n")
    print("| method, sks + zwx added | sks alone: before, combined | zwx alone: before, combined "
          "| both asked together, both right | mixing | drift |")
    print("|---|---|---|---|---|---|")
    for label, row in combined.items():
        print(f"| {label} | {row['before'][0]:.0%}, {row['combined'][0]:.0%} | {row['before'][1]:.0%}, "
              f"{row['combined'][1]:.0%} | {row['together']:.0%} | {row['mixing']:.0%} | {row['drift']:.0%} |")
    print("\n| alpha (weight of sks) | " + " | ".join(f"{a:g}" for a in ALPHAS) + " |")
    print("|---|" + "---|" * len(ALPHAS))
    for index, e in enumerate((SKS, ZWX)):
        print(f"| '{e.instance_prompt}' shows {e.instance_prompt.split()[1]} | "
              + " | ".join(f"{interpolation[a][index]:.0%}" for a in ALPHAS) + " |")
    print("\n| from the sks shift (the rest from zwx) | prompt | sks pattern | zwx pattern | hybrid | plain |")
    print("|---|---|---|---|---|---|")
    for group, rows in mixing.items():
        for prompt, row in rows.items():
            print(f"| {group} | {prompt} | " + " | ".join(f"{row[k]:.0%}" for k in ("sks", "zwx", "hybrid", "plain")) + " |")


def main():
    parser = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2],
                        help="training seeds (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run (default: 300)")
    parser.add_argument("--eval-samples", type=int, default=50, help="samples per prompt and cell (default: 50)")
    parser.add_argument("--workers", type=int, default=2, help="training runs at a time (default: 2)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"), help="default: runs/compare")
    args = parser.parse_args()
    args.seed_eval = args.seeds[0] + 1   # the seed the first seed's headline samples with
    start = time.perf_counter()
    runs, folders = all_runs(args)
    torch.set_num_threads(2)
    image_reader = reader.load_reader()
    combined = combining(folders, args, image_reader)
    interpolation, mixing = spectral_sweeps(folders, args, image_reader)
    times = step_times(args)
    results = {"runs": [[*key, value] for key, value in runs.items()], "times": times, "combined": combined,
               "interpolation": interpolation, "mixing": mixing}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(runs, times, combined, interpolation, mixing, args)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
