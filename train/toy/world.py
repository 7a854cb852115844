"""The toy world: seeded, captioned 32x32 RGB scenes of simple shapes.

The bundled tiny base model (weights/toy-sd.safetensors) is pretrained on this world, and the
method (train.single, train.multi) is demonstrated on its *subjects*: patterned instances of
known classes that never occur in pretraining, like the 3-5 photos of a dog in DreamBooth.

Scene  = a plain background + one object (left / center / right) or two (left and right).
Object = shape in {circle, square, triangle, star, heart}, filled with a named color, or, for a
         subject, with its pattern (stripes, checkerboard, dots) in two colors.
Caption grammar (pretraining):
    one object : "a [COLOR] SHAPE [on the left | on the right | in the center]"
    two objects: "a [COLOR] SHAPE on the left and a [COLOR] SHAPE on the right" (either order),
                 or, 30% of the time, unplaced: "a [COLOR] SHAPE (and | beside | next to)
                 a [COLOR] SHAPE" (either order)
Subject prompts replace the color by the subject's reserved token: "a sks star on the left".
Subjects are trained with placed phrasings only (train.single, train.multi), so an unplaced
pair ("a sks star beside a zwx star") is a phrasing the base model knows and the subjects'
training never used: the held-out prompt of train.multi's measurement.

Rendering: polygons drawn at 4x (128x128) with PIL and box-downsampled to 32x32, which
anti-aliases the edges. Scene i of a dataset depends only on (seed, i), so any part of a
dataset can be re-rendered exactly.
"""
import argparse
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from edit.cli import check_output_file, check_range, usage_errors

SIZE = 32
SCALE = 4  # supersampling factor for anti-aliasing

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "purple": (145, 45, 195),
}
# plain, unnamed backgrounds: neutral tones that every object color stands out from
BACKGROUNDS = {
    "white": (240, 240, 240),
    "light gray": (185, 185, 185),
    "dark gray": (75, 75, 75),
    "black": (20, 20, 20),
}
POSITIONS = ("left", "center", "right")
POSITION_X = {"left": 9.0, "center": 16.0, "right": 23.0}  # slot centers in pixels
POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
PAIR_WORDS = ("and", "beside", "next to")   # what joins an unplaced pair: "a red star beside a ..."
P_UNPLACED_PAIR = 0.3     # share of two-object captions that name no side
# rare tokens never used in pretraining; subjects are referred to by them ("a sks star")
RESERVED_TOKENS = ("sks", "zwx", "qvr", "xjy", "vkq")
# words that prompts of the other commands use, kept as single tokens (not pretrained)
EXTRA_WORDS = ("photo", "of", "picture", "beside", "next", "to", "sitting", "with")


@dataclass(frozen=True)
class Subject:
    """A patterned instance of a known class, e.g. the sks star (orange and purple stripes)."""
    name: str
    token: str                  # reserved token that prompts use: "a sks star"
    shape: str                  # class word
    pattern: str                # "stripes" | "checker" | "dots"
    colors: tuple[str, str]     # pattern colors (keys of COLORS, or "white")


SUBJECTS = {s.name: s for s in (
    Subject("striped_star", "sks", "star", "stripes", ("orange", "purple")),
    Subject("checker_star", "zwx", "star", "checker", ("blue", "yellow")),
    Subject("checker_circle", "qvr", "circle", "checker", ("red", "white")),
    Subject("dotted_heart", "xjy", "heart", "dots", ("green", "white")),
)}
# what the reader reads per object: plain, a subject, or "other", a two-color pattern that is
# no subject's (a subject's pattern in another subject's colors: what mixing two subjects makes)
PATTERNS = ("plain",) + tuple(SUBJECTS) + ("other",)


def rgb(name):
    return (255, 255, 255) if name == "white" else COLORS[name]


@dataclass(frozen=True)
class Object:
    shape: str
    position: str               # "left" | "center" | "right"
    x: float                    # center, pixels in the 32x32 frame
    y: float
    size: float                 # bounding diameter, pixels
    color: str | None = None    # named fill; None for a subject
    subject: str | None = None  # key of SUBJECTS
    texture: Subject | None = None  # an anonymous pattern (the VAE's and the reader's data)

    @property
    def pattern(self):
        return self.subject or ("other" if self.texture else "plain")

    def phrase(self, with_color=True):
        """'a red star', 'a star', 'a sks star'."""
        if self.subject:
            return f"a {SUBJECTS[self.subject].token} {self.shape}"
        if not with_color:
            return f"a {self.shape}"
        return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Object, ...]   # one, or two ordered (left, right)
    background: str
    caption: str


# ---------------------------------------------------------------- geometry

def _star(n=5, inner=0.45):
    return [(math.sin(math.pi * k / n) * (1 if k % 2 == 0 else inner),
             -math.cos(math.pi * k / n) * (1 if k % 2 == 0 else inner)) for k in range(2 * n)]


def _heart(n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x, y = x / 17.0, (y + 2.5) / 15.0   # fit the unit box, centered
    return list(zip(x.tolist(), y.tolist()))


# outlines in unit coordinates (half-size 1, y down); the circle is drawn as an ellipse
OUTLINES = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "heart": _heart(),
}


