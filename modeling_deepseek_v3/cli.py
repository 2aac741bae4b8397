"""argparse types shared by the demo, the examples and the benchmarks: a bad value on the command line becomes an
argparse error that names the option and the value (``argument --steps: must be a positive int, got -1``), instead of
a run that silently trains zero or whole epochs, or fails deep inside transformers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(kind, accepts, wanted: str):
    def parse(text: str):
        value = kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        if not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {wanted} {kind.__name__}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's message for an unparsable value names the type
    return parse


def positive(kind):
    """An argparse type: a finite number of ``kind`` (int or float) above 0."""
    return _number(kind, lambda value: value > 0, "a positive")


def non_negative(kind):
    """An argparse type: a finite number of ``kind`` (int or float) at or above 0."""
    return _number(kind, lambda value: value >= 0, "a non-negative")


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive ints (``1,2,4``)."""
    parse = positive(int)
    try:
        return [parse(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints (e.g. 1,2,4), got {text}") from None


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def seed(text: str) -> int:
    """An argparse type: a random seed, in [0, 2**32) as NumPy's generator (set by ``set_seed``) takes it."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text}")
    return value


seed.__name__ = "int"  # argparse's message for an unparsable value names the type
