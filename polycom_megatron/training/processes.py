"""Rank processes that never outlive their run, and failures reported in one line.

Each rank becomes the leader of its own process group as its first act, so everything it
starts (dist_checkpointing's Manager and writer processes among them) shares that group
and one ``killpg`` ends all of it. Ranks sit outside the terminal's foreground group, so
Ctrl-C reaches only the launcher, which stops them and reports once.

- A rank fails or is killed: the launcher kills every rank's group at once and raises
  ``RankFailed`` naming the rank and its one-line error (or its signal).
- The launcher dies (even by SIGKILL): each rank's watchdog thread sees its parent change
  or the launcher's pid vanish within a second and kills its own group.
- Ctrl-C or SIGTERM in the launcher: ranks are killed, ``KeyboardInterrupt`` propagates.
- The fork server the ranks come from dies with the launcher (``forkserver_guard``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, List, Optional, Sequence

# Errors a rank raises about the user's input or run (one line says it all); anything else
# is a bug and its traceback is shown, once.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, TimeoutError)
_WATCH_INTERVAL_S = 0.5
_FORKSERVER_GUARD = "polycom_megatron.training.forkserver_guard"


class RankFailed(RuntimeError):
    """A rank exited non-zero; the message is what to tell the user (one line), and
    ``traceback`` the failing rank's traceback when it was a bug rather than bad input."""

    def __init__(self, message: str, traceback: Optional[str] = None):
        super().__init__(message)
        self.traceback = traceback


def launch(
    fn: Callable, world_size: int, args: Sequence, workdir: str,
    preload: Sequence[str] = (), deadline_s: Optional[float] = None,
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` processes forked from a fork server that
    has imported ``preload``; return when all exit 0, raise ``RankFailed`` or
    ``TimeoutError`` (after killing them all) otherwise. ``workdir`` receives the ranks'
    error records."""
    context = multiprocessing.get_context("forkserver")
    multiprocessing.set_forkserver_preload([_FORKSERVER_GUARD, *preload])
    launcher = os.getpid()
    processes: List[multiprocessing.Process] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_term = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        for rank in range(world_size):
            process = context.Process(
                target=_rank_entry, args=(fn, rank, tuple(args), launcher, workdir),
                name=f"rank{rank}",
            )
            process.start()
            processes.append(process)
        _watch(processes, workdir, deadline_s)
    finally:
        stop(processes)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)


def stop(processes: Sequence[multiprocessing.Process]) -> None:
    """Kill each rank's whole process group (the rank and all it started) and reap."""
    for process in processes:
        if process.pid is None:
            continue
        for kill, target in ((os.killpg, process.pid), (os.kill, process.pid)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for process in processes:
        if process.pid is not None:
            process.join(timeout=10)


def _watch(processes, workdir: str, deadline_s: Optional[float]) -> None:
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    running = {p.sentinel: p for p in processes}
    while running:
        for sentinel in wait(list(running), timeout=1.0):
            process = running.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                # Give the others a moment to record their own errors: the first rank to
                # exit is not always the one that knows why.
                time.sleep(0.2)
                raise _failure(processes, process, workdir)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the {len(processes)} ranks did not finish within {deadline_s:.0f} s")


def _failure(processes, first, workdir: str) -> RankFailed:
    records = {}
    for process in processes:
        path = Path(workdir) / f"{process.name}.error.json"
        if path.is_file():
            try:
                records[process.name] = json.loads(path.read_text())
            except ValueError:
                pass
    expected = [name for name in sorted(records) if records[name]["expected"]]
    if expected:
        return RankFailed(records[expected[0]]["message"])
    who = first.name.replace("rank", "rank ")
    if first.name in records:
        record = records[first.name]
        last = record["traceback"].rstrip().splitlines()[-1]
        return RankFailed(f"{who} failed: {last}", traceback=record["traceback"])
    code = first.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    return RankFailed(f"{who} (pid {first.pid}) {how}; stopped the other ranks")


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------
# Inside a rank
# --------------------------------------------------------------------------------------


def _rank_entry(fn: Callable, rank: int, args: tuple, launcher: int, workdir: str) -> None:
    os.setpgid(0, 0)
    _start_watchdog(launcher)
    try:
        fn(rank, *args)
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then exit 1
        record = dict(
            expected=isinstance(exc, EXPECTED_ERRORS),
            message=str(exc) or type(exc).__name__,
            traceback=traceback.format_exc(),
        )
        _write_json(Path(workdir) / f"rank{rank}.error.json", record)
        # Often this error is a peer's death seen through a collective, and the launcher
        # may be gone too: end what this rank started before leaving it orphaned.
        _kill_group_members(os.getpid())
        os._exit(1)


def _start_watchdog(launcher: int) -> None:
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            if os.getppid() != parent or not _alive(launcher):
                # The launcher is gone: nobody will read our results or stop us.
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def _kill_group_members(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` except the caller (Linux: read /proc)."""
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