def _mask(obj):
    """Object silhouette at 4x: L image (SIZE*SCALE)^2, 255 inside."""
    mask = Image.new("L", (SIZE * SCALE, SIZE * SCALE), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj.x * SCALE, obj.y * SCALE, obj.size * SCALE / 2
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + r * u, cy + r * v) for u, v in OUTLINES[obj.shape]], fill=255)
    return mask


def _fill(obj):
    """Object fill at 4x: RGB image, a flat color or the subject's pattern."""
    n = SIZE * SCALE
    subject = SUBJECTS[obj.subject] if obj.subject else obj.texture
    if subject is None:
        return Image.new("RGB", (n, n), rgb(obj.color))
    a, b = (np.array(rgb(c), dtype=np.uint8) for c in subject.colors)
    # pattern in object coordinates, so it moves and scales with the object
    u = (np.arange(n)[None, :] / SCALE - obj.x) / obj.size
    v = (np.arange(n)[:, None] / SCALE - obj.y) / obj.size
    if subject.pattern == "stripes":    # horizontal bands, 4 per object height
        first = np.floor(v * 4 + 0.5).astype(int) % 2 == 0
        first = np.broadcast_to(first, (n, n))
    elif subject.pattern == "checker":  # 3.5 cells across
        first = (np.floor(u * 3.5 + 0.5) + np.floor(v * 3.5 + 0.5)).astype(int) % 2 == 0
    elif subject.pattern == "dots":     # light dots on a dark field
        du, dv = (u * 3.2) % 1 - 0.5, (v * 3.2) % 1 - 0.5
        first = du ** 2 + dv ** 2 > 0.09
    else:
        raise ValueError(f"unknown pattern {subject.pattern!r}")
    return Image.fromarray(np.where(first[..., None], a, b))


