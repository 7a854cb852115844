"""The toy world: deterministic for a seed, captions say what is drawn (read back by the
evaluator's reader, an independent model trained on other renders), subjects as specified."""
import numpy as np

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


def test_captions_follow_the_grammar():
    _, scenes = world.dataset(300, seed=5)
    words = set(world.vocabulary())
    for s in scenes:
        assert set(s.caption.split()) <= words
        assert len(s.caption.split(" and ")) == len(s.objects)
        assert all(o.subject is None for o in s.objects)        # pretraining never shows a subject
        for o in s.objects:
            assert o.shape in s.caption
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert any("on the left and" in s.caption for s in scenes)
    assert any("on the right and" in s.caption for s in scenes)


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
