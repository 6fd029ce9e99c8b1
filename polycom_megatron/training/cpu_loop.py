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
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import torch

from polycom_megatron.training import cpu_tensorboard, processes
from polycom_megatron.training.cpu_job import DEFAULT_NUM_EXPERTS, CpuJob, build_parser, job_from_args
from polycom_megatron.training.cpu_resume import choose_checkpoint, confirm_checkpoint
from polycom_megatron.training.processes import RankFailed

SUMMARY_FILE = "summary.json"
# Where the traceback of a rank that failed on a bug goes (the terminal gets one line).
FAILURE_FILE = "failure-traceback.txt"
# What a rank imports: preloaded once by the fork server.
_RANK_MODULE = "polycom_megatron.training.cpu_train"


@dataclass
class RunSummary:
    """The outcome of one ``run``: what the final report prints and summary.json holds."""

    layout: str
    model: str
    activation: str  # the variant name of polycom_megatron.variants ("polynorm", "swiglu", ...)
    ffn_hidden: int
    seed: int
    split: str
    num_parameters: int
    start_iteration: int
    final_iteration: int
    losses: Dict[int, float]
    grad_norms: Dict[int, float]
    learning_rates: Dict[int, float]
    # iteration -> {"loss", "ppl"} on the held-out validation documents
    validation: Dict[int, Dict[str, float]]
    validation_tokens: int  # tokens per validation
    tensorboard_dir: Optional[str]  # None: not written (the tensorboard package is missing)
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
        if self.validation:
            first, last = min(self.validation), max(self.validation)
            shown = [f"{v['loss']:.4f} (ppl {v['ppl']:.2f}) at step {step}"
                     for step, v in sorted(self.validation.items()) if step in (first, last)]
            lines.append(
                f"validation:  {' -> '.join(shown)}, on {self.validation_tokens:,} held-out "
                f"tokens (--split {self.split})"
            )
        if self.tensorboard_dir:
            lines.append(f"tensorboard: {self.tensorboard_dir}")
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
    except KeyboardInterrupt:
        print("interrupted: all ranks stopped; rerun with --resume to continue from the newest "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        _print_error(exc)
        return 2
    except (RankFailed, TimeoutError) as exc:
        _print_error(exc)
        return 1
    print(summary.describe(), flush=True)
    if job.polycom is None:
        print(f"note: not exporting to transformers: the export is for PolyCom models, this "
              f"run trained the {job.variant} baseline", flush=True)
        return 0
    from polycom_megatron.hf.after_training import export_and_sample

    export_and_sample(job)
    return 0


def _print_error(exc: Exception) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def run(
    job: CpuJob, prepare_quietly: bool = False, deadline_s: Optional[float] = None
) -> RunSummary:
    """Check where to start (refusing what must not be loaded), prepare data (once),
    train on ``job.world_size`` local gloo ranks, return the summary (also written to
    ``output_dir/summary.json``). ``deadline_s`` bounds the training processes' wall time
    (TimeoutError after killing them)."""
    job.validate()
    start = choose_checkpoint(job)  # the checks that need no data, before any work
    wall_start = time.perf_counter()
    job = prepare_data(job, quiet=prepare_quietly)
    start = confirm_checkpoint(job, start)
    for note in start.notes:
        print(note, flush=True)
    tensorboard_missing = cpu_tensorboard.missing_note(job)
    if tensorboard_missing:
        print(tensorboard_missing, flush=True)
    print(f"{job.describe_model()}\n{job.describe_layout()}", flush=True)
    try:
        result = _launch(job, start.iteration, deadline_s)
    except RankFailed as exc:
        if exc.traceback:
            job.output_dir.mkdir(parents=True, exist_ok=True)
            (job.output_dir / FAILURE_FILE).write_text(exc.traceback)
            raise RankFailed(f"{exc} (traceback: {job.output_dir / FAILURE_FILE})") from None
        raise
    summary = RunSummary(
        layout=job.describe_layout(),
        model=job.describe_model(),
        activation=job.variant,
        ffn_hidden=job.ffn_hidden_size,
        seed=job.seed,
        split=job.split,
        num_parameters=result.num_parameters,
        start_iteration=result.start_iteration,
        final_iteration=result.final_iteration,
        losses=dict(result.losses),
        grad_norms=dict(result.grad_norms),
        learning_rates=dict(result.learning_rates),
        validation=dict(result.validation),
        validation_tokens=result.validation_tokens,
        tensorboard_dir=None if tensorboard_missing else str(job.tensorboard_path),
        train_seconds=result.train_seconds,
        tokens_trained=result.tokens_trained,
        wall_seconds=time.perf_counter() - wall_start,
        checkpoint_path=result.checkpoint_path,
        checkpoint_bytes=result.checkpoint_bytes,
        resumed_from=result.resumed_from,
    )
    job.output_dir.mkdir(parents=True, exist_ok=True)
    fields = asdict(summary)
    fields["tokens_per_s"] = summary.tokens_per_s
    (job.output_dir / SUMMARY_FILE).write_text(json.dumps(fields, indent=2) + "\n")
    return summary


def prepare_data(job: CpuJob, quiet: bool = False) -> CpuJob:
    """The job with its data in ``job.data_dir``: a prepared directory is used as it is (its
    own vocabulary size; a conflicting ``--vocab-size`` is refused), never replaced; only a
    directory without data is prepared (pydoc corpus, ``job.vocab_size`` or the default)."""
    from polycom_megatron import data

    prepared = data.use_prepared(
        job.data_dir, job.vocab_size, progress=not quiet, report=lambda line: print(line, flush=True)
    )
    return job.replace(vocab_size=prepared.vocab_size)


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


def _launch(job: CpuJob, start_iteration: Optional[int], deadline_s: Optional[float] = None):
    """Start the ranks, wait for them, return rank 0's ``RankResult``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        # Ranks fork from a server process that has imported torch and megatron-core once:
        # importing them in every rank costs each rank several CPU-seconds, and the ranks
        # share the same few cores. (The server runs no torch ops, so forking it is safe.)
        with _server_warnings_quieted():
            processes.launch(
                _rank_main, job.world_size, (job, start_iteration, _free_port(), out_path),
                workdir=tmp, preload=[_RANK_MODULE], deadline_s=deadline_s,
            )
        return torch.load(out_path, weights_only=False)


def _rank_main(rank: int, job: CpuJob, start_iteration: Optional[int], port: int, out_path: str) -> None:
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
    # Inductor compiles the CPU kernels in this process: its worker pool holds semaphores
    # that a killed or interrupted rank leaks, and the resource tracker would then print
    # warnings after our one-line error.
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = 1
    _quiet_expected_warnings(rank)
    import logging

    logging.getLogger("megatron").setLevel(logging.WARNING if rank == 0 else logging.ERROR)

    import torch.distributed as dist

    from polycom_megatron import cpu

    cpu.init_process_group(timeout_s=job.timeout_s)
    try:
        from polycom_megatron.training.cpu_train import train

        result = train(job, start_iteration)
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