def render(scene):
    """Scene -> uint8 array (SIZE, SIZE, 3)."""
    n = SIZE * SCALE
    image = Image.new("RGB", (n, n), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        image = Image.composite(_fill(obj), image, _mask(obj))
    return np.asarray(image.resize((SIZE, SIZE), Image.BOX))


# ---------------------------------------------------------------- sampling scenes

def _object(rng, position, two, color=None, shape=None, subject=None):
    # sizes and jitter keep two objects apart and inside the frame
    size = rng.uniform(10, 12.5) if two else rng.uniform(11, 16)
    return Object(shape=shape or SHAPES[rng.integers(len(SHAPES))], position=position,
                  x=POSITION_X[position] + rng.uniform(-1, 1), y=16 + rng.uniform(-3, 3),
                  size=size, color=None if subject else (color or _pick(rng, COLORS)),
                  subject=subject)


def _pick(rng, names):
    names = list(names)
    return names[rng.integers(len(names))]


def _caption(rng, objects, p_no_color):
    if len(objects) == 1:
        obj = objects[0]
        text = obj.phrase(with_color=rng.random() >= p_no_color)
        # an unplaced object: the caption says nothing about where it is
        return text if rng.random() < 0.4 else f"{text} {POSITION_PHRASE[obj.position]}"
    phrases = [o.phrase(with_color=rng.random() >= p_no_color / 2) for o in objects]
    if rng.random() < P_UNPLACED_PAIR:
        if rng.random() < 0.5:
            phrases.reverse()
        return f" {_pick(rng, PAIR_WORDS)} ".join(phrases)
    parts = [f"{text} {POSITION_PHRASE[o.position]}" for text, o in zip(phrases, objects)]
    if rng.random() < 0.5:
        parts.reverse()
    return " and ".join(parts)


def sample_scene(rng, p_two=0.5, p_no_color=0.15, subjects=()):
    """A random pretraining scene; with `subjects` (names), objects may also be those subjects
    (only for the evaluator's training data: pretraining never sees a subject)."""
    two = rng.random() < p_two
    positions = ("left", "right") if two else (_pick(rng, POSITIONS),)
    objects = []
    for position in positions:
        if subjects and rng.random() < 0.4:
            subject = SUBJECTS[_pick(rng, subjects)]
            objects.append(_object(rng, position, two, shape=subject.shape, subject=subject.name))
        else:
            objects.append(_object(rng, position, two))
    objects = tuple(objects)
    return Scene(objects, _pick(rng, BACKGROUNDS), _caption(rng, objects, p_no_color))


def scene_rng(seed, index):
    """The generator of scene `index` of the dataset `seed`."""
    return np.random.default_rng([seed, index])


def dataset(n, seed, start=0, **kwargs):
    """Scenes start..start+n-1 of dataset `seed`: (images uint8 (n, 32, 32, 3), scenes)."""
    scenes = [sample_scene(scene_rng(seed, i), **kwargs) for i in range(start, start + n)]
    return np.stack([render(s) for s in scenes]), scenes


def texture_scene(rng):
    """A scene whose objects may carry random two-color patterns (now and then a subject's): the
    VAE, a generic image codec like SD's, learns to encode patterns; the diffusion model never
    sees them."""
    scene = sample_scene(rng)
    objects = []
    for obj in scene.objects:
        if rng.random() < 0.6:
            colors = tuple(rng.choice(list(COLORS) + ["white"], size=2, replace=False).tolist())
            pattern = _pick(rng, ("stripes", "checker", "dots"))
            obj = Object(obj.shape, obj.position, obj.x, obj.y, obj.size, obj.color,
                         texture=Subject("texture", "", obj.shape, pattern, colors))
        objects.append(obj)
    return Scene(tuple(objects), scene.background, scene.caption)


def foreign_texture(rng, shape):
    """A two-color pattern that is no subject's, for the reader to call "other": half of the
    time a subject's pattern in another subject's colors (the sks stripes in zwx's blue and
    yellow: what a model mixing the two draws), else any pattern in any two colors."""
    subjects = list(SUBJECTS.values())
    while True:
        if rng.random() < 0.5:
            a, b = rng.choice(len(subjects), 2, replace=False)
            pattern, colors = subjects[a].pattern, subjects[b].colors
        else:
            pattern = _pick(rng, ("stripes", "checker", "dots"))
            colors = tuple(rng.choice(list(COLORS) + ["white"], size=2, replace=False).tolist())
        if not any(s.pattern == pattern and set(s.colors) == set(colors) for s in subjects):
            return Subject("other", "", shape, pattern, colors)


def texture_dataset(n, seed, p_cut_mix=0.25):
    """The VAE's training images: uint8 (n, 32, 32, 3). A share p_cut_mix of them are two
    scenes' central halves side by side (as train.multi's Cut-Mix makes them): the VAE, like
    SD's, must encode any image, and one trained on plain backgrounds only tints the halves of
    an image whose two halves have different backgrounds."""
    images = np.stack([render(texture_scene(scene_rng(seed, i))) for i in range(n)])
    rng = np.random.default_rng([seed, n])
    quarter = SIZE // 4
    for i in np.flatnonzero(rng.random(n) < p_cut_mix):
        other = images[rng.integers(n)]
        images[i] = np.concatenate([images[i][:, quarter:SIZE - quarter],
                                    other[:, quarter:SIZE - quarter]], axis=1)
    return images


def subject_scene(name, rng, position=None, other=None):
    """One varied render of a subject (position, size, background vary); with `other` (an
    Object or a subject name) a two-object scene, the subject on `position` ("left"/"right")."""
    subject = SUBJECTS[name]
    if other is None:
        position = position or _pick(rng, POSITIONS)
        obj = _object(rng, position, False, shape=subject.shape, subject=name)
        caption = f"{obj.phrase()} {POSITION_PHRASE[position]}"
        return Scene((obj,), _pick(rng, BACKGROUNDS), caption)
    position = position or _pick(rng, ("left", "right"))
    other_position = "right" if position == "left" else "left"
    obj = _object(rng, position, True, shape=subject.shape, subject=name)
    if isinstance(other, str):
        second = _object(rng, other_position, True, shape=SUBJECTS[other].shape, subject=other)
    else:
        second = _object(rng, other_position, True, color=other.color, shape=other.shape)
    objects = tuple(sorted((obj, second), key=lambda o: o.x))
    caption = " and ".join(f"{o.phrase()} {POSITION_PHRASE[o.position]}" for o in (obj, second))
    return Scene(objects, _pick(rng, BACKGROUNDS), caption)


def subject_images(name, n=5, seed=0, positions=POSITIONS):
    """The subject's 'photos': n varied renders and their captions, like DreamBooth's 3-5; the
    subject stands at `positions` in turn."""
    rng = np.random.default_rng([seed, 7919, list(SUBJECTS).index(name)])
    scenes = [subject_scene(name, rng, position=positions[i % len(positions)]) for i in range(n)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def vocabulary():
    """Every word a toy prompt uses, each of which the tokenizer keeps as one token."""
    words = ["a", "an", "and", "on", "the", "in", *POSITIONS, *SHAPES, "white"]
    for name in list(COLORS) + list(BACKGROUNDS):
        words += name.split()
    words += [*RESERVED_TOKENS, *EXTRA_WORDS]
    return sorted(set(words))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.toy.world", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a preview grid of the toy world: 32 pretraining scenes (their "
                    "captions printed), then 8 renders of each subject.")
    parser.add_argument("--output", default="toyworld.png", help="the grid, a PNG file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (without it, the command refuses to)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed of the scenes")
    return parser


def main(argv=None):
    from edit.grid import save_grid
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        check_range("--seed", args.seed, 0)     # numpy seeds only with non-negative integers
        check_output_file(args.output, args.overwrite, "--output", suffix=".png")
    images, scenes = dataset(32, args.seed)
    subject_renders = np.concatenate([subject_images(name, 8)[0] for name in SUBJECTS])
    save_grid(np.concatenate([images, subject_renders]), args.output, columns=8, padding=4, scale=4)
    for s in scenes:
        print(s.caption)


if __name__ == "__main__":
    main()
