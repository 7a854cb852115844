"""The command weights/README.md gives for the bundled model still means the run that made it;
the toy commands run (their flag conventions: tests/test_cli.py)."""
import dataclasses
import json
import os
import re
import shlex

import pytest
from safetensors import safe_open

from ldm.checkpoint import DEFAULT_MODEL
from train.toy import pretrain, reader, tokenizer, world



def reproduction_command() -> list[str]:
    """The flags of the command weights/README.md gives under "How it was made"."""
    with open(os.path.join(os.path.dirname(DEFAULT_MODEL), "README.md"), encoding="utf-8") as f:
        text = f.read().split("## How it was made")[1]
    line = re.search(r"^    python -m train\.toy\.pretrain(.*?)(#|$)", text, re.MULTILINE).group(1)
    return shlex.split(line)


def test_the_bundled_weights_reproduction_command():
    """weights/README.md's command (`--threads 2 --overwrite`) has every setting the bundled
    file records, but where the files go."""
    argv = reproduction_command()
    assert argv == ["--threads", "2", "--overwrite"]
    args = vars(pretrain.build_parser().parse_args(argv))
    assert not args.pop("resume") and args.pop("overwrite")
    config = dataclasses.asdict(pretrain.PretrainConfig(**args))
    recorded = json.loads(safe_open(DEFAULT_MODEL, "pt").metadata()["train.toy.pretrain"])
    assert recorded.keys() == config.keys()
    for key in ("output_dir", "work_dir"):    # where files go: not part of the run
        del recorded[key], config[key]
    assert recorded == json.loads(json.dumps(config))     # tuples as the metadata's lists


def test_defaults_are_the_config_defaults():
    args = vars(pretrain.build_parser().parse_args([]))
    del args["resume"], args["overwrite"]
    assert pretrain.PretrainConfig(**args) == pretrain.PretrainConfig()
    config = pretrain.build_parser().parse_args(["--channel-mult", "1,2", "--vae-batch-size", "3"])
    assert config.channel_mult == (1, 2) and config.vae_batch_size == 3


def test_world_preview_and_tokenizer_commands(tmp_path, capsys):
    world.main(["--output", str(tmp_path / "preview.png"), "--seed", "1"])
    assert (tmp_path / "preview.png").stat().st_size > 0
    assert len(capsys.readouterr().out.splitlines()) == 32          # one caption per scene
    tokenizer.main(["--output-dir", str(tmp_path / "tokenizer")])
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["merges.txt", "vocab.json"]


def test_world_and_tokenizer_replace_their_files_only_with_overwrite(tmp_path, capsys):
    """Refused (exit 2, files kept) without --overwrite; replaced with it."""
    (tmp_path / "tokenizer").mkdir()
    for name in ("preview.png", "tokenizer/vocab.json"):
        (tmp_path / name).write_text("earlier")
    for command, argv in ((world, ["--output", str(tmp_path / "preview.png")]),
                          (tokenizer, ["--output-dir", str(tmp_path / "tokenizer")])):
        with pytest.raises(SystemExit) as refused:
            command.main(argv)
        assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
        command.main(argv + ["--overwrite"])
    assert (tmp_path / "preview.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())["a</w>"] > 0
