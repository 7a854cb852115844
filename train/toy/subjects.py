"""The toy world's subjects as the trainers need them: the example, its images, a measurement.

A trainer (train.single, ...) knows nothing of the toy world. When the user brings no subject
of their own, it takes the example from here and treats it like a user's subject:

    EXAMPLE                                  the striped star, "a sks star" / "a star"
    write_instance_images(subject, folder)   its 5 "photos" as PNG files, which the trainer then
                                             reads back like a user's photos
    placed_readings(model, prompt, ...)      what the reader sees in a prompt's images (of the
                                             base model: the reference of the drift)
    measure(model, subject, ...)             subject fidelity and prior drift of a trained model,
                                             as the image reader (reader.py) sees them
"""
import os
from dataclasses import dataclass

import numpy as np

from PIL import Image

from train.toy import reader, world
from train.toy.world import PAIR_WORDS, POSITIONS, subject_images


@dataclass(frozen=True)
class Example:
    """A subject and the two prompts that train it with prior preservation."""
    subject: str            # key of world.SUBJECTS
    instance_prompt: str    # the subject's reserved token and its class word: "a sks star"
    class_prompt: str       # the class alone, whose meaning the prior loss keeps: "a star"


# the default subject of train.single on the bundled tiny model
EXAMPLE = Example("striped_star", "a sks star", "a star")
# as DreamBooth has 3-5 photos: the first renders of the subject's seed-0 set
INSTANCE_IMAGES = 5
# measured prompts cycle through the placements toy captions know, to test more than one layout
PLACES = ("", " on the left", " in the center", " on the right")


def write_instance_images(subject, directory, positions=POSITIONS):
    """Write the subject's INSTANCE_IMAGES renders (32x32 RGB), the subject at `positions` in
    turn, as `{subject}-{i}.png` into `directory`, made if missing; returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    for i, pixels in enumerate(subject_images(subject, INSTANCE_IMAGES, 0, positions)[0]):
        Image.fromarray(pixels).save(os.path.join(directory, f"{subject}-{i}.png"))
    return directory


def placed(prompt, samples):
    """`samples` copies of `prompt`, cycling through PLACES."""
    return [prompt + PLACES[i % len(PLACES)] for i in range(samples)]


def placed_readings(model, prompt, samples, sample_steps, guidance, seed):
    """The reader's view of `samples` images of `prompt` (+ PLACES), sampled with DDIM
    (`sample_steps`, `guidance`) from generator seed `seed`. Of the base model's class prompt,
    before training: the reference `measure` compares the trained model's drift with."""
    images = model.generate(placed(prompt, samples), steps=sample_steps, guidance=guidance,
                            seed=seed, progress=False, batch_size=50)
    return reader.read(images, reader.load_reader())


def measure(model, subject, instance_prompt, class_prompt, samples, sample_steps, guidance, seed,
            base_readings):
    """(subject fidelity, prior drift) of a StableDiffusion `model`, each a share in [0, 1]:
    of `samples` images generated from the instance prompt, those the reader sees showing
    `subject` (any slot); of as many from the class prompt, reader.prior_drift against the
    base model's `base_readings` of the same prompts (placed_readings, same arguments)."""
    sampling = (samples, sample_steps, guidance, seed)
    fidelity = reader.subject_fidelity(placed_readings(model, instance_prompt, *sampling), subject)
    readings = placed_readings(model, class_prompt, *sampling)
    return fidelity, reader.prior_drift(readings, subject, base_readings)


# ------------------------------------------------------------------- several subjects (train.multi)

def pair_prompts(instance_prompts, samples):
    """`samples` prompts asking for two subjects together in phrasings that subjects' training
    never uses ("a sks star beside a zwx star", "... next to ...", "... and ..."), cycling
    through every pair in both orders."""
    pairs = [(a, b) for a in instance_prompts for b in instance_prompts if a != b]
    return [f"{pairs[i % len(pairs)][0]} {PAIR_WORDS[(i // len(pairs)) % len(PAIR_WORDS)]} "
            f"{pairs[i % len(pairs)][1]}" for i in range(samples)]


def mixed(objects, asked):
    """Does a reading of a pair prompt show mixing: an object in a hybrid pattern ("other"),
    the pattern of a subject not asked for, or one asked-for subject twice?"""
    patterns = [o["pattern"] for o in objects if o["pattern"] != "plain"]
    return any(p == "other" or p not in asked or patterns.count(p) > 1 for p in patterns)


def base_class_readings(model, subjects, samples, sample_steps, guidance, seed):
    """{class prompt: placed_readings} of the base model for measure_subjects' drift."""
    return {c: placed_readings(model, c, samples, sample_steps, guidance, seed)
            for c in dict.fromkeys(c for _, _, c in subjects)}


def measure_subjects(model, subjects, samples, sample_steps, guidance, seed, base_readings):
    """train.multi's measurement, for `subjects` = [(world subject name, instance prompt,
    class prompt)]; each share in [0, 1] over `samples` images per cell (pairs together,
    each subject alone, each class prompt):
        together : pair prompts whose image shows both asked-for subjects, each its own
                   pattern and shape, nothing else (reader.match "objects")
        mixing   : pair prompts whose image shows mixing (see `mixed`)
        alone    : "a sks star" (+ PLACES) images showing their subject, mean over subjects
        drift    : class prompt (+ PLACES) images showing any subject or a hybrid pattern,
                   plus reader.color_rise of the colors of that class's subjects over the base
                   model's `base_readings` (base_class_readings); mean over class prompts"""
    image_reader = reader.load_reader()
    names = {prompt: name for name, prompt, _ in subjects}

    def read(prompts):
        images = model.generate(prompts, steps=sample_steps, guidance=guidance, seed=seed,
                                progress=False, batch_size=50)
        return reader.read(images, image_reader)

    prompts = pair_prompts([prompt for _, prompt, _ in subjects], samples)
    readings = read(prompts)
    together = np.mean([reader.match(reader.parse(p), r)["objects"] for p, r in zip(prompts, readings)])
    asked = [[names[s] for s in names if s in p] for p in prompts]
    mixing = np.mean([mixed(r, a) for r, a in zip(readings, asked)])
    alone = np.mean([reader.subject_fidelity(read(placed(prompt, samples)), name)
                     for name, prompt, _ in subjects])
    drift = []
    for class_prompt in dict.fromkeys(c for _, _, c in subjects):
        readings, base = read(placed(class_prompt, samples)), base_readings[class_prompt]
        colors = {c for name, _, category in subjects if category == class_prompt for c in world.SUBJECTS[name].colors}
        drift.append(np.mean([any(o["pattern"] != "plain" for o in r) for r in readings])
                     + reader.color_rise(readings, base, colors))
    return {"together": float(together), "mixing": float(mixing), "alone": float(alone),
            "drift": float(np.mean(drift))}


def format_subjects(table, samples):
    return (f"both subjects right {table['together']:.0%}, mixing {table['mixing']:.0%} "
            f"(pair prompts in phrasings not trained on), each alone right {table['alone']:.0%}, "
            f"prior drift {table['drift']:.0%}; {samples} samples per cell")
