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


def tree_env(tree: Path) -> dict:
    """The environment with ``tree`` first on PYTHONPATH, then its extra dependencies."""
    path = [str(tree), os.environ.get("POLYCOM_MEGATRON_LM_PYTHONPATH", ""),
            str(Path(__file__).resolve().parents[1])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "PYTHONUNBUFFERED": "1"}


def run_python(tree: Path, args: list, cwd: Path, timeout_s: float = 600.0):
    """Run ``python <args>`` with ``tree`` first on PYTHONPATH; the completed process."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=tree_env(tree),
                          capture_output=True, text=True, timeout=timeout_s)


# The smallest GPT Megatron-LM's loop trains in every release, for ``pretrain --cpu``.
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "192", "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-3",
    "--lr-decay-style", "constant", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    # 0.15's mock data draws token ids up to 4095: 4095 + the end-of-document id.
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "4095", "--mock-data",
    "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000", "--seed", "7",
    # Dropout off: Megatron-LM's loop restores the RNG inexactly on the CPU harness.
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
