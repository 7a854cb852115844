"""The example subject as the trainers get it: the very images and prompts train.single has
always trained on (a changed render would change every trained result), and what `measure`
counts, on images whose content is known."""
import hashlib

import numpy as np
import torch
from PIL import Image

from train.toy import subjects, world

# sha256 of the 5 instance renders (uint8 (5, 32, 32, 3)) that train.single trained on before
# the toy world became a package: a renderer or seed change shows up here first
INSTANCE_PIXELS_SHA256 = "18675d940c515c35b9383524e4f5f8443f7ee09c2483d6e47a92f0cb4739ad5a"


def test_the_example():
    assert subjects.EXAMPLE == subjects.Example("striped_star", "a sks star", "a star")
    subject = world.SUBJECTS[subjects.EXAMPLE.subject]
    assert subjects.EXAMPLE.instance_prompt == f"a {subject.token} {subject.shape}"


def test_instance_images_are_the_renders_train_single_used(tmp_path):
    folder = str(tmp_path / "instance-images")
    assert subjects.write_instance_images("striped_star", folder) == folder
    names = [f"striped_star-{i}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.joinpath("instance-images").iterdir()) == names
    pixels = np.stack([np.asarray(Image.open(tmp_path / "instance-images" / n)) for n in names])
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.uint8
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == INSTANCE_PIXELS_SHA256   # PNG is lossless


def test_measure_counts_what_the_reader_sees():
    """Instance prompts get renders of the subject; class prompts get plain stars but for one
    subject among 8 and, for the trained model, two stars in the subject's orange where the base
    model drew one: fidelity 1, drift 1/8 (the pattern) + 1/8 (the rise in its colors); prompts
    placed in turn, every set seeded alike. With the base model drawing more of its colors than
    the trained one, only the pattern counts."""
    rng = np.random.default_rng(0)
    asked = []

    def star(color):
        return world.Scene((world.Object("star", "center", 16, 16, 14, color=color),), "white", "")

    class FakeModel:  # hands out renders, as floats in [0, 1] like StableDiffusion.generate
        def __init__(self, orange, striped=True):
            self.orange, self.striped = orange, striped

        def generate(self, prompts, steps, guidance, seed, progress, batch_size):
            asked.append((list(prompts), steps, guidance, seed))
            return torch.from_numpy(self.render(prompts)).permute(0, 3, 1, 2).float() / 255

        def render(self, prompts):
            if "sks" in prompts[0]:
                scenes = [world.subject_scene("striped_star", rng) for _ in prompts]
            else:
                scenes = [world.subject_scene("striped_star", rng) if i == 3 and self.striped else
                          star("orange" if i in (5, 6)[:self.orange] else "red") for i in range(len(prompts))]
            return np.stack([world.render(s) for s in scenes])

    base = subjects.placed_readings(FakeModel(orange=1, striped=False), "a star", 8, sample_steps=7,
                                   guidance=3.0, seed=5)
    fidelity, drift = subjects.measure(FakeModel(orange=2), "striped_star", "a sks star", "a star", samples=8,
                                       sample_steps=7, guidance=3.0, seed=5, base_readings=base)
    assert (fidelity, drift) == (1.0, 2 / 8)
    assert asked[1][0] == ["a sks star", "a sks star on the left", "a sks star in the center",
                           "a sks star on the right"] * 2
    assert asked[0][0] == asked[2][0] and asked[0][0][:4] == ["a star", "a star on the left",
                                                              "a star in the center", "a star on the right"]
    assert [a[1:] for a in asked] == [(7, 3.0, 5)] * 3
    more_orange = subjects.placed_readings(FakeModel(orange=2), "a star", 8, 7, 3.0, 5)
    _, drift = subjects.measure(FakeModel(orange=1), "striped_star", "a sks star", "a star", 8, 7, 3.0, 5,
                                base_readings=more_orange)
    assert drift == 1 / 8                                                   # the stripes alone


def test_pair_prompts_cycle_every_pair_in_both_orders_and_every_unplaced_phrasing():
    prompts = subjects.pair_prompts(["a sks star", "a zwx star", "a qvr circle"], 18)
    assert prompts[:6] == ["a sks star and a zwx star", "a sks star and a qvr circle",
                           "a zwx star and a sks star", "a zwx star and a qvr circle",
                           "a qvr circle and a sks star", "a qvr circle and a zwx star"]
    assert prompts[6] == "a sks star beside a zwx star" and prompts[12] == "a sks star next to a zwx star"
    assert not any("left" in p or "right" in p for p in prompts)    # never a trained phrasing


def seen(*patterns):
    return [dict(position=p, shape="star", color="red" if pattern == "plain" else None, pattern=pattern)
            for p, pattern in zip(("left", "right"), patterns)]


def test_what_counts_as_mixing():
    asked = ["striped_star", "checker_star"]
    assert not subjects.mixed(seen("striped_star", "checker_star"), asked)
    assert not subjects.mixed(seen("checker_star", "plain"), asked)      # one missing: not right, not mixed
    assert subjects.mixed(seen("striped_star", "striped_star"), asked)    # one subject twice
    assert subjects.mixed(seen("other", "checker_star"), asked)           # a hybrid pattern
    assert subjects.mixed(seen("striped_star", "checker_circle"), asked)  # a subject not asked for
