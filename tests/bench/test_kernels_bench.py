"""Smoke test of the kernel benchmark: it runs on CPU and writes the expected JSON."""

import json

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, tests/conftest.py selects the interpreter

from polycom_megatron.bench import kernels  # noqa: E402

SMOKE = ["--rows", "64", "--cols", "256", "--impls", "naive,torch,triton", "--reps", "3",
         "--ops", "polynorm,polyrelu"]


def test_smoke_run_writes_every_entry(tmp_path):
    out = tmp_path / "kernels.json"
    payload = kernels.main(SMOKE + ["--json", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(payload["results"]))

    got = {(r["op"], r["impl"], r["pass"]) for r in data["results"]}
    want = {
        (op, impl, p)
        for op in ("polynorm", "polyrelu")
        for impl in ("naive", "torch", "triton")
        for p in ("fwd", "bwd", "fwdbwd")
    }
    assert got == want and len(data["results"]) == len(want)
    elem = 2  # bf16 by default
    for r in data["results"]:
        assert (r["rows"], r["cols"], r["dtype"], r["order"]) == (64, 256, "bfloat16", 3)
        assert r["ms"] > 0 and r["gbps"] > 0 and r["frac_of_copy"] > 0
        assert r["bytes"] == {"fwd": 2, "bwd": 3, "fwdbwd": 5}[r["pass"]] * 64 * 256 * elem
        assert r["speedup_vs_liger"] is None  # liger was not asked for
        # Every implementation agrees with the naive formula (bf16 output rounding).
        assert r["max_rel_err_vs_naive"]["y"] < 3e-2 and r["max_rel_err_vs_naive"]["dx"] < 3e-2
    assert [(c["op"], c["rows"], c["cols"]) for c in data["copy"]] == [
        ("polynorm", 64, 256), ("polyrelu", 64, 256)
    ]
    assert all(c["gbps"] > 0 for c in data["copy"])
    assert data["skipped"] == []

    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "git_commit", "command", "timer"):
        assert key in meta
    assert meta["command"].startswith("python -m polycom_megatron.bench.kernels --rows 64")
    assert meta["timer"] == ("cuda_events" if torch.cuda.is_available() else "wall_clock")


def test_unavailable_liger_is_skipped_with_a_note(tmp_path):
    payload = kernels.main(
        ["--rows", "8", "--cols", "64", "--ops", "polynorm,polyrelu", "--impls", "naive,liger",
         "--reps", "1", "--warmup", "0"]
    )
    notes = {(s["op"], s["impl"]): s["reason"] for s in payload["skipped"]}
    assert "no PolyReLU" in notes[("polyrelu", "liger")]
    liger_ran = any(r["impl"] == "liger" for r in payload["results"])
    assert liger_ran != (("polynorm", "liger") in notes)
