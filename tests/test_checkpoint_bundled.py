"""The bundled toy model away from where it is bundled: copied without its tokenizer/ folder it is
refused with one line naming both vocabulary sizes (not an IndexError at the first prompt), and
--tokenizer DIR brings it back; wherever its file lies, the model says what made it (made_by)."""

import os
import shutil

import pytest

from ldm import checkpoint as ckpt
from ldm import info
from ldm.rules import TOY_PRETRAIN
from ldm.text import find_bpe_vocabulary
from test_info import full_size_keys, write_sparse_safetensors
from tiny import tiny_model, write_tokenizer

BUNDLED_TOKENIZER = os.path.join(os.path.dirname(ckpt.DEFAULT_MODEL), "tokenizer")


@pytest.fixture(scope="module")
def copy_alone(tmp_path_factory):
    """weights/toy-sd.safetensors copied alone into an empty folder."""
    path = tmp_path_factory.mktemp("alone") / "toy-sd.safetensors"
    shutil.copyfile(ckpt.DEFAULT_MODEL, path)
    return str(path)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: what python -m ldm.info loads
def test_copy_without_its_tokenizer_is_refused(copy_alone, device):
    if find_bpe_vocabulary() is None:  # nothing to pair it with: the message says what to pass
        with pytest.raises(ckpt.CheckpointError, match="--tokenizer DIR"):
            ckpt.load(copy_alone, device="cpu")
        pytest.skip("no installed CLIP BPE vocabulary to mismatch (pip install open_clip_torch)")
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load(copy_alone, device=device)
    message = str(refused.value)
    assert "\n" not in message
    for part in (copy_alone, "installed CLIP BPE vocabulary", "49408 tokens", "622 rows",
                 "pass --tokenizer DIR"):
        assert part in message, message


def test_a_tokenizer_of_another_size_is_refused_wherever_it_comes_from(copy_alone, tmp_path):
    other = write_tokenizer(str(tmp_path / "tiny-tokenizer"))
    with pytest.raises(ckpt.CheckpointError, match=r"\(given: .*tiny-tokenizer\) has \d+ tokens "
                                                   r"but the text encoder's token table has 622"):
        ckpt.load(copy_alone, tokenizer_dir=other, device="meta")


def test_copy_with_tokenizer_given_loads_and_encodes(copy_alone):
    model = ckpt.load(copy_alone, tokenizer_dir=BUNDLED_TOKENIZER)
    assert model.decided_by["tokenizer"] == f"given: {BUNDLED_TOKENIZER}"
    assert len(model.text_encoder.tokenizer) == 622
    assert model.encode_prompts(["a red star on the left"]).shape == (1, 77, 64)


def test_unreadable_tokenizer_folder_is_one_line(copy_alone, tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    for device in ("cpu", "meta"):
        with pytest.raises(ckpt.CheckpointError, match="unreadable tokenizer") as refused:
            ckpt.load(copy_alone, tokenizer_dir=str(tmp_path), device=device)
        assert "\n" not in str(refused.value)


def test_an_empty_tokenizer_folder_given_is_refused_even_for_inspection(copy_alone, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no tokenizer.json or vocab.json"):
        ckpt.load(copy_alone, tokenizer_dir=str(tmp_path), device="meta")


def test_made_by_is_what_the_file_says_not_where_it_lies(copy_alone, capsys):
    bundled = ckpt.load(device="meta")
    assert bundled.made_by == TOY_PRETRAIN == "train.toy.pretrain"
    assert bundled.decided_by["made_by"] == "file metadata (train.toy.pretrain)"
    copy = ckpt.load(copy_alone, tokenizer_dir=BUNDLED_TOKENIZER)
    assert copy.made_by == TOY_PRETRAIN and copy.source == copy_alone
    assert info.main([copy_alone, "--tokenizer", BUNDLED_TOKENIZER]) == 0
    assert "made by     train.toy.pretrain   <- file metadata (train.toy.pretrain)" in \
        capsys.readouterr().out


def test_made_by_of_other_files(tmp_path, capsys):
    model = tiny_model("sd1", tokenizer_dir=str(tmp_path / "tokenizer"))
    assert model.made_by is None
    ckpt.save_single_file(str(tmp_path / "plain.safetensors"), model)
    ckpt.save_single_file(str(tmp_path / "toy.safetensors"), model,  # as train.toy.pretrain writes
                          extra_metadata={"train.toy.pretrain": "{}"})
    assert ckpt.load(str(tmp_path / "plain.safetensors")).made_by is None
    toy = ckpt.load(str(tmp_path / "toy.safetensors"))
    assert toy.made_by == TOY_PRETRAIN
    assert toy.decided_by["made_by"] == "file metadata (train.toy.pretrain)"
    real = tmp_path / "real"  # away from the tiny tokenizer
    real.mkdir()
    write_sparse_safetensors(real / "sd15.safetensors", full_size_keys("sd1"))  # a real SD file
    assert ckpt.load(str(real / "sd15.safetensors"), device="meta").made_by is None
    assert info.main([str(real / "sd15.safetensors")]) == 0
    assert "made by     no program named in the file" in capsys.readouterr().out
