"""A CLIP-compatible BPE tokenizer for the toy vocabulary.

Writes vocab.json + merges.txt in the layout of openai/clip-vit-large-patch14's tokenizer, so
transformers' CLIPTokenizer loads it unchanged, like the tokenizer of a real SD checkpoint:

    vocab = the 256 byte symbols, the same 256 + "</w>" (end of word), one entry per merge,
            then <|startoftext|>, <|endoftext|> (last two ids, as in CLIP: bos = V-2, eos = V-1)

The merges are learned by plain BPE (Sennrich et al., 2016) on the toy words only: repeatedly
merge the most frequent adjacent symbol pair (ties: smallest pair) until every word is a single
symbol, so each toy word, and each reserved token (sks, zwx, ...), is one token "word</w>".
Any other text still tokenizes, into byte symbols, as CLIP's does for rare words.

    python -m train.toy.tokenizer --output-dir weights/tokenizer --overwrite   # the bundled one
"""
import argparse
import json
import os
from collections import Counter

from edit.cli import check_output_dir, usage_errors
from ldm.text import byte_symbols  # CLIP's byte -> symbol table, in its vocabulary order
from train.toy.world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_merges(words):
    """BPE merges (pairs of symbols, in rank order) that make each word one symbol."""
    segmented = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        pairs = Counter(p for s in segmented.values() if len(s) > 1 for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segmented.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segmented[w] = tuple(out)


def build(output_dir, words=None):
    """Write vocab.json and merges.txt into output_dir (made if missing) for `words` (default:
    the toy vocabulary); returns the vocabulary (token -> id)."""
    merges = learn_merges(words or vocabulary())
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge produced an existing symbol"
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(output_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.toy.tokenizer", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default="weights/tokenizer",
                        help="folder for vocab.json and merges.txt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace vocab.json and merges.txt already in --output-dir (without "
                             "it, the command refuses to)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        check_output_dir(args.output_dir, ("vocab.json", "merges.txt"), args.overwrite)
    vocab = build(args.output_dir)
    print(f"wrote {args.output_dir}: {len(vocab)} tokens, {len(vocabulary())} toy words")


if __name__ == "__main__":
    main()
