"""Real Megatron-LM release trees for the tests that need ``megatron.training``.

``megatron.training`` is not importable on our CPU machines (Python 3.11 with megatron-core
0.16, whose wheel lacks it), so these tests skip unless ``POLYCOM_MEGATRON_LM_TREES`` names
a folder of Megatron-LM checkouts (one per release, e.g. ``git archive core_v0.16.1``).
``POLYCOM_MEGATRON_LM_PYTHONPATH`` adds what those trees import beyond our own
dependencies (six, regex, pyyaml, pydantic, pybind11; on Python 3.11 for 0.18+ also a
``sitecustomize.py`` that sets ``typing.override`` from typing_extensions).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_INFO = Path("megatron", "core", "package_info.py")
TREES_VARIABLE = "POLYCOM_MEGATRON_LM_TREES"

needs_trees = pytest.mark.skipif(
    not os.environ.get(TREES_VARIABLE),
    reason=f"set {TREES_VARIABLE} to a folder of Megatron-LM checkouts",
)


def trees() -> list:
    """The Megatron-LM checkouts under ``$POLYCOM_MEGATRON_LM_TREES``, sorted."""
    found = sorted(p.parents[2] for p in Path(os.environ[TREES_VARIABLE]).glob(f"*/{PACKAGE_INFO}"))
    assert found, f"no Megatron-LM checkouts under ${TREES_VARIABLE}"
    return found


def run_python(tree: Path, args: list, cwd: Path, timeout_s: float = 600.0):
    """Run ``python <args>`` with ``tree`` first on PYTHONPATH; the completed process."""
    path = [str(tree), os.environ.get("POLYCOM_MEGATRON_LM_PYTHONPATH", ""),
            str(Path(__file__).resolve().parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
