"""argparse ``type=`` helpers shared by every ``polycom-megatron`` command.

A bad number is refused while the command line is parsed (argparse prints the usage and
one ``error:`` line naming the flag, exit status 2), never deep inside a run. An output
folder is checked the same way, before any long work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path


def _number(kind, text: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind, text: str, ok, expected: str):
    value = _number(kind, text)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text.strip()} is not {expected}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(int, text, lambda v: v >= 1, "a positive integer (1 or more)")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _checked(int, text, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(float, text, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(float, text, lambda v: v >= 0, "a number >= 0")


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
