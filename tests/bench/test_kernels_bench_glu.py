"""The gated rows of the kernel benchmark, run as a user runs it: ``python -m
polycom_megatron.bench.kernels`` in a subprocess on CPU, without TRITON_INTERPRET set."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROWS, COLS = 16, 64
GATED = ("polynorm_glu", "polyrelu_glu")
OURS = ("naive", "triton")
SWIGLU = ("swiglu", "swiglu-megatron")


def test_gated_rows_beside_swiglu_baselines(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    impls = ",".join(OURS + SWIGLU + ("liger", "swiglu-liger"))
    proc = subprocess.run(
        [sys.executable, "-m", "polycom_megatron.bench.kernels", "--rows", str(ROWS),
         "--cols", str(COLS), "--ops", "polyrelu," + ",".join(GATED), "--impls", impls,
         "--reps", "1", "--warmup", "0", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    by_key = {(r["op"], r["impl"], r["pass"]): r for r in data["results"]}
    want = {(op, impl, p) for op in GATED for impl in OURS + SWIGLU
            for p in ("fwd", "bwd", "fwdbwd")}
    want |= {("polyrelu", impl, p) for impl in OURS for p in ("fwd", "bwd", "fwdbwd")}
    assert set(by_key) == want

    elem = 2  # bf16
    for (op, impl, p), r in by_key.items():
        assert r["ms"] > 0 and r["cols"] == COLS
        if op not in GATED:
            assert r["speedup_vs_swiglu"] is None
            continue
        # x and dx are [rows, 2 * cols]; y and dy [rows, cols].
        assert r["bytes"] == {"fwd": 3, "bwd": 5, "fwdbwd": 8}[p] * ROWS * COLS * elem
        if impl in SWIGLU:
            assert r["speedup_vs_swiglu"] is None
            err = r["max_rel_err_vs_swiglu_eager"]
        else:
            assert r["swiglu_baseline"] in SWIGLU and r["speedup_vs_swiglu"] > 0
            err = r["max_rel_err_vs_naive"]
        assert err["y"] < 3e-2 and err["dx"] < 3e-2, (op, impl, err)  # bf16 rounding
    copies = {c["op"]: c for c in data["copy"]}
    assert copies["polynorm_glu"]["bytes"] == 2 * ROWS * 2 * COLS * elem

    notes = {(s["op"], s["impl"]): s["reason"] for s in data["skipped"]}
    assert "needs CUDA" in notes[("polynorm_glu", "swiglu-liger")]
    assert "no gated PolyCom" in notes[("polyrelu_glu", "liger")]
    assert "beside the gated ops" in notes[("polyrelu", "swiglu")]
    assert not any(impl == "triton" for _, impl in notes)  # the interpreter was selected
