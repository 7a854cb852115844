"""train.multi's measurement table on the bundled tiny model (README, "Several subjects").

    python bench/multi_table.py [--eval-samples 200] [--output-dir runs/multi-table]

Five runs of python -m train.multi (each its defaults but for the setting named), then per run
the toy world's reader on --eval-samples images per cell, in phrasings no subject was trained
on (train/toy/subjects.py, measure_subjects):

    joint training, p = 0                        --cut-mix-prob 0 --unmix-weight 0
    Cut-Mix-Unmix, p = 0.6                       --unmix-weight 0
    Cut-Mix-Unmix + unmix loss                   (the defaults)
    full UNet fine-tune, Cut-Mix-Unmix + unmix   --method full
    three subjects (sks, zwx, qvr), CMU + unmix  a third subject, the qvr checker circle

Prints the table as markdown and writes OUTPUT_DIR/settings.png: the first three settings side
by side (one row each), 8 samples of "a sks star beside a zwx star" and 8 of "a zwx star next
to a sks star", the same seeds in every row, each labeled with what the reader sees (left to
right: sks, zwx, hybrid, or a plain color), so that the reader can be checked against the
pictures. About 30 minutes on 2 CPU cores.
"""

import argparse
import time
from pathlib import Path

import torch

from edit.grid import save_grid
from ldm.checkpoint import DEFAULT_MODEL, load
from train import multi
from train.toy import reader, world
from train.toy import subjects as toy

THIRD = toy.Example("checker_circle", "a qvr circle", "a circle")
TWO, THREE = list(multi.EXAMPLE), list(multi.EXAMPLE) + [THIRD]
SETTINGS = [   # (label, folder name, flags, subjects)
    ("joint training, p = 0", "joint", ["--cut-mix-prob", "0", "--unmix-weight", "0"], TWO),
    ("Cut-Mix-Unmix, p = 0.6 (no unmix loss)", "cut-mix", ["--unmix-weight", "0"], TWO),
    ("Cut-Mix-Unmix + unmix loss", "cut-mix-unmix", [], TWO),
    ("full UNet fine-tune, Cut-Mix-Unmix + unmix loss", "full", ["--method", "full"], TWO),
    ("three subjects (sks, zwx, qvr), Cut-Mix-Unmix + unmix loss", "three", [], THREE),
]
GRID_PROMPTS = ["a sks star beside a zwx star"] * 8 + ["a zwx star next to a sks star"] * 8


def run(name, flags, examples, root, seed):
    """Train one setting on the examples' centered renders (as train.multi's default writes
    them); returns the trained model."""
    argv = ["--output-dir", str(root / name), "--eval-samples", "0", "--overwrite", "--seed", str(seed), *flags]
    for e in examples:
        folder = root / name / "instance-images" / e.subject
        toy.write_instance_images(e.subject, folder, positions=("center",))
        argv += ["--subject", str(folder), e.instance_prompt, e.class_prompt]
    return multi.train(multi.parse_args(argv))


def main():
    parser = argparse.ArgumentParser(prog="python bench/multi_table.py", description=__doc__.split("\n")[0])
    parser.add_argument("--eval-samples", type=int, default=200, help="samples per cell (default: 200)")
    parser.add_argument("--output-dir", default="runs/multi-table", help="runs and the grid (default: runs/multi-table)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' --seed (default: 0)")
    args = parser.parse_args()
    root = Path(args.output_dir)
    rows, grid = [], []
    sample_steps = multi.MultiConfig().sample_steps
    base = load(DEFAULT_MODEL)   # its class images: what the drift is measured against
    base_readings = toy.base_class_readings(base, [(e.subject, e.instance_prompt, e.class_prompt) for e in THREE],
                                            args.eval_samples, sample_steps, base.default_guidance, args.seed + 1)
    for label, name, flags, examples in SETTINGS:
        t0 = time.time()
        model = run(name, flags, examples, root, args.seed)
        subjects = [(e.subject, e.instance_prompt, e.class_prompt) for e in examples]
        table = toy.measure_subjects(model, subjects, args.eval_samples, sample_steps, model.default_guidance,
                                     args.seed + 1, {c: base_readings[c] for _, _, c in subjects})
        rows.append((label, table))
        print(f"{label}: {toy.format_subjects(table, args.eval_samples)} ({(time.time() - t0) / 60:.1f} min)",
              flush=True)
        if len(grid) < 3:
            grid.append(model.generate(GRID_PROMPTS, steps=sample_steps,
                                       guidance=model.default_guidance, seed=args.seed + 2,
                                       progress=False))
    print("\n| setting | both subjects right, each its own pattern | mixing | each alone right | "
          "prior drift |\n|---|---|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t['together']:.0%} | {t['mixing']:.0%} | {t['alone']:.0%} | {t['drift']:.0%} |")
    path = root / "settings.png"
    images = torch.cat(grid[:3])
    save_grid(images, str(path), columns=len(GRID_PROMPTS), padding=2, scale=3,
              labels=[reading_label(r) for r in reader.read(images)])
    print(f"\n{args.eval_samples} samples per cell; grid of the first three settings (rows: "
          f"{'; '.join(s[0] for s in SETTINGS[:3])}), each image labeled with what the reader "
          f"sees: {path}")


def reading_label(objects):
    """What the reader sees, left to right: the subjects' tokens, 'hybrid', or a plain color."""
    tokens = {name: s.token for name, s in world.SUBJECTS.items()}
    return " | ".join(tokens.get(o["pattern"]) or ("hybrid" if o["pattern"] == "other" else o["color"])
                      for o in objects) or "nothing"


if __name__ == "__main__":
    main()
