"""Read generated toy-world images: which shape, color, pattern and position each shows.

The reader is a small CNN trained only on toy-world renders (train/toy/world.py), subjects
included, with noise, blur and color jitter so that it also reads imperfect generated images.
It looks at three slots (left, center, right) and says, per slot:

    shape   in {none, circle, square, triangle, star, heart}     (none: the slot is empty)
    color   in COLORS                                            (the fill, for plain objects)
    pattern in {plain, striped_star, checker_star, ..., other}   (plain, which subject, or a
                                                                  two-color pattern that is no
                                                                  subject's, e.g. a hybrid)

so an image reads as a list of objects [(position, shape, color, pattern)], left to right.
From the readings:

    prompt following = share of samples whose objects match the prompt (shape and color of
                       each object, in the right slot when the prompt names one)
    subject fidelity = share of "a sks star" samples that show the subject (pattern == subject)
    prior drift      = share of "a star" samples that show the subject, plus how much more often
                       than the base model's they come out plain in the subject's colors

    python -m train.toy.reader                          # the bundled model, quality-bar table
    python -m train.toy.reader --model PATH --eval-samples 100 --sample-steps 25 --guidance 4
    python -m train.toy.reader --train-reader           # retrain weights/evaluator.safetensors
"""
import argparse
import dataclasses
import os
import re
import sys
import time
from itertools import permutations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edit.cli import check_output_dir, check_output_file, check_range, usage_errors
from ldm.checkpoint import DEFAULT_MODEL
from train.data import to_tensor
from train.toy import world

SLOTS = world.POSITIONS                          # ("left", "center", "right")
SHAPES = ("none",) + world.SHAPES
COLORS = tuple(world.COLORS)
PATTERNS = world.PATTERNS
HEADS = (len(SHAPES), len(COLORS), len(PATTERNS))
READER_PATH = os.path.join(os.path.dirname(DEFAULT_MODEL), "evaluator.safetensors")  # in weights/


class Reader(nn.Module):
    """images (B, 3, 32, 32) in [-1, 1] -> logits per slot: shape (B, 3, 6), color (B, 3, 6),
    pattern (B, 3, len(PATTERNS))."""

    def __init__(self, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(),
                                  nn.Linear(128, len(SLOTS) * sum(HEADS)))

    def forward(self, x):
        out = self.head(self.features(x)).view(len(x), len(SLOTS), sum(HEADS))
        return out.split(HEADS, dim=-1)


# ---------------------------------------------------------------- training data for the reader

def labels(scene):
    """Scene -> LongTensor (3 slots, 3 heads): shape, color, pattern ids; -1 = no label."""
    out = torch.full((len(SLOTS), 3), -1, dtype=torch.long)
    out[:, 0] = 0                                  # empty unless an object sits there
    for obj in scene.objects:
        slot = SLOTS.index(obj.position)
        out[slot, 0] = SHAPES.index(obj.shape)
        out[slot, 1] = COLORS.index(obj.color) if obj.color else -1
        out[slot, 2] = PATTERNS.index(obj.pattern)
    return out


def reader_data(n, seed):
    """n renders with subjects, and (15% of the other objects) foreign patterns among the
    objects: (images float (n, 3, 32, 32), labels (n, 3, 3))."""
    scenes = [with_foreign_textures(world.scene_rng(seed, i)) for i in range(n)]
    images = np.stack([world.render(s) for s in scenes])
    # channels last: the layout the bundled reader was trained and is run on (convolutions
    # round differently on another)
    x = to_tensor(images, memory_format=torch.channels_last)
    return x, torch.stack([labels(s) for s in scenes])


def with_foreign_textures(rng, share=0.15):
    """A scene of sample_scene with subjects, where `share` of its plain objects wear a pattern
    that is no subject's (world.foreign_texture), which the reader must call "other"."""
    scene = world.sample_scene(rng, subjects=tuple(world.SUBJECTS))
    objects = tuple(
        dataclasses.replace(o, color=None, texture=world.foreign_texture(rng, o.shape))
        if o.subject is None and rng.random() < share else o for o in scene.objects)
    return dataclasses.replace(scene, objects=objects)


