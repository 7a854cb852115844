"""The command-line conventions every command keeps (README, "Commands"): `python -m MODULE`
as the program name, help text and the default on every flag, one name for one thing."""

import argparse
import importlib

import pytest

COMMANDS = ["train.single", "train.multi", "edit.sample", "edit.cosine", "ldm.info", "spectral.count", "train.toy.pretrain",
            "train.toy.reader", "train.toy.world", "train.toy.tokenizer"]
# one name for one thing: what each of these meant elsewhere has the name on the right
RETIRED = {"--out": "--output", "--out-dir": "--output-dir", "--n": "--num-images",
           "--batch": "--batch-size", "--samples": "--eval-samples", "--full-finetune": "--method"}


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("module", COMMANDS)
def test_program_name_help_and_default_on_every_flag(module):
    parser = parser_of(module)
    assert parser.prog == f"python -m {module}"
    for action in options(parser):
        switch = action.nargs == 0 and action.default in (False, None)
        assert action.help, f"{module} {action.option_strings[0]} has no help"
        assert switch or action.required or "default" in parser._get_formatter()._expand_help(action), \
            f"{module} {action.option_strings[0]}: the help does not say the default"


@pytest.mark.parametrize("module", COMMANDS)
def test_one_name_for_one_thing(module):
    flags = {flag: action for action in options(parser_of(module)) for flag in action.option_strings}
    for retired, name in RETIRED.items():
        assert retired not in flags, f"{module} {retired}: call it {name}"
    if "--steps" in flags:  # optimizer steps; DDIM steps are --sample-steps everywhere
        assert "DDIM" not in flags["--steps"].help, module
    if "--sample-steps" in flags:
        assert "DDIM" in flags["--sample-steps"].help, module
