"""train.toy.pretrain at an even smaller width: a few steps write a checkpoint that loads through
the same path as a real SD file; resuming continues exactly. And the bundled weights load and
sample."""
import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import DEFAULT_MODEL, load
from train.toy import world
from train.toy.pretrain import PretrainConfig, grounding_loss, placed_pair_clauses, pretrain, start

TINY = dict(num_images=64, vae_ch=32, vae_ch_mult=(1, 2), vae_res_blocks=1, vae_steps=2,
            vae_batch_size=4, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
            num_res_blocks=1, num_heads=2, text_width=32, text_layers=1, text_heads=2,
            batch_size=4, save_every=1, sample_every=1000, sample_steps=2, threads=1)


def run(tmp_path, name, steps, ground_steps, resume=False, overwrite=False):
    config = PretrainConfig(output_dir=str(tmp_path / name), work_dir=str(tmp_path / name / "work"),
                            steps=steps, ground_steps=ground_steps, **TINY)
    return pretrain(config, resume=resume, overwrite=overwrite)


@pytest.mark.slow
def test_smoke_writes_a_loadable_checkpoint_and_resumes_exactly(tmp_path):
    path = run(tmp_path, "a", steps=2, ground_steps=1)
    model = load(path)          # tokenizer/ beside the file, config from the metadata
    assert model.family == "sd1" and model.prediction_type == "epsilon"
    assert model.unet.config.model_channels == 32 and model.image_size == 32
    assert os.path.exists(tmp_path / "a" / "pretrain_log.csv")
    assert os.path.exists(tmp_path / "a" / "work" / "samples" / "step_000003.png")
    images = model.generate(["a red star"], steps=2, guidance=3.0, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert [row.split(",")[0] for row in (tmp_path / "a" / "pretrain_log.csv").read_text().split()[-3:]] \
        == ["unet", "unet", "ground"]
    # stopped after 2 steps, resumed into a grounding step: the uninterrupted run's weights
    run(tmp_path, "b", steps=2, ground_steps=0)
    resumed = run(tmp_path, "b", steps=2, ground_steps=1, resume=True, overwrite=True)  # b's result
    a, b = load_file(path), load_file(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_placed_pair_clauses_are_the_caption_split_at_its_and():
    """The token masks of a placed pair's clauses decode to the caption's two halves around
    " and ", each with its side; other captions (one object, unplaced pairs) have none."""
    text = load(DEFAULT_MODEL).text_encoder
    captions = [scene.caption for scene in world.dataset(400, seed=3)[1]]
    clauses, own_right = placed_pair_clauses(text, text.tokenize(captions))
    placed = 0
    for caption, masks, right in zip(captions, clauses, own_right):
        ids = text.tokenize([caption])[0]
        if caption.count(" on the ") != 2:
            assert not masks.any()
            continue
        placed += 1
        halves = caption.split(" and ")
        assert [text.tokenizer.decode(ids[mask]).strip() for mask in masks] == halves
        assert right.tolist() == [half.endswith("on the right") for half in halves]
    assert placed > 50


def test_grounding_loss_wants_each_clause_to_own_its_half():
    """-log(A_c / (A_c + A_c')) over c's half: 0 when each half looks only at its own clause,
    log 2 when both clauses get the same share, large when swapped or when neither clause is
    looked at (the way out the squared-share unmix loss leaves open)."""
    clauses = torch.zeros(1, 2, 77, dtype=torch.bool)
    clauses[0, 0, 1:4], clauses[0, 1, 5:8] = True, True            # first clause on the right
    own_right = torch.tensor([[True, False]])
    column = torch.arange(16) % 4                                  # a 4x4 map, row by row

    def attention(on_left_half, on_right_half):   # (1, 16, 77): where each position looks
        maps = torch.zeros(1, 16, 77)
        for q in range(16):
            maps[0, q, on_right_half if column[q] >= 2 else on_left_half] = 1.0
        return maps / maps.sum(-1, keepdim=True)

    def loss(maps):
        return grounding_loss([maps], clauses, own_right, (8, 8)).item()   # latent 8x8, ds 2

    assert loss(attention([5, 6, 7], [1, 2, 3])) < 1e-5
    assert loss(attention([1, 5], [2, 6])) == pytest.approx(math.log(2), abs=1e-5)
    assert loss(attention([1, 2, 3], [5, 6, 7])) > 10
    assert loss(attention([0, 40], [0, 76])) > 10                 # start token and padding only
    # a quarter of the left half's clause attention on the wrong clause: -log(3/4) there, and
    # the mean over the two clauses halves it
    assert loss(attention([5, 6, 7, 1], [1, 2, 3])) == pytest.approx(
        -0.5 * math.log(3 / 4), abs=1e-5)


def test_an_earlier_run_is_continued_replaced_or_refused(tmp_path):
    """start(): a fresh run into a work dir holding a run is refused; --resume continues it,
    --overwrite removes it (state, log, latents, grids); a damaged or foreign state.pt is refused
    in one line; results in the output dir are replaced with --overwrite only."""
    config = PretrainConfig(output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    work = tmp_path / "work"
    (work / "samples").mkdir(parents=True)
    for name in ("log.csv", "latents.pt", "samples/step_000500.png"):
        (work / name).write_text("earlier")
    torch.save({"stage": "unet", "step": 7}, work / "state.pt")
    with pytest.raises(ValueError, match="continue that run with --resume, or replace it with"):
        start(config)
    assert start(config, resume=True)["step"] == 7
    assert len(list(work.rglob("*.*"))) == 4                    # continuing removes nothing
    assert start(config, overwrite=True) == {}
    assert not list(work.rglob("*.*"))
    with pytest.raises(ValueError, match="holds no state.pt"):
        start(config, resume=True)
    for content, message in ((b"\x00" * 64, "not a PyTorch file"), (None, "not a state written by")):
        if content is None:
            torch.save({"step": 7}, work / "state.pt")
        else:
            (work / "state.pt").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            start(config, resume=True)
    (tmp_path / "out" / "tokenizer").mkdir(parents=True)
    (tmp_path / "out" / "tokenizer" / "vocab.json").write_text("{}")
    torch.save({"stage": "unet", "step": 7}, work / "state.pt")
    assert start(config, resume=True)["step"] == 7     # the tokenizer is the resumed run's own
    (tmp_path / "out" / "toy-sd.safetensors").write_text("earlier")
    with pytest.raises(ValueError, match=r"\(toy-sd.safetensors\); replace them with --overwrite"):
        start(config, resume=True)
    assert start(config, resume=True, overwrite=True)["step"] == 7
    assert (tmp_path / "out" / "toy-sd.safetensors").read_text() == "earlier"   # until the end


def test_resume_refuses_settings_that_would_not_continue_the_run(tmp_path):
    """Another architecture would not load, another dataset would silently reuse the cached
    latents: refused in one line. Where files go and how long the run goes may change, but not
    --steps once grounding has begun; a field the state's run did not have is not compared."""
    work = tmp_path / "work"
    config = PretrainConfig(output_dir=str(tmp_path / "out"), work_dir=str(work), steps=7)
    work.mkdir()

    def saved_at(step, **fields):
        config_json = json.dumps(dataclasses.asdict(dataclasses.replace(config, **fields)))
        torch.save({"stage": "unet", "step": step, "config": config_json}, work / "state.pt")

    saved_at(5)
    for change, message in ((dict(vae_ch=64), "was made with --vae-ch 32, this run gives 64"),
                            (dict(seed=1), "was made with --seed 0, this run gives 1")):
        with pytest.raises(ValueError, match=message):
            start(dataclasses.replace(config, **change), resume=True)
    assert start(dataclasses.replace(config, steps=9, threads=1, work_dir=str(work) + "/"), resume=True)
    saved_at(8)                                     # one grounding step done
    with pytest.raises(ValueError, match="grounding since step 7; give --steps 7"):
        start(dataclasses.replace(config, steps=9), resume=True)
    assert start(dataclasses.replace(config, ground_steps=4000), resume=True)["step"] == 8
    old = dataclasses.asdict(config)
    del old["ground_weight"]                        # a state from before grounding existed
    torch.save({"stage": "unet", "step": 5, "config": json.dumps(old)}, work / "state.pt")
    assert start(dataclasses.replace(config, ground_weight=0.5), resume=True)["step"] == 5


def test_bundled_weights_load_and_sample():
    model = load(DEFAULT_MODEL)
    assert model.family == "sd1" and model.image_size == 32
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.path.dirname(DEFAULT_MODEL)) for f in files)
    assert size <= 20 * 2**20
    images = model.generate(["a red star on the left and a blue circle on the right"], steps=2,
                            guidance=4.0, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
