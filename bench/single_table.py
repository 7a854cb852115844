"""train.single's fidelity / drift table on the bundled tiny model (README, "The main job").

    python bench/single_table.py [--eval-samples 50] [--output-dir runs/single-table]

Six runs of python -m train.single (each its defaults but for the flags named: the method, the
text encoder's shifts, the batch, the prior loss), then per run the toy world's reader on
--eval-samples images of the instance prompt (subject fidelity: the share showing the subject)
and of the class prompt (prior drift against the base model's samples of the same seeds:
reader.prior_drift, patterns and colors), with the seeds train.single's own headline uses.
About 13 minutes on 2 CPU cores.
"""

import argparse
import time
from pathlib import Path

from ldm.checkpoint import DEFAULT_MODEL, load
from train import single
from train.toy import subjects as toy

SETTINGS = [   # (label, folder name, flags)
    ("spectral shifts, UNet + text, batch 8, lambda = 1 (the default)", "default", []),
    ("the same, lambda = 0", "no-prior", ["--prior-loss-weight", "0"]),
    ("spectral shifts, UNet only, batch 4, lambda = 1", "unet-only",
     ["--no-train-text-encoder", "--batch-size", "4"]),
    ("the same, lambda = 0", "unet-only-no-prior",
     ["--no-train-text-encoder", "--batch-size", "4", "--prior-loss-weight", "0"]),
    ("full UNet fine-tune, batch 8, lambda = 1", "full", ["--method", "full"]),
    ("full UNet fine-tune, batch 4, lambda = 1", "full-batch-4", ["--method", "full", "--batch-size", "4"]),
]


def main():
    parser = argparse.ArgumentParser(prog="python bench/single_table.py", description=__doc__.split("\n")[0])
    parser.add_argument("--eval-samples", type=int, default=50, help="samples per prompt (default: 50)")
    parser.add_argument("--output-dir", default="runs/single-table", help="the runs (default: runs/single-table)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' --seed (default: 0)")
    args = parser.parse_args()
    example, base = toy.EXAMPLE, load(DEFAULT_MODEL)
    sampling = (args.eval_samples, single.SingleConfig().sample_steps, base.default_guidance, args.seed + 1)
    base_readings = toy.placed_readings(base, example.class_prompt, *sampling)
    rows = []
    for label, name, flags in SETTINGS:
        t0 = time.time()
        config = single.parse_args(["--output-dir", str(Path(args.output_dir) / name), "--overwrite",
                                    "--eval-samples", "0", "--seed", str(args.seed), *flags])
        model = single.train(config)
        fidelity, drift = toy.measure(model, example.subject, example.instance_prompt, example.class_prompt,
                                      *sampling, base_readings)
        rows.append((label, " ".join(flags), fidelity, drift))
        print(f"{label}: fidelity {fidelity:.0%}, drift {drift:.0%} ({(time.time() - t0) / 60:.1f} min)", flush=True)
    print(f"\n{args.eval_samples} samples per prompt\n\n| setting | flags | subject fidelity | prior drift |\n"
          "|---|---|---|---|")
    for label, flags, fidelity, drift in rows:
        print(f"| {label} | `{flags}` | {fidelity:.0%} | {drift:.0%} |" if flags else
              f"| {label} | | {fidelity:.0%} | {drift:.0%} |")


if __name__ == "__main__":
    main()
