"""CoSINE's edit table on the bundled model: edit success and preservation per method and
starting point, which starting point suits which edit kind, and the inversion's reconstruction
error versus DDIM steps.

    python bench/cosine_table.py                 # 34 scenes x 3 edits (102), on 2 CPU cores
    python bench/cosine_table.py --scenes 3      # a quick look

Scenes (train.toy.edits.random_edits): one object named by color, shape and position on a
plain background, each with one color, one shape and one position edit. Per scene, as
edit.cosine does with its defaults on the bundled model: the spectral shifts are fine-tuned on
(scene, caption); so, for the paper's comparison, is every UNet weight (--method full); and the
base model is used as it is. Each edit is then sampled once per starting point (SETTINGS: the
inversion under the target prompt with DDIM eta or slerp toward fresh noise, and fresh noise
alone), 25 DDIM steps, guidance 4, and judged by the reader (train.toy.edits.judge): success (the
edited attribute took its new value), preserved (one object, the other two attributes kept),
background kept. "best" picks, per method and edit kind, the setting with the most edits both
right: chosen on the same edits it is reported on, so it is an upper bound for that method.
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit import cosine  # noqa: E402
from ldm import ddim  # noqa: E402
from train import core, data  # noqa: E402
from train.toy import edits, reader, world  # noqa: E402
from PIL import Image  # noqa: E402

INVERSION = [cosine.Setting(eta, 0.0) for eta in (0.0, 0.5, 1.0)] + \
            [cosine.Setting(0.0, alpha) for alpha in (0.25, 0.5, 0.75)]
FRESH = cosine.Setting(0.0, 0.0)
METHODS = {"spectral": "CoSINE (spectral shifts)", "none": "no fine-tune", "full": "full UNet fine-tune"}
SETTING_LABELS = [s.label(True) for s in INVERSION] + [FRESH.label(False)]   # the tables' rows
STEP_COUNTS = (10, 25, 50, 100)               # the reconstruction error's DDIM steps


def settings_of(config) -> dict:
    return {"guidance": config.guidance, "sample_steps": config.sample_steps}


def prepare(method: str, image_path: str, scene, prompts: dict, out: Path):
    """The model of `method` for one scene (fine-tuned as edit.cosine does) and its config."""
    argv = ["--image", image_path, "--prompt", scene.caption, *sum((["--edit", p] for p in prompts.values()), []),
            "--output-dir", str(out), "--overwrite", "--validation-every", "0", "--eval-samples", "0",
            "--validation-prompt", scene.caption, "--method", "spectral" if method == "none" else method]
    config = cosine.parse_args(argv)
    model, fingerprint = core.load_model(config)
    config = cosine.resolve(config, model)
    if method != "none":
        cosine.fine_tune(model, config, fingerprint, Image.open(image_path).convert("RGB"))
    model.unet.eval()
    return model, config


def reconstruction_errors(model, source, prompt: str) -> dict:
    """Relative latent error ||z' - z*|| / ||z*|| of invert-then-sample under the source prompt,
    guidance 1 and eta 0, per DDIM step count."""
    cond = model.encode_prompts([prompt])
    errors = {}
    for steps in STEP_COUNTS:
        common = dict(schedule=model.schedule, steps=steps, progress=False)
        back = ddim.sample(model.denoise, ddim.invert(model.denoise, source, cond, guidance=1.0, **common),
                           cond, None, guidance=1.0, **common)
        errors[steps] = float((back - source).norm() / source.norm())
    return errors


def judge_edits(model, config, scene, prompts, source, image_reader, seed, with_fresh: bool) -> list[dict]:
    """One row per (edit kind, setting): the reader's verdict on the one image sampled."""
    rows = []
    for kind, prompt in prompts.items():
        runs = [(True, INVERSION)] + ([(False, [FRESH])] if with_fresh else [])
        for invert, settings in runs:
            latents = cosine.edit_latents(model, source, prompt, settings, invert, 1, seed,
                                          config.sample_steps, config.guidance)[0]
            images = model.decode(latents)
            verdicts = edits.judge(scene.caption, prompt, images, scene.background, image_reader)
            rows += [{"kind": kind, "setting": setting.label(invert), **verdict}
                     for setting, verdict in zip(settings, verdicts)]
    return rows


def share(rows, key) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def both(rows) -> float:
    return share([{"x": r["success"] and r["preserved"]} for r in rows], "x")


