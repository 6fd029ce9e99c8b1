"""``polycom-megatron compare`` training its twins with the installed ``train-cpu``, as a
user runs it: the report, the reuse of finished runs, the refusal to replace another
comparison, a failed run named with its log, and Ctrl-C stopping every child."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

import cli_run
from polycom_megatron.experiments import runs

pytest.importorskip("tensorboard")

STEPS = "4"
FLAGS = [*cli_run.TINY, "--activations", "swiglu,polynorm", "--seeds", "1", "--steps", STEPS,
         "--eval-interval", "2", "--eval-iters", "1"]


def _compare(out, *flags, timeout=300):
    return cli_run.run([cli_run.EXE, "compare", "--output-dir", str(out), *FLAGS, *flags],
                       timeout=timeout)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = _compare(out)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return out, done.stdout


def test_the_twins_are_trained_and_compared(compared):
    out, stdout = compared
    rows = [line.split() for line in stdout.splitlines()]
    assert [r[0] for r in rows if r and r[0] in ("swiglu", "polynorm")][-2:] == ["swiglu",
                                                                                  "polynorm"]
    result = json.loads((out / "compare.json").read_text())
    by_name = {r["activation"]: r for r in result["runs"]}
    assert set(by_name) == {"swiglu", "polynorm"}
    summaries = {}
    for name, run in by_name.items():
        summary = json.loads((out / "runs" / f"{name}-seed1" / "summary.json").read_text())
        summaries[name] = summary
        # The report's numbers are the run's own: parameters, validation at 2 and 4.
        assert run["num_parameters"] == summary["num_parameters"]
        assert [p["iteration"] for p in run["validation"]] == [2, 4]
        assert run["final_validation_loss"] == pytest.approx(
            summary["validation"][STEPS]["loss"], rel=1e-6)
        assert run["tokens_per_s"] > 0 and run["seed"] == 1
    # Matched widths: SwiGLU at w, PolyNorm at 1.5 w: parameters within the 4 coefficients.
    assert by_name["polynorm"]["ffn_hidden_size"] * 2 == by_name["swiglu"]["ffn_hidden_size"] * 3
    assert 0 < by_name["polynorm"]["num_parameters"] - by_name["swiglu"]["num_parameters"] <= 4
    delta = result["summary"]["polynorm"]["delta_mean"]
    assert delta == pytest.approx(by_name["polynorm"]["final_validation_loss"]
                                  - by_name["swiglu"]["final_validation_loss"])
    # Same data, tokens and schedule for both: only seed/width/activation flags differ.
    argv = result["settings"]["runs"]
    assert argv["swiglu seed 1"][argv["swiglu seed 1"].index("--data-dir") + 1] == str(out / "data")
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_a_rerun_reuses_finished_runs_and_other_settings_are_refused(compared, tmp_path):
    out, _ = compared
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    done = _compare(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reusing the finished run") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    done = _compare(out, "--lr", "1e-3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "holds a run with other settings" in line and "--overwrite" in line, line
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_failed_run_is_named_with_its_log(compared, tmp_path):
    out, _ = compared
    data = tmp_path / "data"
    shutil.copytree(out / "data", data)
    for index in data.glob("*.idx"):
        index.write_bytes(index.read_bytes()[:20])  # cut short
    done = _compare(tmp_path / "cmp", "--data-dir", str(data))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    log = tmp_path / "cmp" / "runs" / "swiglu-seed1" / "train-cpu.log"
    assert line.startswith("polycom-megatron compare: error: run swiglu seed 1 failed "
                           "(train-cpu exit status 2)"), line
    assert line.endswith(f"its log: {log}") and log.is_file(), line


def test_ctrl_c_stops_the_running_child(compared, tmp_path):
    out, _ = compared
    process = cli_run.start([cli_run.EXE, "compare", "--output-dir", str(tmp_path / "cmp"),
                             "--data-dir", str(out / "data"), *FLAGS, "--steps", "200"])
    try:
        cli_run.wait_for_line(process, "[1/2] swiglu seed 1: training")
        # Only compare is signalled (not its process group): it must stop the child itself.
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130, err[-2000:]
        assert "interrupted" in err.strip().splitlines()[-1]
        assert cli_run.survivors(process.pid) == []
    finally:
        cli_run.kill_session(process)


def test_the_activations_take_turns_at_running_first():
    assert list(runs.order(["a", "b", "c"], [1, 2, 3, 4])) == [
        ("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2),
        ("c", 3), ("a", 3), ("b", 3), ("a", 4), ("b", 4), ("c", 4)]
