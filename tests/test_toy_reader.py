"""The evaluator: prompt parsing and matching against hand-written readings, and the image
reader against renders with known labels (seeds it was not trained on)."""
import numpy as np
import pytest

from train.toy import world
from train.toy.reader import (accuracy, build_parser, check_args, load_reader, parse, prior_drift,
                              prompt_sets, read, reader_accuracy, reader_data, subject_fidelity)


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
    assert prior_drift(read(plain), subject.name) <= 0.05
    assert prior_drift(read(other), subject.name) <= 0.05          # the other star is not it


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
