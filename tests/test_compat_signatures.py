"""Every upstream method we override keeps a signature that accepts megatron-core's calls.

Runs on the installed megatron-core (CI also runs this file in a megatron-core 0.15 venv)
and, with ``POLYCOM_MEGATRON_LM_TREES``, on every Megatron-LM tree. The guard itself is
shown to fire when a signature is changed on purpose, on either side.
"""

import json
from pathlib import Path

import pytest

import signature_guard as guard
from megatron_lm import needs_trees, run_python, trees


def test_overrides_accept_upstream_calls():
    report = guard.run_all()
    assert not report["problems"], json.dumps(report["problems"], indent=1)
    compared = report["compared"]
    # The modules Megatron builds from our specs are all compared, not skipped.
    for where in ("PolyComMLP.forward vs MLP.forward",
                  "PolyComTEGroupedMLP.forward vs TEGroupedMLP.forward",
                  "PolyComTEGroupedMLP.__init__ vs TEGroupedMLP.__init__",
                  "PolyComSequentialMLP.forward vs SequentialMLP.forward",
                  "PolyComSharedExpertMLP.__init__ vs SharedExpertMLP.__init__"):
        assert where in compared, compared


def test_guard_reports_an_override_changed_on_purpose(monkeypatch):
    from polycom_megatron.layers.grouped_experts import PolyComTEGroupedMLP

    def forward(self, hidden, tokens_per_expert):  # permuted_probs dropped, first renamed
        raise AssertionError("never called")

    monkeypatch.setattr(PolyComTEGroupedMLP, "forward", forward)
    problems = guard.run_all()["problems"]["PolyComTEGroupedMLP.forward vs TEGroupedMLP.forward"]
    assert "positional #1 is 'permuted_local_hidden_states' upstream, 'hidden' ours" in problems
    assert "upstream takes 'permuted_probs' positionally, ours does not" in problems


def test_guard_reports_an_upstream_signature_change(monkeypatch):
    from megatron.core.transformer.moe.experts import SequentialMLP

    original = SequentialMLP.forward

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs,
                padding_mask=None):  # as if a release added a keyword
        return original(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    monkeypatch.setattr(SequentialMLP, "forward", forward)
    problems = guard.run_all()["problems"]
    assert problems == {
        "PolyComSequentialMLP.forward vs SequentialMLP.forward": [
            "upstream takes 'padding_mask' positionally, ours does not",
            "upstream keyword 'padding_mask' missing from ours",
        ]
    }


@pytest.mark.parametrize(
    "ours, upstream, expected",
    [
        ("def f(self, x, y=None): pass", "def f(self, x, y=None): pass", []),
        ("def f(self, x, *, polycom): pass", "def f(self, x): pass", ["ours requires 'polycom'"]),
        ("def f(self, x, y): pass", "def f(self, x, y=1): pass", ["'y' is optional upstream"]),
        ("def f(self, x, y=2): pass", "def f(self, x, y=1): pass", ["'y' defaults to 1"]),
        ("def f(self, x, **kw): pass", "def f(self, x, *, z=1): pass", []),
        ("def f(self, x): pass", "def f(self, x, *a): pass", ["upstream takes *args"]),
    ],
)
def test_signature_rules(ours, upstream, expected):
    scope = {}
    exec(ours.replace("def f", "def ours"), scope)
    exec(upstream.replace("def f", "def upstream"), scope)
    problems = guard.signature_problems(scope["ours"], scope["upstream"])
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), problems


@needs_trees
def test_every_megatron_lm_tree(tmp_path):
    script = Path(guard.__file__)
    for tree in trees():
        completed = run_python(tree, [script], cwd=tmp_path)
        lines = [l for l in completed.stdout.splitlines() if l.startswith("SIGNATURES ")]
        assert lines, f"{tree}: exit {completed.returncode}\n{completed.stderr[-3000:]}"
        report = json.loads(lines[0][len("SIGNATURES "):])
        assert report["compared"] and not report["problems"], (tree.name, report["problems"])
