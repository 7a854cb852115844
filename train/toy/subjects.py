"""The toy world's subjects as the trainers need them: the example, its images, a measurement.

A trainer (train.single, ...) knows nothing of the toy world. When the user brings no subject
of their own, it takes the example from here and treats it like a user's subject:

    EXAMPLE                                  the striped star, "a sks star" / "a star"
    write_instance_images(subject, folder)   its 5 "photos" as PNG files, which the trainer then
                                             reads back like a user's photos
    measure(model, subject, ...)             subject fidelity and prior drift of a trained model,
                                             as the image reader (reader.py) sees them
"""
import os
from dataclasses import dataclass

from PIL import Image

from train.toy import reader
from train.toy.world import subject_images


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


def write_instance_images(subject, directory):
    """Write the subject's INSTANCE_IMAGES renders (32x32 RGB) as `{subject}-{i}.png` into
    `directory`, made if missing; returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    for i, pixels in enumerate(subject_images(subject, n=INSTANCE_IMAGES, seed=0)[0]):
        Image.fromarray(pixels).save(os.path.join(directory, f"{subject}-{i}.png"))
    return directory


def measure(model, subject, instance_prompt, class_prompt, samples, sample_steps, guidance, seed):
    """(subject fidelity, prior drift) of a StableDiffusion `model`, each a share in [0, 1]:
    of `samples` images generated from the instance prompt, those the reader sees showing
    `subject` (any slot); of as many from the class prompt, those showing it all the same.
    Both sets are sampled with DDIM (`sample_steps`, `guidance`) from generator seed `seed`."""
    image_reader = reader.load_reader()
    shares = []
    for prompt, share in ((instance_prompt, reader.subject_fidelity),
                          (class_prompt, reader.prior_drift)):
        prompts = [prompt + PLACES[i % len(PLACES)] for i in range(samples)]
        images = model.generate(prompts, steps=sample_steps, guidance=guidance, seed=seed,
                                progress=False, batch_size=50)
        shares.append(share(reader.read(images, image_reader), subject))
    return tuple(shares)
