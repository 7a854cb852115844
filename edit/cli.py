"""What a command checks before it loads or computes anything: numbers in range, and places to
write that hold no earlier result (unless --overwrite).

    with usage_errors(parser):
        check_range("--eta", args.eta, 0, 1)
        check_output_file(args.output, args.overwrite, "--output", suffix=".png")
        earlier = check_output_dir(args.output_dir, ("vocab.json", "merges.txt"), args.overwrite)

Each refusal is a ValueError whose message is one line naming the flag and, for an earlier
result, the way out (--overwrite; --resume where the command has it); usage_errors turns it
into argparse's error (the usage line, that line, exit status 2). Checked first, a refused
command costs nothing and changes nothing on disk. train/config.py checks every field of a
run configuration with check_range, from the range its `option` declares.
"""

import argparse
import math
from contextlib import contextmanager
from pathlib import Path


def check_range(flag: str, value, minimum=None, maximum=None, below=None) -> None:
    """value finite and minimum <= value <= maximum, value < below (None: no bound); a None
    value (a default decided later) passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        bound = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise ValueError(f"{flag} {bound}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{flag} must be at most {maximum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{flag} must be below {below}, got {value}")


def check_output_file(path: str, overwrite: bool, flag: str = "--output", suffix: str | None = None,
                      way_out: str | None = None) -> None:
    """`path` can take a new file: not a folder, ending in `suffix`, in a folder that exists,
    and not there yet unless `overwrite`. way_out: what the refusal suggests (default:
    --overwrite or another `flag`)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory, not a file")
    if suffix and target.suffix.lower() != suffix:
        raise ValueError(f"{flag} must name a {suffix} file, got {path}")
    folder = target.absolute().parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: no such folder {folder}")
    if target.exists() and not overwrite:
        raise ValueError(f"{flag}: {path} exists; "
                         f"{way_out or f'replace it with --overwrite, or give another {flag}'}")


def check_output_dir(path: str, results: tuple[str, ...], overwrite: bool, flag: str = "--output-dir",
                     way_out: str = "replace them with --overwrite") -> list[Path]:
    """`path` can be made (if missing) and take the files or folders named `results`: none of
    them is there unless `overwrite`. Returns those that are (what --overwrite replaces)."""
    folder = Path(path)
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "" if existing == folder.absolute() else f"{existing} "
        raise ValueError(f"{flag} {path}: {what}is a file, not a directory")
    earlier = [name for name in results if (folder / name).exists()]
    if earlier and not overwrite:
        names = ", ".join(earlier)
        raise ValueError(f"{flag} {path} holds an earlier run's files ({names}); {way_out}")
    return [folder / name for name in earlier]


@contextmanager
def usage_errors(parser: argparse.ArgumentParser):
    """A ValueError raised inside (by the checks above) becomes parser.error: exit status 2.
    Wrap the checks only, so that a bug later on still shows its traceback."""
    try:
        yield
    except ValueError as error:
        parser.error(str(error))


def numbers(kind: type):
    """An argparse type for a comma-separated list: '2,2,2' -> (2, 2, 2), '0,0.5' -> (0.0, 0.5)."""
    what = "whole numbers" if kind is int else "numbers"

    def parse_list(text: str) -> tuple:
        try:
            return tuple(kind(value) for value in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {text!r}") from None
    return parse_list
