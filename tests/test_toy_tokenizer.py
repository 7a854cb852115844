"""The toy tokenizer: CLIP's file layout, one token per toy word, and the bundled files are
exactly what train.toy.tokenizer writes today."""
import os

from transformers import CLIPTokenizer

from ldm.checkpoint import DEFAULT_MODEL
from train.toy import world
from train.toy.tokenizer import build


def test_tokenizer_round_trips_the_vocabulary(tmp_path):
    """transformers' CLIPTokenizer loads the generated files; each toy word and reserved token
    is exactly one token "word</w>" and decodes back; CLIP's special-token layout holds."""
    vocab = build(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == len(vocab)
    assert tokenizer.bos_token_id == len(vocab) - 2 and tokenizer.eos_token_id == len(vocab) - 1
    for word in world.vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids == [vocab[word + "</w>"]], word
        assert tokenizer.decode(ids).strip() == word
    for token in world.RESERVED_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    caption = "a red star on the left and an orange circle on the right"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(caption.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == caption
    # words outside the vocabulary still tokenize (into byte symbols), as CLIP's rare words do
    assert len(tokenizer("dog", add_special_tokens=False).input_ids) > 1


def test_the_bundled_tokenizer_is_the_one_built_today(tmp_path):
    build(str(tmp_path))
    bundled = os.path.join(os.path.dirname(DEFAULT_MODEL), "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(bundled, name), "rb") as f:
            assert (tmp_path / name).read_bytes() == f.read(), name
