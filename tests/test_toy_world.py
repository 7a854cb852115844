"""The toy world: deterministic for a seed, objects drawn where and in the color a scene says
(measured on the pixels, with no model involved), captions say what is drawn (read back by the
image reader, an independent model trained on other renders), subjects as specified."""
import re

import numpy as np
import pytest

from train.toy import world
from train.toy.reader import accuracy, read


def test_deterministic_for_a_seed():
    a, scenes_a = world.dataset(24, seed=3)
    b, scenes_b = world.dataset(24, seed=3)
    c, _ = world.dataset(24, seed=4)
    assert a.shape == (24, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and [s.caption for s in scenes_a] == [s.caption for s in scenes_b]
    assert not np.array_equal(a, c)
    # scene i depends on (seed, i) only: a slice re-renders exactly
    d, _ = world.dataset(4, seed=3, start=10)
    assert np.array_equal(a[10:14], d)
    s1, c1 = world.subject_images("striped_star", 5, seed=0)
    s2, c2 = world.subject_images("striped_star", 5, seed=0)
    assert np.array_equal(s1, s2) and c1 == c2


def draw(background, *objects):
    """Render a scene of the given objects: uint8 (32, 32, 3) -> int array, and the per-pixel
    distance from the background color (summed over channels)."""
    image = world.render(world.Scene(objects, background, "")).astype(int)
    return image, np.abs(image - world.BACKGROUNDS[background]).sum(-1)


def plain(shape, position, color, size=12.0):
    return world.Object(shape, position, world.POSITION_X[position], 16.0, size, color=color)


def core_color(image, distance, columns=slice(None)):
    """Mean color of an object's inside: pixels at least 80% as far from the background as the
    farthest one (edge pixels are anti-aliased blends with the background)."""
    image, distance = image[:, columns], distance[:, columns]
    return image[distance >= 0.8 * distance.max()].mean(0)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_one_object_is_drawn_in_its_slot_and_color(shape):
    """Every position, color and background: the object's pixels (far from the background)
    center on POSITION_X of its slot and stay within its size; its inside has its color."""
    for position in world.POSITIONS:
        for color in world.COLORS:
            for background in world.BACKGROUNDS:
                image, distance = draw(background, plain(shape, position, color))
                rows, columns = np.nonzero(distance > 60)
                where = f"{color} {shape} {position} on {background}"
                assert abs(columns.mean() + 0.5 - world.POSITION_X[position]) < 0.5, where
                third = {"left": 0, "center": 1, "right": 2}[position]   # of the 32 columns
                assert third * 32 / 3 <= columns.mean() < (third + 1) * 32 / 3, where
                assert np.abs(columns + 0.5 - world.POSITION_X[position]).max() <= 6 + 1, where
                assert np.abs(core_color(image, distance) - world.COLORS[color]).max() < 8, where


def test_sampled_scenes_are_drawn_as_sampled():
    """The pretraining sampler's one-object scenes (jittered, sized at random): the object's
    pixels center on its x, and its inside has its color."""
    _, scenes = world.dataset(60, seed=11, p_two=0.0)
    for scene in scenes:
        obj = scene.objects[0]
        image, distance = draw(scene.background, obj)
        columns = np.nonzero(distance > 60)[1]
        assert abs(columns.mean() + 0.5 - obj.x) < 0.5, scene
        assert np.abs(core_color(image, distance) - world.COLORS[obj.color]).max() < 8, scene


def test_two_objects_each_half_holds_its_own():
    """Left and right objects of two colors: each half of the frame shows its object's color and
    has no pixel of the other's."""
    colors = list(world.COLORS)
    for i, (left, right) in enumerate(zip(colors, colors[1:] + colors[:1])):
        shapes = world.SHAPES[i % 5], world.SHAPES[(i + 2) % 5]
        background = list(world.BACKGROUNDS)[i % 4]
        image, distance = draw(background, plain(shapes[0], "left", left, size=11.0),
                               plain(shapes[1], "right", right, size=11.0))
        for half, mine, other in ((slice(0, 16), left, right), (slice(16, 32), right, left)):
            assert np.abs(core_color(image, distance, half) - world.COLORS[mine]).max() < 8
            near_other = np.abs(image[:, half] - world.COLORS[other]).max(-1) < 30
            assert not near_other.any(), (half, mine, other)


def test_captions_follow_the_grammar():
    _, scenes = world.dataset(600, seed=5)
    words = set(world.vocabulary())
    for s in scenes:
        assert set(s.caption.split()) <= words
        assert len(re.split(" and | beside | next to ", s.caption)) == len(s.objects)
        assert all(o.subject is None for o in s.objects)        # pretraining never shows a subject
        for o in s.objects:
            assert o.shape in s.caption
        for o in s.objects:   # a caption that names a side names the right one
            named = [side for side in ("left", "right", "center") if side in s.caption]
            assert not named or o.position in named
    assert {len(s.objects) for s in scenes} == {1, 2}
    pairs = [s.caption for s in scenes if len(s.objects) == 2]
    assert any("on the left and" in c for c in pairs) and any("on the right and" in c for c in pairs)
    unplaced = [c for c in pairs if "left" not in c]
    assert abs(len(unplaced) / len(pairs) - world.P_UNPLACED_PAIR) < 0.06    # sides mostly named
    for word in world.PAIR_WORDS:
        assert any(f" {word} a" in c for c in unplaced), word


def test_subjects():
    classes = [s.shape for s in world.SUBJECTS.values()]
    assert any(classes.count(c) >= 2 for c in classes)           # two of one class: Cut-Mix-Unmix
    tokens = {s.token for s in world.SUBJECTS.values()}
    assert tokens <= set(world.RESERVED_TOKENS)
    for name, subject in world.SUBJECTS.items():
        images, captions = world.subject_images(name, 6)
        assert images.shape == (6, 32, 32, 3)
        assert all(c.startswith(f"a {subject.token} {subject.shape}") for c in captions)
        assert len({im.tobytes() for im in images}) == 6                  # varied renders
        assert len({c.split(subject.shape)[1] for c in captions}) == 3      # left, center, right
        # two colors of its pattern are both present
        for color in subject.colors:
            target = np.array(world.rgb(color))
            assert (np.abs(images.astype(int) - target).sum(-1) < 30).any()


def test_captions_match_the_drawn_scene():
    """The evaluator reads clean renders (a seed no model was trained on) as their captions say."""
    images, scenes = world.dataset(300, seed=20240)
    acc = accuracy([s.caption for s in scenes], read(images))
    assert acc["all"] >= 0.95, acc
    rng = np.random.default_rng(0)
    names = list(world.SUBJECTS)
    scenes = [world.subject_scene(names[i % len(names)], rng) for i in range(100)]
    acc = accuracy([s.caption for s in scenes], read(np.stack([world.render(s) for s in scenes])))
    assert acc["all"] >= 0.95, acc
