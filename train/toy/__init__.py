"""The toy world behind the bundled tiny model: everything the project knows about it.

    world.py      scenes, rendering, subjects, vocabulary   (python -m train.toy.world: a preview grid)
    tokenizer.py  the CLIP-format tokenizer of its words      (python -m train.toy.tokenizer)
    pretrain.py   trains weights/toy-sd.safetensors on it     (python -m train.toy.pretrain)
    architecture.py  that model's layout, from pretrain's settings, checked before a run
    reader.py     reads generated images; the quality bar     (python -m train.toy.reader)
    subjects.py   the example subject as the trainers use it: its images, prompts, measurement

The trainers (train.single, ...) are generic; they reach the toy world only through subjects.py.
"""