def augment(x, g):
    """Imperfections of generated images: noise, blur, brightness/color shifts, 1 px shifts."""
    b = len(x)
    x = x * (1 + 0.1 * torch.randn(b, 1, 1, 1, generator=g)) + 0.08 * torch.randn(b, 3, 1, 1, generator=g)
    blur = torch.tensor([1.0, 2.0, 1.0])
    kernel = (blur[:, None] * blur[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.3, blurred, x)
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, (dy, dx), dims=(2, 3))
    return x + torch.rand(b, 1, 1, 1, generator=g) * 0.06 * torch.randn(x.shape, generator=g)


def loss_fn(logits, y):
    return sum(F.cross_entropy(l.reshape(-1, l.shape[-1]), y[..., k].reshape(-1), ignore_index=-1)
               for k, l in enumerate(logits))


def train_reader(n=16000, epochs=8, batch_size=128, seed=1234, path=READER_PATH):
    """Train the reader on renders (dataset seed distinct from pretraining's) and save it."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    torch.manual_seed(seed)
    x, y = reader_data(n, seed)
    reader = Reader()
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(range(steps), desc="reader")
    for step in bar:
        index = torch.randint(n, (batch_size,), generator=g)
        loss = loss_fn(reader(augment(x[index], g)), y[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, path,
              {"trained_on": f"train.toy.world.sample_scene seed {seed}, n {n}, epochs {epochs}"})
    return reader.eval()


def load_reader(path=READER_PATH):
    from safetensors.torch import load_file
    reader = Reader()
    reader.load_state_dict(load_file(path))
    return reader.eval()


# ---------------------------------------------------------------- reading images

@torch.no_grad()
def read(images, reader=None):
    """uint8 (n, 32, 32, 3) renders, or generated images (n, 3, 32, 32) in [0, 1] (read as the
    uint8 pixels a PNG of them holds) -> per image a list of objects, left to right:
    [{"position", "shape", "color", "pattern"}]; color is None for a subject."""
    reader = reader or load_reader()
    if isinstance(images, torch.Tensor):
        images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    x = to_tensor(images, memory_format=torch.channels_last)    # as in reader_data
    shape, color, pattern = (l.argmax(-1) for l in reader(x))
    out = []
    for i in range(len(images)):
        objects = []
        for s, slot in enumerate(SLOTS):
            if shape[i, s] == 0:
                continue
            p = PATTERNS[pattern[i, s]]
            objects.append(dict(position=slot, shape=SHAPES[shape[i, s]], pattern=p,
                                color=COLORS[color[i, s]] if p == "plain" else None))
        out.append(objects)
    return out


def parse(prompt):
    """Toy prompt -> the objects it asks for: [{"position" or None, "shape", "color" or None,
    "pattern" or None}] (None: not specified)."""
    tokens = {s.token: name for name, s in world.SUBJECTS.items()}
    wanted = []
    for part in re.split(" and | beside | next to ", prompt):
        words = part.split()
        obj = dict(position=None, shape=None, color=None, pattern=None)
        for w in words:
            if w in world.SHAPES:
                obj["shape"] = w
            elif w in world.COLORS:
                obj["color"], obj["pattern"] = w, "plain"
            elif w in tokens:
                obj["pattern"] = tokens[w]
            elif w in SLOTS:
                obj["position"] = w
        wanted.append(obj)
    return wanted


def match(wanted, seen):
    """Which attributes of the wanted objects the seen ones get right: a dict of booleans.

    One wanted object: shape, color (or subject) of the object seen (the only one, else the
    one in the named slot) and, when the prompt names a slot, whether it sits there. Two:
    "objects" (both drawn, in either order) and, when the prompt names their slots, each
    attribute per slot ("left shape", ...)."""
    result = {"count": len(seen) == len(wanted)}
    if len(wanted) == 1:
        w = wanted[0]
        same_slot = [o for o in seen if o["position"] == w["position"]]
        obj = seen[0] if len(seen) == 1 else (same_slot[0] if same_slot else None)
        checks = [(w, "", obj)]
        if w["position"]:
            result["position"] = obj is not None and obj["position"] == w["position"]
    else:
        by_slot = {o["position"]: o for o in seen}
        checks = [(w, f"{w['position']} ", by_slot.get(w["position"])) for w in wanted
                  if w["position"]]
        result["objects"] = len(seen) == len(wanted) and any(
            all(_same(w, o) for w, o in zip(wanted, order)) for order in permutations(seen))
    for w, prefix, obj in checks:
        result[prefix + "shape"] = obj is not None and obj["shape"] == w["shape"]
        if w["color"]:
            result[prefix + "color"] = obj is not None and obj["color"] == w["color"]
        if w["pattern"] and w["pattern"] != "plain":
            result[prefix + "subject"] = obj is not None and obj["pattern"] == w["pattern"]
    result["all"] = all(result.values())
    return result


def _same(w, o):
    """Does seen object o show wanted object w (attributes the prompt leaves open match)?"""
    return (o["shape"] == w["shape"] and (w["color"] is None or o["color"] == w["color"])
            and (w["pattern"] in (None, "plain") or o["pattern"] == w["pattern"]))


def accuracy(prompts, readings):
    """Share of samples right per attribute (and "all"), for prompts[i] read as readings[i]."""
    rows = [match(parse(p), r) for p, r in zip(prompts, readings)]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


def subject_fidelity(readings, subject):
    """Share of images that show `subject` (any slot): for prompts with its token."""
    return float(np.mean([any(o["pattern"] == subject for o in r) for r in readings]))


def in_colors(readings, colors):
    """Share of images with no patterned object and a plain one in one of `colors`."""
    return float(np.mean([all(o["pattern"] == "plain" for o in r) and any(o["color"] in colors for o in r)
                          for r in readings]))


def color_rise(readings, base_readings, colors):
    """How much more often than the base model's images of the same prompts and seeds
    (`base_readings`) the images are drawn plain in one of `colors` (0 when less often): the
    base model draws any color by chance (the sks star's 2 of the 6 colors in a third of its
    stars), so only the rise is drift."""
    return max(0.0, in_colors(readings, colors) - in_colors(base_readings, colors))


def prior_drift(readings, subject, base_readings):
    """How far class-prompt images ("a star") moved toward `subject`: the share that show it
    (its pattern), plus the color_rise of its colors."""
    colors = world.SUBJECTS[subject].colors
    return subject_fidelity(readings, subject) + color_rise(readings, base_readings, colors)


# ---------------------------------------------------------------- the quality bar

def prompt_sets(n, seed=0):
    """The standard prompt sets, n prompts each: single objects (every color x shape in turn),
    single objects with a position, two objects with positions (random, seeded; left first, and
    the same pairs right first), two objects without positions."""
    rng = np.random.default_rng(seed)
    combos = [(c, s) for s in world.SHAPES for c in world.COLORS]

    def phrase(c, s):
        return world.Object(s, "center", 0, 0, 0, color=c).phrase()

    single = [phrase(*combos[i % len(combos)]) for i in range(n)]
    placed = [f"{phrase(*combos[rng.integers(len(combos))])} {world.POSITION_PHRASE[SLOTS[i % 3]]}"
              for i in range(n)]
    two, reversed_, unplaced = [], [], []
    for i in range(n):
        a, b = rng.choice(len(combos), 2, replace=False)
        two.append(f"{phrase(*combos[a])} on the left and {phrase(*combos[b])} on the right")
        reversed_.append(f"{phrase(*combos[b])} on the right and {phrase(*combos[a])} on the left")
        a, b = rng.choice(len(combos), 2, replace=False)
        unplaced.append(f"{phrase(*combos[a])} {world.PAIR_WORDS[i % 3]} {phrase(*combos[b])}")
    return {"single": single, "single, placed": placed, "two objects": two,
            "two, reversed": reversed_, "two, unplaced": unplaced}


# a placed pair's objects on their named sides is what the model learns last (weights/README.md),
# in both phrasing orders: the same pairs right first ("a blue circle on the right and a red
# star on the left") show whether it reads the side words or only their order; an unplaced pair
# ("a red star beside a blue circle") is the held-out phrasing of train.multi's measurement
BAR = {"single": 0.8, "two objects": 0.5, "two, reversed": 0.5, "two, unplaced": 0.7}


def quality_bar(model, eval_samples=100, sample_steps=25, guidance=4.0, seed=0, output_dir=None,
                reader=None):
    """Generate the prompt sets (eval_samples prompts each), read the images, print and return
    the table; with output_dir, also a grid of each set's first 40 samples there."""
    reader = reader or load_reader()
    table = {}
    for name, prompts in prompt_sets(eval_samples, seed).items():
        images = model.generate(prompts, steps=sample_steps, guidance=guidance, seed=seed,
                                progress=False, batch_size=50)
        table[name] = accuracy(prompts, read(images, reader))
        if output_dir:
            from edit.grid import save_grid
            os.makedirs(output_dir, exist_ok=True)
            save_grid(images[:40], os.path.join(output_dir, grid_name(name)), columns=10, padding=4,
                      scale=4)
    print(format_table(table, eval_samples, sample_steps, guidance))
    return table


