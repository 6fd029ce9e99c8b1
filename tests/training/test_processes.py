"""The rank launcher on its own (no torch in the ranks): a rank's bad-input error is one
line, a bug is one line plus its traceback, a killed rank is named with its signal, and
the processes a rank started die with it."""

import os
import signal
import time

import psutil
import pytest

from polycom_megatron.training import processes
from polycom_megatron.training.processes import RankFailed

pytestmark = pytest.mark.timeout(300)


def _ok(rank, workdir):
    open(os.path.join(workdir, f"ok{rank}"), "w").close()


def _bad_input(rank, workdir):
    if rank == 1:
        raise ValueError("--thing must be positive")
    time.sleep(60)


def _bug(rank, workdir):
    if rank == 0:
        {}["missing"]
    time.sleep(60)


def _killed_with_a_child(rank, workdir):
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    tmp = os.path.join(workdir, f"child{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(str(child.pid))
    os.replace(tmp, os.path.join(workdir, f"child{rank}"))
    if rank == 1:
        while not os.path.exists(os.path.join(workdir, "child0")):
            time.sleep(0.05)  # both ranks have started their child
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_all_ranks_succeed(tmp_path):
    processes.launch(_ok, 2, (str(tmp_path),), workdir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]


def test_a_bad_input_error_is_its_message(tmp_path):
    with pytest.raises(RankFailed) as failed:
        processes.launch(_bad_input, 2, (str(tmp_path),), workdir=str(tmp_path))
    assert str(failed.value) == "--thing must be positive" and failed.value.traceback is None


def test_a_bug_is_one_line_with_the_traceback_kept(tmp_path):
    with pytest.raises(RankFailed) as failed:
        processes.launch(_bug, 2, (str(tmp_path),), workdir=str(tmp_path))
    assert str(failed.value) == "rank 0 failed: KeyError: 'missing'"
    assert "Traceback" in failed.value.traceback and "_bug" in failed.value.traceback


def test_a_killed_rank_is_named_and_everything_the_ranks_started_dies(tmp_path):
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL; stopped the other ranks"):
        processes.launch(_killed_with_a_child, 2, (str(tmp_path),), workdir=str(tmp_path))
    children = [int((tmp_path / f"child{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "the killed rank's child and the other rank's child must be gone"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
