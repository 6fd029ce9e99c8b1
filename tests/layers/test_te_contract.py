"""PolyComTEGroupedMLP against Transformer Engine's contract and each megatron-core release.

The checks live in ``tests/te_contract.py`` (TE stand-ins that enforce TE's documented
contract; megatron-core itself runs for real) and run in a subprocess per release: the
installed megatron-core here (CI runs this file again in a megatron-core 0.15 venv), and
every Megatron-LM tree under ``POLYCOM_MEGATRON_LM_TREES``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import te_contract
from megatron_lm import needs_trees, run_python, trees

SCRIPT = Path(te_contract.__file__)
CHECK_NAMES = [fn.__name__ for fn in te_contract.CHECKS]


def _parse(completed) -> dict:
    for line in completed.stdout.splitlines():
        if line.startswith("TE-CONTRACT "):
            return json.loads(line[len("TE-CONTRACT "):])
    raise AssertionError(f"no result (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


def _assert_all_ok(report: dict, names=CHECK_NAMES):
    failed = {n: report["checks"][n] for n in names if not report["checks"][n]["ok"]}
    assert not failed, "\n".join(
        f"megatron-core {report['megatron_core']} {n}: {r['error']}\n{r['trace']}"
        for n, r in failed.items())


@pytest.fixture(scope="module")
def installed_report():
    completed = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                               timeout=600, cwd=SCRIPT.parents[1])
    return _parse(completed)


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_installed_megatron_core(installed_report, name):
    _assert_all_ok(installed_report, [name])


def test_grouped_forward_was_exercised(installed_report):
    # Not vacuous: the forward ran under each FP8 recipe of this release, both activations.
    checks = installed_report["checks"]
    assert checks["grouped_forward_meets_te_contract"]["cases"] >= 8
    assert checks["grouped_forward_pads_like_upstream"]["cases"] >= 6


@needs_trees
def test_every_megatron_lm_tree(tmp_path):
    reports = []
    for tree in trees():
        report = _parse(run_python(tree, [SCRIPT], cwd=tmp_path))
        _assert_all_ok(report)
        reports.append(report["megatron_core"])
    assert reports