def grid_name(prompt_set):
    """The file name of a prompt set's sample grid: "single, placed" -> single_placed.png."""
    return prompt_set.replace(", ", "_").replace(" ", "_") + ".png"


def format_table(table, eval_samples, sample_steps, guidance):
    lines = [f"quality bar ({eval_samples} samples per set, {sample_steps} DDIM steps, guidance {guidance})",
             f"{'prompt set':<16} {'all right':>9} {'bar':>5}  per attribute"]
    for name, acc in table.items():
        bar = f"{BAR[name]:.0%}" if name in BAR else "-"
        ok = "" if name not in BAR else ("  ok" if acc["all"] >= BAR[name] else "  BELOW BAR")
        parts = ", ".join(f"{k} {v:.0%}" for k, v in acc.items() if k != "all")
        lines.append(f"{name:<16} {acc['all']:>9.0%} {bar:>5}  {parts}{ok}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.toy.reader", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("--model", default=DEFAULT_MODEL, help="checkpoint: single file or diffusers folder")
    a("--tokenizer", help="tokenizer folder; None: the model's own, beside or in it")
    a("--eval-samples", type=int, default=100, help="samples (and prompts) per prompt set")
    a("--sample-steps", type=int, default=25, help="DDIM steps per sample")
    a("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    a("--seed", type=int, default=0, help="seeds the random prompt sets and the samples")
    a("--output-dir", help="folder for each prompt set's sample grid (its first 40); None: no grids")
    a("--train-reader", action="store_true",
      help=f"instead: train the image reader on renders and save it to {READER_PATH}")
    a("--overwrite", action="store_true",
      help="replace grids already in --output-dir, or with --train-reader the reader's weights "
           "(without it, the command refuses to write over them)")
    return parser


def check_args(args):
    """Bad values -> ValueError with a one-line message, before anything is loaded or trained."""
    if args.train_reader:
        check_output_file(READER_PATH, args.overwrite, "--train-reader",
                          way_out="replace it with --overwrite")
        return
    check_range("--eval-samples", args.eval_samples, 1)
    check_range("--sample-steps", args.sample_steps, 1, 999)    # DDIM over 1000 training steps
    check_range("--guidance", args.guidance, 0)
    check_range("--seed", args.seed, 0, 2**64 - 1)   # numpy's and torch's seeds, both
    if args.output_dir:
        check_output_dir(args.output_dir, [grid_name(name) for name in prompt_sets(1)], args.overwrite)


def load_toy_model(args):
    """The model to measure, or CheckpointError / ValueError (one line) when the reader cannot
    read what it makes: it reads the toy world's 32x32 images only."""
    from ldm.checkpoint import load
    model = load(args.model, tokenizer_dir=args.tokenizer)
    if model.image_size != world.SIZE:
        raise ValueError(f"--model {args.model} makes {model.image_size}x{model.image_size} images; "
                         f"the reader reads the toy world's {world.SIZE}x{world.SIZE}")
    return model


def main(argv=None):
    from ldm.checkpoint import CheckpointError
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        check_args(args)
    if args.train_reader:
        t0 = time.time()
        reader = train_reader()
        x, y = reader_data(2000, seed=99)
        print(f"reader trained in {time.time() - t0:.0f} s; on 2000 held-out clean renders:",
              reader_accuracy(reader, x, y))
        return
    try:
        model = load_toy_model(args)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    quality_bar(model, args.eval_samples, args.sample_steps, args.guidance, args.seed, args.output_dir)


@torch.no_grad()
def reader_accuracy(reader, x, y):
    """Share of labelled slots read right, per head, on images x with labels y."""
    out = {}
    for k, (name, logits) in enumerate(zip(("shape", "color", "pattern"), reader(x))):
        mask = y[..., k] >= 0
        out[name] = round(float((logits.argmax(-1)[mask] == y[..., k][mask]).float().mean()), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
