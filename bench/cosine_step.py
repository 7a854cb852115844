"""edit.cosine's fine-tuning step against train.single's on the same model: the goal is 1.0x
(one core, one loss; CoSINE only drops the prior half of the batch, which train.single drops too
with --prior-loss-weight 0, as here).

    python bench/cosine_step.py            # bundled model, batch 8, 40 steps per run, 3 repeats

Both commands run through their main() with their defaults on the bundled model (spectral
shifts on the UNet and the text encoder), alternating, each repeat in a fresh folder; a step's
time is log.csv's `seconds` (forward, backward, optimizer, books), the first 5 steps of each
run dropped as warm-up. Prints the median over all kept steps of each, and their ratio.
"""

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit import cosine  # noqa: E402
from train import single  # noqa: E402

COMMON = ["--batch-size", "8", "--validation-every", "0", "--eval-samples", "0", "--save-every", "1000"]


def step_seconds(folder: Path, warmup: int = 5) -> list[float]:
    with open(folder / "log.csv", newline="") as file:
        return [float(row["seconds"]) for row in csv.DictReader(file)][warmup:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cosine_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (default 3)")
    args = parser.parse_args(argv)
    times = {"train.single": [], "edit.cosine": []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            out = Path(root) / f"single-{repeat}"
            assert single.main([*COMMON, "--steps", str(args.steps), "--prior-loss-weight", "0",
                                "--output-dir", str(out)]) == 0
            times["train.single"] += step_seconds(out)
            out = Path(root) / f"cosine-{repeat}"
            assert cosine.main([*COMMON, "--steps", str(args.steps), "--edit", "a blue star on the left",
                                "--num-images", "1", "--output-dir", str(out)]) == 0
            times["edit.cosine"] += step_seconds(out)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: median step {value * 1000:.1f} ms over {len(times[name])} steps")
    print(f"edit.cosine / train.single step time: {medians['edit.cosine'] / medians['train.single']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
