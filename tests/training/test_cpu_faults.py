"""Fault injection on ``polycom-megatron train-cpu``, run as a user runs it (the installed
executable in a subprocess, exit code asserted): damaged checkpoints of every file kind,
mismatched flags, a fresh run over an old one, bad numbers, kill -9 of a rank and of the
launcher, Ctrl-C. After each, no process of the run may be left.

One trained run (4 steps, checkpoints at 2 and 4) is shared; each test works on a copy.
Refusals happen before any rank starts, so most tests cost only the launcher's start-up.
"""

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

import cli_run
from cli_run import run, start, survivors, train_cpu, tree_digest, wait_for_line

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, data dir) of a 4-step run with checkpoints at iterations 2 and 4."""
    base = tmp_path_factory.mktemp("faults")
    result = run(train_cpu(base / "run", base / "data", "--steps", "4", "--save-interval", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run", base / "data"


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the trained run: (run dir, data dir)."""
    run_dir, data_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", data_dir


def ckpts(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def error_lines(result_or_stderr) -> list:
    text = getattr(result_or_stderr, "stderr", result_or_stderr)
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_per_problem(result, *expected: str):
    lines = error_lines(result)
    assert lines and all(line.startswith(("error:", "polycom-megatron train-cpu: error:")) for line in lines), lines
    assert "Traceback" not in result.stderr
    for text in expected:
        assert any(text in line for line in lines), (text, lines)


# ---- a fresh run over an old one --------------------------------------------------------


def test_a_run_without_resume_over_a_newer_checkpoint_is_refused(copy):
    run_dir, data_dir = copy
    before = tree_digest(ckpts(run_dir))
    result = run(train_cpu(run_dir, data_dir, "--steps", "3"))
    assert result.returncode == 2
    assert_one_line_per_problem(result, "already holds checkpoints (newest: iteration 4)")
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert tree_digest(ckpts(run_dir)) == before
    assert (ckpts(run_dir) / "latest_checkpointed_iteration.txt").read_text() == "4\n"


def test_overwrite_trains_from_scratch(copy):
    run_dir, data_dir = copy
    result = run(train_cpu(run_dir, data_dir, "--steps", "1", "--overwrite"))
    assert result.returncode == 0, result.stderr
    assert "--overwrite: removed the old checkpoints" in result.stdout
    assert sorted(p.name for p in ckpts(run_dir).iterdir()) == [
        "iter_0000001", "latest_checkpointed_iteration.txt"
    ]


# ---- damaged checkpoints ----------------------------------------------------------------


def _region(size: int):
    start = size // 4
    return start, max(1, min(4096, size // 2))


def flip(path: Path):
    data = bytearray(path.read_bytes())
    start, n = _region(len(data))
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def zero(path: Path):
    data = bytearray(path.read_bytes())
    start, n = _region(len(data))
    while not any(data[start:start + n]) and start + n < len(data):
        start += n  # zeroing zeros would change nothing
    assert any(data[start:start + n]), f"{path} is all zeros"
    data[start:start + n] = bytes(n)
    path.write_bytes(bytes(data))


def truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


FILES = {
    "distcp": lambda c: c / "iter_0000004" / "__0_1.distcp",
    "metadata": lambda c: c / "iter_0000004" / ".metadata",
    "common": lambda c: c / "iter_0000004" / "common.pt",
    "metadata.json": lambda c: c / "iter_0000004" / "metadata.json",
    "manifest": lambda c: c / "iter_0000004" / "polycom_manifest.json",
    "tracker": lambda c: c / "latest_checkpointed_iteration.txt",
}
# A damaged manifest hides what it would have checked, so it is damaged on its own; every
# other file kind is damaged at once, and each must be named in a line of its own.
DAMAGE_SETS = {"files": ["distcp", "metadata", "common", "metadata.json", "tracker"],
               "manifest": ["manifest"]}


@pytest.mark.parametrize("damage", [flip, zero, truncate], ids=lambda f: f.__name__)
@pytest.mark.parametrize("damaged", sorted(DAMAGE_SETS))
def test_damaged_checkpoint_files_are_refused_naming_each(copy, damaged, damage):
    run_dir, data_dir = copy
    targets = [FILES[kind](ckpts(run_dir)) for kind in DAMAGE_SETS[damaged]]
    for target in targets:
        damage(target)
    before = tree_digest(ckpts(run_dir))
    result = run(train_cpu(run_dir, data_dir, "--steps", "6", "--resume"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert_one_line_per_problem(result, *map(str, targets), "--resume-fallback")
    assert len(error_lines(result)) == len(targets) + 1, "one line per file, one for the fix"
    assert "resumed from" not in result.stdout
    assert tree_digest(ckpts(run_dir)) == before, "a refused resume changes nothing"


@pytest.mark.parametrize("kind, resumes_at", [("distcp", 2), ("tracker", 4)])
def test_resume_fallback_resumes_from_the_newest_intact_checkpoint(copy, kind, resumes_at):
    run_dir, data_dir = copy
    flip(FILES[kind](ckpts(run_dir)))
    result = run(train_cpu(run_dir, data_dir, "--steps", "5", "--resume", "--resume-fallback"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpts(run_dir) / f'iter_{resumes_at:07d}'} at iteration {resumes_at}" in result.stdout
    assert "skipped:" in result.stdout
    if kind == "distcp":
        assert (ckpts(run_dir) / "iter_0000004.damaged").is_dir(), "the damaged one is kept aside"
    assert (ckpts(run_dir) / "latest_checkpointed_iteration.txt").read_text() == "5\n"


# ---- flags that disagree with the checkpoint -------------------------------------------


def test_a_resume_with_other_model_flags_is_refused_naming_each_flag(copy):
    run_dir, data_dir = copy
    flags = ["--polycom-activation", "polyrelu", "--polycom-order", "2", "--hidden", "64",
             "--num-experts", "2"]
    result = run(train_cpu(run_dir, data_dir, "--steps", "6", "--resume", *flags))
    assert result.returncode == 2, result.stderr[-2000:]
    named = ["--polycom-activation polynorm", "--polycom-order 3", "--hidden 32",
             "--ffn-hidden 64", "--num-experts 4"]  # --ffn-hidden follows --hidden
    assert_one_line_per_problem(result, *named)
    assert len(error_lines(result)) == len(named)
    assert all(str(ckpts(run_dir) / "iter_0000004") in line for line in error_lines(result))


def test_a_layout_change_that_does_not_reshard_is_refused_naming_the_flag(copy):
    run_dir, data_dir = copy
    result = run(train_cpu(run_dir, data_dir, "--steps", "6", "--resume", "--ep", "1"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_per_problem(result, "saved at --ep 2, this run asks for --ep 1", "resume with --ep 2")


# ---- numbers refused at parse time -------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
        (["--timeout", "0"], "argument --timeout: must be a positive finite number, got 0"),
        (["--split", "9,x"], "argument --split: expected up to three non-negative weights"),
        (["--eval-interval", "0"], "argument --eval-interval:"),
    ],
)
def test_bad_numbers_are_refused_in_one_line(tmp_path, flags, message):
    result = run(train_cpu(tmp_path / "run", tmp_path / "data", *flags), timeout=120)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"polycom-megatron train-cpu: error: {message}"), lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_triton_kernels_without_cuda_are_refused_naming_the_torch_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run(train_cpu(tmp_path / "run", tmp_path / "data", "--polycom-kernel", "triton"),
                 timeout=120, env=env)
    assert result.returncode == 2
    assert_one_line_per_problem(result, "--polycom-kernel triton needs", "--polycom-kernel torch")
    assert not (tmp_path / "data").exists()


# ---- dead processes ----------------------------------------------------------------------


def _rank_pids(launcher_pid: int) -> list:
    """The ranks: the launcher's descendants that lead their own process group."""
    import psutil

    return [
        p.pid for p in psutil.Process(launcher_pid).children(recursive=True)
        if os.getpgid(p.pid) == p.pid
    ]


def test_kill_9_of_a_rank_during_a_save_stops_the_run_and_leaves_nothing(copy):
    run_dir, data_dir = copy
    process = start(train_cpu(run_dir, data_dir, "--steps", "500", "--resume", "--save-interval", "2"))
    try:
        wait_for_line(process, "iter     6/")  # the save of iteration 6 starts now
        ranks = _rank_pids(process.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 1
        assert len(error_lines(err)) == 1, err
        assert re.fullmatch(
            rf"error: rank \d \(pid {ranks[-1]}\) was killed by SIGKILL; stopped the other ranks",
            error_lines(err)[0],
        ), err
        assert survivors(process.pid) == []
    finally:
        cli_run.kill_session(process)
    # The interrupted save never became the tracker's checkpoint: resume picks an intact one.
    tracked = int((ckpts(run_dir) / "latest_checkpointed_iteration.txt").read_text())
    assert tracked in (4, 6)
    result = run(train_cpu(run_dir, data_dir, "--steps", str(tracked + 1), "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {tracked}" in result.stdout


@pytest.mark.parametrize("how", ["kill -9 launcher", "ctrl-c"])
def test_a_dead_or_interrupted_launcher_leaves_no_process(copy, how):
    run_dir, data_dir = copy
    process = start(train_cpu(run_dir, data_dir, "--steps", "500", "--resume"))
    try:
        wait_for_line(process, "iter     6/")
        assert len(_rank_pids(process.pid)) == 2
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)  # what the terminal does
            _, err = process.communicate(timeout=120)
            assert process.returncode == 130
            assert error_lines(err) == [
                "interrupted: all ranks stopped; rerun with --resume to continue from the "
                "newest checkpoint"
            ]
        else:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        assert survivors(process.pid) == []
    finally:
        cli_run.kill_session(process)


# ---- baselines, the split, TensorBoard ---------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--swiglu"], "--swiglu cannot be combined with --polycom-activation polynorm: PolyCom "
                       "replaces the gated linear unit"),
        (["--swiglu", "--polycom-gated"], "--swiglu cannot be combined with --polycom-activation "
                                          "polynorm --polycom-gated"),
        (["--polycom-activation", "none", "--polycom-gated"], "--polycom-gated needs a PolyCom activation"),
    ],
)
def test_swiglu_with_a_polycom_activation_is_refused_in_one_line(tmp_path, flags, message):
    from polycom_megatron.config import gated_form_conflict, gated_unit_conflict

    result = run(train_cpu(tmp_path / "run", tmp_path / "data", *flags), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_per_problem(result, message)
    assert len(error_lines(result)) == 1
    if "--swiglu" in flags:  # pretrain's own message, not a copy
        expected = (gated_form_conflict("--swiglu", "polynorm") if "--polycom-gated" in flags
                    else gated_unit_conflict("--swiglu", "polynorm", 64))
        assert error_lines(result) == [f"error: {expected}"]
    assert not (tmp_path / "data").exists()


def test_swiglu_trains_without_tensorboard_and_is_not_resumed_as_polynorm(trained, tmp_path):
    """The SwiGLU baseline with the tensorboard package hidden: one note saying how to get
    the event files, exit 0, the variant in summary.json and the checkpoint fingerprint."""
    _, data_dir = trained
    hide = tmp_path / "no-tensorboard"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(hide)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    run_dir = tmp_path / "run"
    result = run(train_cpu(run_dir, data_dir, "--steps", "2", "--polycom-activation", "none",
                           "--swiglu", "--eval-iters", "1"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "TensorBoard" in line]
    assert notes == [f"note: no TensorBoard logs are written to {run_dir / 'tensorboard'} (the "
                     "tensorboard package is missing; pip install 'polycom-megatron[experiments]')"]
    assert not (run_dir / "tensorboard").exists()
    assert "swiglu (stock Megatron MLP)" in result.stdout
    assert "not exporting to transformers" in result.stdout
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    assert summary["activation"] == "swiglu" and summary["tensorboard_dir"] is None
    assert list(summary["validation"]) == ["2"]

    result = run(train_cpu(run_dir, data_dir, "--steps", "3", "--resume"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_per_problem(result, "trained with --polycom-activation none, this run asks for polynorm",
                                "trained with --swiglu on, this run asks for off")


def test_a_resume_with_another_split_is_refused_naming_the_flag(copy):
    run_dir, data_dir = copy
    result = run(train_cpu(run_dir, data_dir, "--steps", "6", "--resume", "--split", "80,20,0"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_per_problem(
        result, "was trained with --split 90,10,0, this run asks for 80,20,0; resume with --split 90,10,0")
    assert len(error_lines(result)) == 1
    # The same shares written otherwise are the same split.
    result = run(train_cpu(run_dir, data_dir, "--steps", "5", "--resume", "--split", "9,1"))
    assert result.returncode == 0, result.stderr[-3000:]