def report(results: dict, errors: dict, scenes: int) -> str:
    lines = [f"CoSINE on the bundled model: {scenes} scenes x 3 edit kinds, one image per edit and setting",
             "", "| method | starting point / noise | edit success | preservation | both | background kept |",
             "|---|---|---|---|---|---|"]
    picks = {}
    for method in METHODS:
        rows = results[method]
        per_kind = defaultdict(lambda: defaultdict(list))
        for r in rows:
            per_kind[r["kind"]][r["setting"]].append(r)
        inverted = {k: {s: v for s, v in by.items() if s.startswith("inversion")} for k, by in per_kind.items()}
        best = {k: max(by, key=lambda s: both(by[s])) for k, by in inverted.items()}
        picks[method] = best
        chosen = [r for k, s in best.items() for r in per_kind[k][s]]
        name = METHODS[method]
        lines.append(f"| {name} | inversion, best setting per kind | {share(chosen, 'success'):.0%} | "
                     f"{share(chosen, 'preserved'):.0%} | {both(chosen):.0%} | {share(chosen, 'background'):.0%} |")
        fresh = [r for r in rows if r["setting"] == FRESH.label(False)]
        if fresh:
            lines.append(f"| {name} | fresh noise, eta 0 | {share(fresh, 'success'):.0%} | "
                         f"{share(fresh, 'preserved'):.0%} | {both(fresh):.0%} | {share(fresh, 'background'):.0%} |")
    lines += ["", "Best setting per kind: " + "; ".join(
        f"{method}: " + ", ".join(f"{k} -> {s}" for k, s in best.items()) for method, best in picks.items())]
    lines += ["", "Per setting, every method: both right / background kept, all edit kinds",
              "", "| setting | " + " | ".join(METHODS.values()) + " |", "|---|" + "---|" * len(METHODS)]
    for label in SETTING_LABELS:
        cells = []
        for method in METHODS:
            rows = [r for r in results[method] if r["setting"] == label]
            cells.append(f"{both(rows):.0%} / {share(rows, 'background'):.0%}" if rows else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per setting (CoSINE, spectral shifts): both right / success / preserved, per edit kind",
              "", "| setting | " + " | ".join(edits.ATTRIBUTES) + " |", "|---|" + "---|" * len(edits.ATTRIBUTES)]
    for label in SETTING_LABELS:
        cells = []
        for kind in edits.ATTRIBUTES:
            rows = [r for r in results["spectral"] if r["kind"] == kind and r["setting"] == label]
            cells.append(f"{both(rows):.0%} / {share(rows, 'success'):.0%} / {share(rows, 'preserved'):.0%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Inversion round trip (guidance 1, eta 0, source prompt): relative latent error, "
              "mean over scenes", "", "| model | " + " | ".join(f"{n} steps" for n in STEP_COUNTS) + " |",
              "|---|" + "---|" * len(STEP_COUNTS)]
    for method, per_scene in errors.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{statistics.mean(e[n] for e in per_scene):.1%}" for n in STEP_COUNTS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cosine_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=34, help="random scenes, 3 edits each (default 34)")
    parser.add_argument("--seed", type=int, default=0, help="which scenes (default 0)")
    parser.add_argument("--error-scenes", type=int, default=10,
                        help="scenes whose inversion round trip is measured (default 10)")
    parser.add_argument("--output-dir", default="runs/cosine-table", help="work folder (default runs/cosine-table)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_reader = reader.load_reader()
    results, errors = defaultdict(list), defaultdict(list)
    start = time.perf_counter()
    for i, (scene, prompts) in enumerate(edits.random_edits(args.scenes, args.seed)):
        image_path = str(out / f"scene-{i:03d}.png")
        Image.fromarray(world.render(scene)).save(image_path)
        for method in METHODS:
            model, config = prepare(method, image_path, scene, prompts, out / "run")
            source = model.encode(data.to_tensor(Image.open(image_path).convert("RGB"))[None])
            with torch.no_grad():
                results[method] += judge_edits(model, config, scene, prompts, source, image_reader,
                                               seed=i, with_fresh=method == "spectral")
                if i < args.error_scenes and method != "full":
                    errors[method].append(reconstruction_errors(model, source, scene.caption))
        print(f"scene {i + 1}/{args.scenes} done, {time.perf_counter() - start:.0f} s", flush=True)
    text = report(results, errors, args.scenes)
    (out / "results.json").write_text(json.dumps({"results": results, "errors": errors}, indent=1))
    print(text)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
