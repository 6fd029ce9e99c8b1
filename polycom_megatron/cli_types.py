"""argparse ``type=`` helpers shared by every ``polycom-megatron`` command.

A bad number (``nan``, ``inf``, ``0`` for a count, a negative rate) is refused while the
command line is parsed: one ``error:`` line naming the flag, exit status 2, never deep
inside a run. An output folder is checked the same way, before any long work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block of a command with thirty
    flags buries the one line that matters) followed by where to look; exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def integer(low: int, high: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    """An int in [low, high] (high None: unbounded); ``what`` is added to the error."""
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
    """A finite float in the interval given (open ends excluded); never nan or inf."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    if low == -math.inf and high == math.inf:
        bounds = "a finite number"
    elif high == math.inf and low == 0:
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
            raise argparse.ArgumentTypeError(f"must be {bounds}{what}, got {text.strip()}")
        return value

    parse.__name__ = "real"
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
finite_float = real()
positive_float = real(0.0, low_open=True)
non_negative_float = real(0.0)


def int_list(text: str) -> tuple:
    """A comma list of positive integers, e.g. ``64,256``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give e.g. 64,256")
    return tuple(positive_int(item) for item in items)


def writable_dir(text: str) -> Path:
    """A folder this process can create (if missing) and write into.

    Checked without creating anything: the nearest existing ancestor must be a writable
    folder, and the path itself, if it exists, must be one."""
    path = Path(text)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"{path}: cannot write into {probe}; choose a folder you can write to"
        )
    return path


def writable_file(text: str) -> Path:
    """A file path whose folder is (or can be created) writable; the file itself, if
    present, must be a writable regular file."""
    path = Path(text)
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path} is a folder or not writable")
    writable_dir(str(path.parent))
    return path


def prepare_output_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) now and prove a file can be written in it, so that
    a run fails before its work, not after. Raises ValueError naming the problem."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot write into {path} ({reason}); choose a folder you can "
                         "write to") from None
    return path
