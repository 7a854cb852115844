"""The evaluator: prompt parsing and matching against hand-written readings, and the image
reader against renders with known labels (seeds it was not trained on)."""
import numpy as np
import pytest

from train.toy import world
from train.toy.reader import (accuracy, build_parser, check_args, color_rise, in_colors, load_reader, parse,
                              prior_drift, prompt_sets, read, reader_accuracy, reader_data, subject_fidelity)


def obj(position, shape, color=None, pattern="plain"):
    return dict(position=position, shape=shape, color=color, pattern=pattern)


def test_parse():
    assert parse("a red star") == [dict(position=None, shape="star", color="red", pattern="plain")]
    assert parse("a sks star on the left and an orange circle on the right") == [
        dict(position="left", shape="star", color=None, pattern="striped_star"),
        dict(position="right", shape="circle", color="orange", pattern="plain")]


def test_accuracy_on_hand_written_readings():
    prompts = ["a red star", "a red star", "a red star", "a blue circle on the right",
               "a red star on the left and a blue heart on the right"] * 2
    readings = [[obj("center", "star", "red")],
                [obj("left", "star", "blue")],                               # wrong color
                [obj("left", "star", "red"), obj("right", "star", "red")],    # two objects
                [obj("center", "circle", "blue")],                           # wrong slot
                [obj("left", "star", "red"), obj("right", "heart", "blue")],
                ] + [[]] * 5                                                  # nothing drawn
    acc = accuracy(prompts, readings)
    assert acc["all"] == 2 / 10
    assert acc["shape"] == 3 / 8 and acc["color"] == 2 / 8 and acc["position"] == 0
    assert acc["left shape"] == 1 / 2 and acc["right color"] == 1 / 2 and acc["objects"] == 1 / 2


def test_reader_on_clean_renders():
    x, y = reader_data(600, seed=777)
    acc = reader_accuracy(load_reader(), x, y)
    assert min(acc.values()) >= 0.95, acc


def test_fidelity_and_drift_on_renders():
    rng = np.random.default_rng(1)
    subject = world.SUBJECTS["striped_star"]
    shown = np.stack([world.render(world.subject_scene("striped_star", rng)) for _ in range(60)])
    plain = np.stack([world.render(world.sample_scene(rng, p_two=0.0)) for _ in range(60)])
    other = np.stack([world.render(world.subject_scene("checker_star", rng)) for _ in range(60)])
    assert subject_fidelity(read(shown), subject.name) >= 0.95
    assert prior_drift(read(plain), subject.name, read(plain)) <= 0.05
    assert prior_drift(read(other), subject.name, read(plain)) <= 0.05    # the other star is not it


def test_drift_counts_the_subjects_pattern_and_the_rise_in_its_colors():
    """Readings by hand: the sks star's colors are orange and purple. A patterned image is never
    a color image; only the rise over the base model's share counts, never a fall."""
    def plain(color):
        return [{"position": "center", "shape": "star", "pattern": "plain", "color": color}]
    striped = [{"position": "center", "shape": "star", "pattern": "striped_star", "color": None}]
    base = [plain("orange"), plain("red"), plain("blue"), plain("green")]
    now = [plain("orange"), plain("purple"), striped, plain("green")]
    colors = world.SUBJECTS["striped_star"].colors
    assert (in_colors(base, colors), in_colors(now, colors)) == (0.25, 0.5)
    assert color_rise(now, base, colors) == 0.25 and color_rise(base, now, colors) == 0.0
    assert prior_drift(now, "striped_star", base) == 0.25 + 0.25      # the stripes + the colors' rise
    assert prior_drift(base, "striped_star", now) == 0.0


def test_hybrid_patterns_read_as_other():
    """A subject's pattern in another subject's colors (what mixing two subjects draws), on
    renders of a seed the reader was not trained on, reads "other", not as either subject."""
    rng = np.random.default_rng(5)
    stars = []
    for pattern, colors in (("stripes", ("blue", "yellow")), ("checker", ("orange", "purple"))):
        for _ in range(30):
            scene = world.sample_scene(rng, p_two=0.0)
            o = scene.objects[0]
            texture = world.Subject("other", "", "star", pattern, colors)
            hybrid = world.Object("star", o.position, o.x, o.y, o.size, texture=texture)
            stars.append(world.render(world.Scene((hybrid,), scene.background, "")))
    patterns = [r[0]["pattern"] if len(r) == 1 else None for r in read(np.stack(stars))]
    assert patterns.count("other") / len(patterns) >= 0.9, patterns


def test_unplaced_pairs_parse_and_match_in_either_order():
    for word in world.PAIR_WORDS:
        wanted = parse(f"a sks star {word} a red heart")
        assert wanted == [dict(position=None, shape="star", color=None, pattern="striped_star"),
                          dict(position=None, shape="heart", color="red", pattern="plain")]
    prompts = ["a sks star beside a red heart"] * 3
    readings = [[obj("left", "heart", "red"), obj("right", "star", None, "striped_star")],
                [obj("left", "star", None, "striped_star"), obj("right", "heart", "red")],
                [obj("left", "star", None, "checker_star"), obj("right", "heart", "red")]]
    acc = accuracy(prompts, readings)
    assert acc["objects"] == acc["all"] == 2 / 3 and "left shape" not in acc


def test_prompt_sets():
    sets = prompt_sets(100)
    assert all(len(p) == 100 for p in sets.values())
    words = set(world.vocabulary())
    assert all(set(p.split()) <= words for ps in sets.values() for p in ps)
    assert len(set(sets["single"])) == len(world.SHAPES) * len(world.COLORS)


def test_grids_of_an_earlier_measurement_are_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "two_objects.png").write_bytes(b"earlier")
    args = build_parser().parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"\(two_objects.png\); replace them with --overwrite"):
        check_args(args)
    check_args(build_parser().parse_args(["--output-dir", str(tmp_path), "--overwrite"]))
    check_args(build_parser().parse_args(["--output-dir", str(tmp_path / "new")]))
