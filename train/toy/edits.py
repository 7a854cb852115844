"""The toy world's single-image edits, as edit.cosine and its measurement need them.

edit.cosine knows nothing of the toy world. With no image of the user's, it takes the example
from here and treats it like a user's photo:

    EXAMPLE                          "a red star on the left" -> a color, a shape and a position edit
    write_example(path)              its scene as a PNG, read back like anyone's image
    random_edits(n, seed)            n random scenes, each with a color, a shape and a position edit
    judge(source, edit, images, background)
                                     per image: did the edit take, was the rest kept, and the background

Ground truth: a toy prompt names every attribute of its one object ("a red star on the left"),
so an edit prompt differs from the source prompt in exactly one attribute, and the image reader
(reader.py) tells whether the edited image shows it and kept the others. The reader does not
read the background, which the prompts never name; `backgrounds` reads it from the corners,
where no object reaches.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from train.toy import reader, world

ATTRIBUTES = ("color", "shape", "position")   # what an edit changes, one at a time
CORNER = 3   # pixels: the corners' squares show the background (no object reached one in 3000 random scenes)


@dataclass(frozen=True)
class Example:
    scene: world.Scene
    edits: tuple[str, ...]


def _one_object(shape, color, position, background, x=None, y=16.0, size=14.0):
    obj = world.Object(shape=shape, position=position, x=world.POSITION_X[position] if x is None else x,
                       y=y, size=size, color=color)
    return world.Scene((obj,), background, f"{obj.phrase()} {world.POSITION_PHRASE[position]}")


# the default of edit.cosine: one edit of each kind
EXAMPLE = Example(_one_object("star", "red", "left", "light gray"),
                  ("a blue star on the left", "a red heart on the left", "a red star on the right"))


def write_example(path) -> str:
    """The example scene as a 32x32 PNG at `path`; returns the path."""
    Image.fromarray(world.render(EXAMPLE.scene)).save(path)
    return str(path)


def edited(scene: world.Scene, kind: str, value: str) -> str:
    """The prompt of `scene` (one object) with attribute `kind` set to `value`."""
    obj = scene.objects[0]
    attributes = {"color": obj.color, "shape": obj.shape, "position": obj.position, kind: value}
    return _one_object(attributes["shape"], attributes["color"], attributes["position"],
                       scene.background).caption


def random_edits(n: int, seed: int) -> list[tuple[world.Scene, dict[str, str]]]:
    """n random one-object scenes, each with one edit prompt per kind ({kind: prompt}): the
    scene's caption names color, shape and position, and the new value is drawn from the others."""
    choices = {"color": tuple(world.COLORS), "shape": world.SHAPES, "position": world.POSITIONS}
    out = []
    for i in range(n):
        rng = world.scene_rng(seed, i)
        sampled = world.sample_scene(rng, p_two=0)
        obj = sampled.objects[0]
        scene = _one_object(obj.shape, obj.color, obj.position, sampled.background, obj.x, obj.y, obj.size)
        prompts = {}
        for kind in ATTRIBUTES:
            others = [v for v in choices[kind] if v != getattr(obj, kind)]
            prompts[kind] = edited(scene, kind, others[rng.integers(len(others))])
        out.append((scene, prompts))
    return out


def backgrounds(images) -> list[str]:
    """The background (a key of world.BACKGROUNDS) of each image: the nearest to the mean color
    of its four CORNER x CORNER corners. images: (n, 3, 32, 32) in [0, 1] or uint8 (n, 32, 32, 3)."""
    pixels = np.asarray(images.detach().cpu().permute(0, 2, 3, 1) * 255) if hasattr(images, "detach") \
        else np.asarray(images, dtype=np.float64)
    c = CORNER
    corners = np.concatenate([pixels[:, :c, :c], pixels[:, :c, -c:], pixels[:, -c:, :c], pixels[:, -c:, -c:]], 1)
    mean = corners.reshape(len(pixels), -1, 3).mean(1)
    names = list(world.BACKGROUNDS)
    palette = np.array([world.BACKGROUNDS[name] for name in names], dtype=np.float64)
    nearest = ((mean[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    return [names[i] for i in nearest]


def judge(source_prompt: str, edit_prompt: str, images, background_before: str, image_reader=None) -> list[dict]:
    """Edited images (see `backgrounds`), one verdict each, as the reader sees them:
        success     the one object drawn has the attribute(s) the edit changed at their new values
        preserved   it has every other attribute of the source (a color edit keeps shape and place)
        background  the background is the source image's
    """
    before, wanted = reader.parse(source_prompt)[0], reader.parse(edit_prompt)[0]
    changed = [a for a in ATTRIBUTES if before[a] != wanted[a]]
    verdicts = []
    for reading, background in zip(reader.read(images, image_reader), backgrounds(images)):
        seen = reading[0] if len(reading) == 1 else None
        verdicts.append({"success": seen is not None and all(seen[a] == wanted[a] for a in changed),
                         "preserved": seen is not None and all(seen[a] == wanted[a] for a in ATTRIBUTES
                                                               if a not in changed),
                         "background": background == background_before})
    return verdicts
