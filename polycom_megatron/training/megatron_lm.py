"""Can Megatron-LM's training loop start here? Checked before ``pretrain`` hands over.

``megatron.training`` comes with Megatron-LM (the megatron-core wheel from 0.17 on, or a
checkout on PYTHONPATH). Three things stop it that its own errors explain badly: it is not
there at all; it is there but a package it imports is missing (six, regex, pyyaml,
pydantic, pybind11, ...); or its C++ dataset helpers, which rank 0 compiles at start-up
with whatever ``python3`` / ``python3-config`` are on PATH, would be built for another
Python (pyenv picks 3.12 from the ``.python-version`` Megatron-LM ships) or cannot be
built. ``problem()`` returns one message for the first of these, or None.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

MISSING = """\
error: `polycom-megatron pretrain` runs Megatron-LM's training loop (megatron.training),
which is not importable here: {reason}

Get it in one of two ways:
  * Python >= 3.12 and megatron-core >= 0.17, whose wheel includes megatron.training:
      pip install 'megatron-core>=0.17,<0.20'
  * a Megatron-LM checkout (release core_v0.15.0 or later) on PYTHONPATH:
      git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM
      PYTHONPATH=$PWD/Megatron-LM polycom-megatron pretrain ...

No GPU? `polycom-megatron train-cpu` trains a small PolyCom model with megatron-core alone."""

# What Megatron-LM's training loop imports beyond megatron-core's own dependencies
# (releases 0.15-0.19; its pyproject lists them under the training extras):
# import name -> pip name.
TRAINING_DEPENDENCIES = {
    "six": "six",
    "regex": "regex",
    "yaml": "pyyaml",
    "pydantic": "pydantic",
    "pybind11": "pybind11",
}
# The modules the launcher uses; importing them pulls in what the loop needs to start.
LAUNCHER_IMPORTS = (
    "megatron.training",
    "megatron.training.arguments",
    "megatron.training.training",
    "megatron.training.inprocess_restart",
)
HELPERS_DIR = Path("megatron", "core", "datasets")


def _missing_packages() -> list:
    return [pip for module, pip in TRAINING_DEPENDENCIES.items()
            if importlib.util.find_spec(module) is None]


def _root(spec) -> str:
    """The folder holding ``megatron/`` for the found ``megatron.training``."""
    origin = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
    return str(Path(origin).resolve().parents[2]) if origin != "?" else "?"


def problem(helpers: bool = True) -> Optional[str]:
    """None when Megatron-LM's training loop can start here, else the error to print.
    ``helpers``: also check that its C++ dataset helpers will build for this Python."""
    try:
        spec = importlib.util.find_spec("megatron.training")
    except ModuleNotFoundError:  # no ``megatron`` package at all
        spec = None
    if spec is None:
        return MISSING.format(reason="No module named 'megatron.training'")
    root = _root(spec)
    try:
        # Its import-time warnings (no Apex, ...) are shown only once it is known to start,
        # so that a refusal is the one line below.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for name in LAUNCHER_IMPORTS:
                importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top and top != "megatron":
            missing = _missing_packages()
            pip = TRAINING_DEPENDENCIES.get(top, top)
            if pip not in missing:
                missing.insert(0, pip)
            return (
                f"error: Megatron-LM at {root} is importable, but {exc}: install the Python "
                f"packages its training loop needs that are missing here: "
                f"pip install {' '.join(missing)}"
            )
        return MISSING.format(reason=f"{exc} (Megatron-LM found at {root} is incomplete)")
    except ImportError as exc:
        if "override" in str(exc) and "typing" in str(exc):
            return (
                f"error: Megatron-LM at {root} needs Python >= 3.12 (it imports "
                f"typing.override); this is Python {sys.version.split()[0]}. Use Python 3.12, "
                "or a Megatron-LM release up to core_v0.17.1 on this Python."
            )
        return f"error: Megatron-LM at {root} failed to import: {exc}"
    found = helpers_problem(spec) if helpers else None
    if found is None:
        for warning in caught:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    return found


def helpers_problem(spec=None) -> Optional[str]:
    """Why Megatron-LM's start-up compile of its C++ dataset helpers would fail or build
    them for another Python; None when they are built for this one or will be."""
    spec = spec or importlib.util.find_spec("megatron.training")
    folder = Path(_root(spec)) / HELPERS_DIR
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not (folder / "Makefile").is_file() or (folder / f"helpers_cpp{suffix}").exists():
        return None  # a wheel (prebuilt or no Makefile), or already built for this Python
    if importlib.util.find_spec("pybind11") is None:
        return (f"error: Megatron-LM compiles its C++ dataset helpers ({folder}) at start-up "
                "and needs pybind11 for it, which is not installed: pip install pybind11")
    if not os.access(folder, os.W_OK):
        return (f"error: Megatron-LM compiles its C++ dataset helpers into {folder} at start-up, "
                "and that folder is not writable: build them once as its owner (make -C "
                f"{folder}) or use a writable checkout.")
    try:
        theirs = subprocess.run(["python3-config", "--extension-suffix"], cwd=folder,
                                capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        theirs = ""
    if theirs != suffix:
        return (
            f"error: Megatron-LM builds its C++ dataset helpers with the python3-config on PATH, "
            f"which in {folder} answers {theirs or 'nothing'!r}, not this Python's {suffix!r}: "
            "the module would not load. Build them for this Python first: make -C "
            f"{folder} LIBEXT={suffix} CPPFLAGS=\"$({sys.executable} -m pybind11 --includes)\""
        )
    return None
