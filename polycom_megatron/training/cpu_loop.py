"""``polycom-megatron train-cpu``: the end-to-end run on a machine without a GPU.

With no flags it (1) prepares data in ``--output-dir/data``: the offline pydoc corpus, a
SentencePiece tokenizer and a Megatron indexed dataset, reused on later runs; (2) starts
4 gloo ranks (TP=2 x DP=2; with PolyCom experts, 4 experts top-2 on EP=2); (3) trains a
tiny PolyNorm GPT for 100 steps with megatron-core's DDP, optimizer, LR scheduler and
forward/backward schedule, logging loss and tokens/s; (4) saves a distributed checkpoint
and prints a summary. ``--resume`` continues from the newest checkpoint up to ``--steps``,
reproducing the losses of an uninterrupted run.

``run(job)`` is the same thing as a function (used by the tests).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.multiprocessing as mp

from polycom_megatron.training.cpu_job import DEFAULT_NUM_EXPERTS, CpuJob, build_parser, job_from_args

SUMMARY_FILE = "summary.json"
# What a rank imports: preloaded once by the fork server.
_RANK_MODULE = "polycom_megatron.training.cpu_train"


@dataclass
class RunSummary:
    """The outcome of one ``run``: what the final report prints and summary.json holds."""

    layout: str
    model: str
    num_parameters: int
    start_iteration: int
    final_iteration: int
    losses: Dict[int, float]
    grad_norms: Dict[int, float]
    train_seconds: float
    tokens_trained: int
    wall_seconds: float
    checkpoint_path: Optional[str]
    checkpoint_bytes: int
    resumed_from: Optional[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def first_loss(self) -> Optional[float]:
        return self.losses[min(self.losses)] if self.losses else None

    @property
    def last_loss(self) -> Optional[float]:
        return self.losses[max(self.losses)] if self.losses else None

    def describe(self) -> str:
        lines = [
            "== train-cpu summary ==",
            f"layout:      {self.layout}",
            f"model:       {self.model}, {self.num_parameters:,} parameters",
        ]
        if self.losses:
            first, last = min(self.losses), max(self.losses)
            lines.append(
                f"loss:        {self.first_loss:.4f} at step {first} -> {self.last_loss:.4f} "
                f"at step {last}"
            )
            lines.append(
                f"throughput:  {self.tokens_per_s:,.0f} tokens/s ({self.tokens_trained:,} tokens "
                f"in {self.train_seconds:.1f} s of training; {self.wall_seconds:.1f} s wall "
                "including start-up)"
            )
        else:
            lines.append(f"no steps run (already at iteration {self.final_iteration})")
        if self.resumed_from:
            lines.append(f"resumed:     from {self.resumed_from}")
        if self.checkpoint_path:
            lines.append(
                f"checkpoint:  {self.checkpoint_path} ({self.checkpoint_bytes / 2**20:.2f} MiB)"
            )
        return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        available, why_not = polycom_experts_available(args)
        job = job_from_args(args, experts_available=available)
        if args.num_experts is None and not job.is_moe:
            print(
                f"note: training a dense model; the default MoE setup ({DEFAULT_NUM_EXPERTS} "
                f"experts, EP=2) needs PolyCom experts, which this build lacks ({why_not})",
                flush=True,
            )
        summary = run(job)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe(), flush=True)
    from polycom_megatron.hf.after_training import export_and_sample

    export_and_sample(job)
    return 0


def run(
    job: CpuJob, prepare_quietly: bool = False, deadline_s: Optional[float] = None
) -> RunSummary:
    """Prepare data (once), train on ``job.world_size`` local gloo ranks, return the summary
    (also written to ``output_dir/summary.json``). ``deadline_s`` bounds the training
    processes' wall time (TimeoutError after killing them)."""
    job.validate()
    if job.resume:
        from polycom_megatron.training.checkpoint import TRACKER_FILE, latest_iteration

        if latest_iteration(job.checkpoint_dir) is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint to resume from in {job.checkpoint_dir} (no "
                f"{TRACKER_FILE}); run without --resume first, or point --output-dir at the "
                "run to continue"
            )
    wall_start = time.perf_counter()
    prepare_data(job, quiet=prepare_quietly)
    print(f"{job.describe_model()}\n{job.describe_layout()}", flush=True)
    result = _launch(job, deadline_s)
    summary = RunSummary(
        layout=job.describe_layout(),
        model=job.describe_model(),
        num_parameters=result.num_parameters,
        start_iteration=result.start_iteration,
        final_iteration=result.final_iteration,
        losses=dict(result.losses),
        grad_norms=dict(result.grad_norms),
        train_seconds=result.train_seconds,
        tokens_trained=result.tokens_trained,
        wall_seconds=time.perf_counter() - wall_start,
        checkpoint_path=result.checkpoint_path,
        checkpoint_bytes=result.checkpoint_bytes,
        resumed_from=result.resumed_from,
    )
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def prepare_data(job: CpuJob, quiet: bool = False) -> None:
    """Corpus -> tokenizer -> indexed dataset in ``job.data_dir``, unless a valid one with
    the requested vocabulary size is already there."""
    from polycom_megatron.training import data

    prefix = job.data_dir / data.DEFAULT_DATASET_NAME
    model_path = job.data_dir / "tokenizer.model"
    if model_path.is_file() and Path(f"{prefix}.bin").is_file():
        try:
            if data.load_tokenizer(model_path).get_piece_size() == job.vocab_size:
                info = data.validate_indexed_dataset(prefix, vocab_size=job.vocab_size)
                print(f"data: reusing {info.describe()}", flush=True)
                return
        except data.DataError as exc:
            print(f"data: rebuilding ({exc})", flush=True)
    print(f"data: preparing corpus, tokenizer and dataset in {job.data_dir} ...", flush=True)
    summary = data.prepare(job.data_dir, vocab_size=job.vocab_size, progress=not quiet)
    if not quiet:
        print(summary.describe(), flush=True)


