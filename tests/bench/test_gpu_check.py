"""The GPU check's CPU rehearsal: ``bench/gpu_check.sh --cpu-rehearsal`` end to end, as the
GPU run calls it, so the one prepared GPU command cannot rot (every stage, its outputs and
the summary's structure), plus the driver's handling of a failing and a hanging stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from polycom_megatron.bench import gpu_check as G

REPO = Path(__file__).resolve().parents[2]
STAGES = ["install-wheels", "install-package", "environment", "cuda-tests", "ops-tests",
          "bench-kernels-liger", "bench-kernels-paper", "bench"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the rehearsal is the CPU stand-in; on a GPU run bench/gpu_check.sh itself")
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out),
                           "--cpu-rehearsal"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / G.SUMMARY).read_text()), done.stdout


def test_every_stage_ran_and_passed(rehearsal):
    out, summary, stdout = rehearsal
    assert [s["name"] for s in summary["stages"]] == STAGES
    status = {s["name"]: s for s in summary["stages"]}
    # The installs are the GPU machine's and tests/ops runs in the CI suite: said, not hidden.
    skipped = ("install-wheels", "install-package", "ops-tests")
    for name in skipped:
        assert status[name]["status"] == "skipped" and "rehearsal" in status[name]["reason"]
    for name in (n for n in STAGES if n not in skipped):
        stage = status[name]
        assert stage["status"] == "passed", stage
        assert stage["returncode"] == 0 and 0 < stage["seconds"] <= stage["limit_s"]
        assert stage["missing_outputs"] == []
    assert summary["passed"] is True and summary["mode"] == "cpu"
    assert "passed in" in stdout.splitlines()[-1]


def test_summary_names_device_versions_commit_and_files(rehearsal):
    out, summary, _ = rehearsal
    env = summary["environment"]
    assert summary["device_name"] == env["device_name"] and env["missing"] == []
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["versions"]["triton"] and summary["versions"]["megatron.core"]
    assert env["megatron_core_supported"] is True
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert summary["git"]["commit"] == head.stdout.strip()
    assert "--cpu-rehearsal" in summary["command"]
    # One flat folder, within what the device tool brings back.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(summary["files"]) and len(files) <= G.MAX_FILES
    assert all((out / f).is_file() for f in files)
    assert {"gpu_check.json", "gpu_check.log", "pytest_gpu.xml", "bench_kernels_liger.json",
            "bench_kernels_paper.json", "throughput.json"} <= set(files)


def test_stage_outputs_hold_real_results(rehearsal):
    out, summary, _ = rehearsal
    tests = next(s for s in summary["stages"] if s["name"] == "cuda-tests")["tests"]
    assert tests["tests"] > 20 and tests["failures"] == tests["errors"] == 0, tests
    assert tests["failed"] == [] and tests["skipped"] < tests["tests"]
    for name in ("bench_kernels_liger.json", "bench_kernels_paper.json"):
        payload = json.loads((out / name).read_text())
        impls = {r["impl"] for r in payload["results"]}
        assert {"naive", "triton", "swiglu-megatron"} <= impls, (name, impls)
        for r in payload["results"]:
            if r["max_rel_err_vs_naive"]:
                assert r["max_rel_err_vs_naive"]["y"] < 3e-2, r
    bench = json.loads((out / "throughput.json").read_text())
    assert {c["name"] for c in bench["cases"]} == {"swiglu", "polynorm[triton]"}
    assert all(c["tokens_per_s"] for c in bench["cases"])


def test_collect_copies_into_a_dated_device_folder(rehearsal, tmp_path):
    out, summary, _ = rehearsal
    target = G.collect(out, tmp_path)
    assert target.parent == tmp_path
    assert target.name.startswith(summary["started_utc"][:10].replace("-", "") + "-cpu-")
    assert sorted(p.name for p in target.iterdir()) == sorted(summary["files"])
    with pytest.raises(SystemExit, match="exists"):
        G.collect(out, tmp_path)


def test_a_failing_stage_does_not_stop_the_next_and_fails_the_check(monkeypatch, tmp_path):
    py = sys.executable
    plan = [G.Stage("fails", [py, "-c", "print('boom'); raise SystemExit(3)"], 30, 1),
            G.Stage("runs-after", [py, "-c", "print('still here')"], 30, 1)]
    monkeypatch.setattr(G, "stages", lambda args, mode: plan)
    assert G.main(["--out", str(tmp_path / "o"), "--cpu-rehearsal"]) == 1
    summary = json.loads((tmp_path / "o" / G.SUMMARY).read_text())
    got = [(s["name"], s["status"], s["returncode"]) for s in summary["stages"]]
    assert got == [("fails", "failed", 3), ("runs-after", "passed", 0)]
    assert summary["stages"][0]["tail"] == ["boom"] and summary["passed"] is False
    assert "still here" in (tmp_path / "o" / G.LOG).read_text()


def test_a_hanging_stage_is_stopped_at_its_limit_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
            "time.sleep(120)")
    start = time.monotonic()
    result = G._run(G.Stage("hangs", [sys.executable, "-c", code], 60, 1), 3,
                    dict(os.environ), lambda line: None)
    assert result.status == "timed_out" and "3 s limit" in result.reason
    assert time.monotonic() - start < 30 and result.tail == ["started"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_used_folder_is_refused(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit, match="not empty"):
        G.main(["--out", str(tmp_path), "--cpu-rehearsal"])
