"""Running ``polycom-megatron`` as a user does, for the fault-injection tests: the
installed executable in a subprocess of its own session, so every process of a run can be
found (``session_processes``) and none can outlive the test (``kill_session``)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import psutil

EXE = str(Path(sys.executable).parent / "polycom-megatron")

# The smallest model train-cpu runs: 2 ranks, a 1-layer MoE GPT (4 PolyNorm experts, EP=2).
TINY = [
    "--world-size", "2", "--tp", "1", "--layers", "1", "--hidden", "32", "--heads", "2",
    "--seq-len", "32", "--micro-batch", "2", "--global-batch", "4", "--vocab-size", "512",
    "--log-interval", "1",
]


def train_cpu(output_dir: Path, data_dir: Path, *flags: str) -> List[str]:
    return [EXE, "train-cpu", "--output-dir", str(output_dir), "--data-dir", str(data_dir), *TINY, *flags]


def run(argv: Sequence[str], timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run to completion (killing the whole session if it overstays)."""
    process = start(argv, env=env)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_session(process)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def start(argv: Sequence[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env,
    )


def wait_for_line(process: subprocess.Popen, prefix: str, timeout: float = 240) -> List[str]:
    """Read stdout until a line starts with ``prefix``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"exited (rc {process.wait()}) before {prefix!r}: {lines[-5:]}")
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")


def session_processes(sid: int) -> List[psutil.Process]:
    """Every live (non-zombie) process in session ``sid``, wherever it was reparented."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def survivors(sid: int, within_s: float = 10.0) -> List[str]:
    """The processes of session ``sid`` still alive after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        left = session_processes(sid)
        if not left or time.monotonic() > deadline:
            return [f"{p.pid} ppid {p.ppid()}: {' '.join(p.cmdline())[:120]}" for p in left]
        time.sleep(0.25)


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL everything left in the run's session (the test's safety net)."""
    for left in session_processes(process.pid):
        try:
            left.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.returncode is None:
        process.wait(timeout=30)


def tree_digest(path: Path) -> str:
    """SHA-256 over every file's relative path and bytes under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
