"""Argument types that refuse a bad number while the command line is parsed, and a parser
whose errors are one line.

argparse calls a ``type`` with the flag's text; raising ``ArgumentTypeError`` makes it
print ``<prog>: error: argument --lr: ...``. ``nan``, ``inf``, ``0`` for a count and a
negative rate are all caught here, before anything is prepared or any rank starts.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional


def integer(low: int, high: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    """An int in [low, high] (high None: unbounded)."""
    bounds = f"at least {low}" if high is None else f"between {low} and {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}{what}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(
    low: float = -math.inf, high: float = math.inf, low_open: bool = False,
    high_open: bool = False, what: str = "",
) -> Callable[[str], float]:
    """A finite float in the interval given (open ends excluded)."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    if high == math.inf and low == 0:
        bounds = "a positive finite number" if low_open else "a finite number >= 0"
    elif high == math.inf:
        bounds = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"a number in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {bounds}{what}, got {text}")
        return value

    parse.__name__ = "real"
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
positive_real = real(0.0, low_open=True)
non_negative_real = real(0.0)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block of a command with thirty
    flags buries the one line that matters) followed by where to look."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)
