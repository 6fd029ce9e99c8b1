"""Launch the twin ``train-cpu`` runs of a comparison, one at a time.

Every run gets the same flags (data, tokens, schedule, evaluation, layout) except the
activation's own flags, its matched FFN width (``variants.ffn_width``) and the seed. Runs
go one after another, never side by side, so each has the machine to itself, and the order
of the activations rotates from seed to seed so that none always runs first (on a cold
machine) or last.

Each run lives in ``OUTPUT_DIR/runs/<activation>-seed<seed>`` with its log
(``train-cpu.log``) and the exact command (``command.json``). A finished run whose command
is the one this comparison would give is reused, not retrained; one with another command
is never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from polycom_megatron import variants

RUNS_DIR = "runs"
LOG_FILE = "train-cpu.log"
COMMAND_FILE = "command.json"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
# Seconds a run may take to stop after Ctrl-C before it is killed.
STOP_GRACE_S = 30.0


class RunFailed(RuntimeError):
    """A train-cpu run that exited non-zero (the message names it and its log)."""


@dataclass(frozen=True)
class PlannedRun:
    activation: str
    seed: int
    directory: Path
    argv: List[str]  # train-cpu's arguments

    @property
    def name(self) -> str:
        return f"{self.activation} seed {self.seed}"

    @property
    def tensorboard(self) -> Path:
        return self.directory / TENSORBOARD_DIR

    def finished(self) -> bool:
        """Done earlier with exactly this command, to the last step."""
        try:
            same = json.loads((self.directory / COMMAND_FILE).read_text()) == self.argv
            summary = json.loads((self.directory / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return False
        return same and summary.get("final_iteration") == _steps(self.argv)

    def started_with_this_command(self) -> bool:
        try:
            return json.loads((self.directory / COMMAND_FILE).read_text()) == self.argv
        except (OSError, ValueError):
            return False


def _steps(argv: Sequence[str]) -> int:
    return int(argv[argv.index("--steps") + 1])


def order(activations: Sequence[str], seeds: Sequence[int]):
    """(activation, seed) in running order: seed by seed, the activations rotated by one
    place per seed."""
    for i, seed in enumerate(seeds):
        k = i % len(activations)
        for name in list(activations[k:]) + list(activations[:k]):
            yield name, seed


def plan(activations: Sequence[str], seeds: Sequence[int], output_dir: Path,
         swiglu_width: int, tp: int, common: Sequence[str]) -> List[PlannedRun]:
    runs = []
    for name, seed in order(activations, seeds):
        directory = output_dir / RUNS_DIR / f"{name}-seed{seed}"
        argv = ["--output-dir", str(directory), *common, "--seed", str(seed),
                "--ffn-hidden", str(variants.ffn_width(name, swiglu_width, multiple_of=tp)),
                *variants.activation_flags(name)]
        runs.append(PlannedRun(name, seed, directory, argv))
    return runs


def check_earlier(runs: Sequence[PlannedRun], overwrite: bool) -> None:
    """Refuse to replace runs of an earlier, different comparison without ``--overwrite``."""
    if overwrite:
        return
    other = [r for r in runs if r.directory.exists() and not r.started_with_this_command()]
    if other:
        raise ValueError(
            f"{other[0].directory} holds a run with other settings (an earlier comparison; "
            f"{len(other)} such run(s)); pass --overwrite to replace them, or choose another "
            "--output-dir")


def _command() -> List[str]:
    exe = Path(sys.executable).parent / "polycom-megatron"
    found = str(exe) if exe.exists() else shutil.which("polycom-megatron")
    return [found] if found else [sys.executable, "-m", "polycom_megatron.cli"]


def execute(run: PlannedRun, index: int, total: int) -> None:
    """Run one train-cpu process to the end (reusing a finished identical run)."""
    prefix = f"[{index}/{total}] {run.name}"
    if run.finished():
        print(f"{prefix}: reusing the finished run in {run.directory} (same command)",
              flush=True)
        return
    # Ours to replace: an unfinished run of this command, or (with --overwrite) another one.
    if run.directory.exists():
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True)
    (run.directory / COMMAND_FILE).write_text(json.dumps(run.argv) + "\n")
    log = run.directory / LOG_FILE
    start = time.monotonic()
    with open(log, "w") as out:
        process = None
        # The start is inside the try and announced after it: a Ctrl-C at any point once
        # the run exists stops it, and none can orphan a run that was just started.
        try:
            process = subprocess.Popen([*_command(), "train-cpu", *run.argv], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            print(f"{prefix}: training ({log})", flush=True)
            status = process.wait()
        except BaseException:
            if process is not None:
                _stop(process)
            raise
    if status != 0:
        raise RunFailed(f"run {run.name} failed (train-cpu exit status {status}): "
                        f"{_last_line(log)}; its log: {log}")
    print(f"{prefix}: done in {time.monotonic() - start:.0f} s", flush=True)


def _stop(process: subprocess.Popen) -> None:
    """Stop a run (Ctrl-C reaches it too from a terminal; not when only we were signalled)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # slow, or a second Ctrl-C
        process.kill()
        process.wait()


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