def polycom_experts_available(args) -> tuple:
    """(True, "") when this build can put PolyCom into MoE experts, else (False, reason).

    Decides the MoE default: the job is MoE as soon as the experts exist."""
    from polycom_megatron.config import PolyComConfig

    polycom = PolyComConfig.from_args(args)
    if polycom is None:
        return True, ""  # Megatron's stock experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from polycom_megatron.specs import get_gpt_layer_spec
    try:
        get_gpt_layer_spec(polycom, use_te=False, num_experts=DEFAULT_NUM_EXPERTS)
    except ValueError as exc:
        return False, str(exc)
    return True, ""


# --------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------


def _launch(job: CpuJob, deadline_s: Optional[float] = None):
    """Spawn the ranks, wait for them, return rank 0's ``RankResult``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        # Ranks fork from a server process that has imported torch and megatron-core once:
        # importing them in every rank costs each rank several CPU-seconds, and the ranks
        # share the same few cores. (The server runs no torch ops, so forking it is safe.)
        multiprocessing.set_forkserver_preload([_RANK_MODULE])
        with _server_warnings_quieted():
            context = mp.start_processes(
                _rank_main,
                args=(job, _free_port(), out_path),
                nprocs=job.world_size,
                join=False,
                start_method="forkserver",
            )
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        # join() raises as soon as one rank fails, after stopping the others.
        while not context.join(timeout=5.0):
            if deadline is not None and time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(
                    f"the {job.world_size} ranks did not finish within {deadline_s:.0f} s"
                )
        return torch.load(out_path, weights_only=False)


def _rank_main(rank: int, job: CpuJob, port: int, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_RANK=str(rank),
    )
    # Ranks share the machine's cores; more threads per rank only oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // job.world_size)
    torch.set_num_threads(threads)
    _quiet_expected_warnings(rank)
    import logging

    logging.getLogger("megatron").setLevel(logging.WARNING if rank == 0 else logging.ERROR)

    import torch.distributed as dist

    from polycom_megatron import cpu

    cpu.init_process_group(timeout_s=job.timeout_s)
    try:
        from polycom_megatron.training.cpu_train import train

        result = train(job)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


# Notes megatron-core and torch print in every process of a CPU run, each expected here
# (no Transformer Engine or apex, GPU-only tuning advice, torch renaming collectives that
# megatron-core calls): printed by every rank they only bury the training log.
_IMPORT_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed")
_EXPECTED_WARNINGS = _IMPORT_WARNINGS + (
    "full scope is deprecated",
    "When using sequence parallelism it is recommended to set the environment variable "
    "CUDA_DEVICE_MAX_CONNECTIONS",
)
_EXPECTED_FUTURE_WARNINGS = (
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`load_state_dict` is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",
)


def _quiet_expected_warnings(rank: int) -> None:
    if rank != 0:
        # Other ranks would repeat whatever rank 0 shows.
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    for message in _EXPECTED_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=FutureWarning)


@contextlib.contextmanager
def _server_warnings_quieted():
    """The fork server is a fresh interpreter: it takes its warning filters from
    PYTHONWARNINGS (whose message field matches the start of a message)."""
    before = os.environ.get("PYTHONWARNINGS")
    extra = ",".join(f"ignore:{m}:UserWarning" for m in _IMPORT_WARNINGS)
    os.environ["PYTHONWARNINGS"] = f"{before},{extra}" if before else extra
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
