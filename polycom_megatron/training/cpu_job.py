"""The CPU training job: its settings (``CpuJob``), its command-line flags, and the checks
that turn a layout Megatron would reject deep inside its initialisation into one clear
error up front.

Layout: ``world = TP x PP x DP``. Experts are split over expert parallelism (EP) inside
the same world: each expert is tensor-parallel over ETP = TP ranks, so
``world = ETP x EP x expert-DP x PP``; EP therefore runs across the data-parallel
dimension and must divide DP. With 4 ranks, TP=2 and EP=2: TP pairs {0,1} and {2,3},
DP pairs {0,2} and {1,3}, and the two experts' groups are the two DP pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from polycom_megatron.config import PolyComConfig, add_polycom_args
from polycom_megatron.data.cli import vocab_size_arg
from polycom_megatron.data.tokenizer import DEFAULT_VOCAB_SIZE
from polycom_megatron.cli_types import (
    OneLineErrorParser,
    integer,
    non_negative_int,
    non_negative_float,
    positive_int,
    positive_float,
    real,
)

# Megatron pads the vocabulary so each TP shard of the embedding is a multiple of this.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
DEFAULT_NUM_EXPERTS = 4
DEFAULT_EP = 2
# A tenth of the documents for validation: the default corpus has few, long ones.
DEFAULT_SPLIT = "90,10,0"


@dataclass(frozen=True)
class CpuJob:
    """Everything one CPU run needs; ``cpu_loop.main`` builds it from the flags."""

    output_dir: Path = Path("runs/cpu-demo")
    steps: int = 100
    world_size: int = 4
    tp: int = 2
    pp: int = 1
    ep: int = 1
    num_experts: int = 0  # 0: dense MLPs
    moe_top_k: int = 2
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    ffn_hidden: Optional[int] = None  # dense: 4 x hidden; experts: 2 x hidden
    seq_len: int = 128
    micro_batch: int = 4
    global_batch: int = 16
    lr: float = 3e-3
    min_lr: Optional[float] = None  # lr / 10
    lr_warmup_steps: Optional[int] = None  # a tenth of the decay steps
    lr_decay_steps: Optional[int] = None  # steps
    dropout: float = 0.0
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    save_interval: int = 0  # 0: save only at the end
    resume: bool = False
    resume_fallback: bool = False  # resume from the newest intact checkpoint if need be
    overwrite: bool = False  # discard the checkpoints of an earlier run in output_dir
    vocab_size: Optional[int] = None  # None: the prepared data's (the default when preparing)
    polycom: Optional[PolyComConfig] = PolyComConfig(activation="polynorm")
    timeout_s: float = 600.0
    data: Optional[Path] = None  # prepared data; default output_dir/data
    swiglu: bool = False  # with polycom None: Megatron's SwiGLU MLP instead of GELU
    # Megatron-LM's --split: train, validation, test shares of the documents (corpus order).
    split: str = DEFAULT_SPLIT
    eval_interval: int = 25  # steps between validations (and one at the end)
    eval_iters: int = 4  # global batches per validation; 0: no validation
    tensorboard_dir: Optional[Path] = None  # default output_dir/tensorboard

    # ---- derived values -----------------------------------------------------------

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return (2 if self.is_moe else 4) * self.hidden

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("the vocabulary size is known once cpu_loop.prepare_data has run")
        multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * self.tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.steps

    @property
    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return self.decay_steps // 10

    @property
    def lr_floor(self) -> float:
        """The cosine schedule's floor: --min-lr, or a tenth of --lr."""
        return self.min_lr if self.min_lr is not None else self.lr / 10

    @property
    def data_dir(self) -> Path:
        return self.data if self.data is not None else self.output_dir / "data"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def tensorboard_path(self) -> Path:
        return self.tensorboard_dir if self.tensorboard_dir is not None else (
            self.output_dir / "tensorboard"
        )

    @property
    def variant(self) -> str:
        """The FFN variant's name in ``polycom_megatron.variants`` ("swiglu", "polynorm", ...)."""
        if self.polycom is not None:
            return self.polycom.name
        return "swiglu" if self.swiglu else "gelu"

    @property
    def split_shares(self) -> tuple:
        """``split`` as (train, valid, test) fractions summing to 1."""
        return split_shares(self.split)

    def describe_layout(self) -> str:
        text = f"{self.world_size} ranks = TP {self.tp} x PP {self.pp} x DP {self.dp}"
        if self.is_moe:
            text += f"; {self.num_experts} experts, top-{self.moe_top_k}, EP {self.ep} (ETP {self.tp})"
        return text

    def describe_model(self) -> str:
        act = self.variant if self.polycom else f"{self.variant} (stock Megatron MLP)"
        kind = f"MoE {self.num_experts}x{self.ffn_hidden_size}" if self.is_moe else (
            f"dense FFN {self.ffn_hidden_size}"
        )
        return (
            f"GPT {self.layers} layers, hidden {self.hidden}, {self.heads} heads, {kind}, "
            f"{act}, seq {self.seq_len}, vocab {self.vocab_size} (padded {self.padded_vocab_size})"
        )

    def replace(self, **changes) -> "CpuJob":
        return dataclasses.replace(self, **changes)

    # ---- checks -------------------------------------------------------------------

    def validate(self) -> "CpuJob":
        """Raise ValueError naming the first inconsistent setting and how to fix it."""
        positive = dict(
            steps=self.steps, world_size=self.world_size, tp=self.tp, pp=self.pp, ep=self.ep,
            layers=self.layers, hidden=self.hidden, heads=self.heads, seq_len=self.seq_len,
            micro_batch=self.micro_batch, global_batch=self.global_batch,
            log_interval=self.log_interval, moe_top_k=self.moe_top_k,
            eval_interval=self.eval_interval,
        )
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.world_size > 4:
            raise ValueError(
                f"--world-size {self.world_size}: the CPU job runs at most 4 ranks (each is a "
                "process on this machine); use 1, 2 or 4"
            )
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"--world-size {self.world_size} is not divisible by TP x PP = {self.tp} x "
                f"{self.pp}; pick --tp/--pp whose product divides the world size"
            )
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not divisible by --heads {self.heads}")
        if self.heads % self.tp:
            raise ValueError(
                f"--heads {self.heads} is not divisible by --tp {self.tp}: each TP rank holds "
                "whole attention heads"
            )
        if self.ffn_hidden_size % self.tp:
            raise ValueError(
                f"FFN width {self.ffn_hidden_size} is not divisible by --tp {self.tp}; set "
                "--ffn-hidden to a multiple of it"
            )
        if self.layers % self.pp:
            raise ValueError(
                f"--layers {self.layers} is not divisible by --pp {self.pp}: every pipeline "
                "stage holds the same number of layers"
            )
        if self.tp > 1 and self.seq_len % self.tp:
            raise ValueError(
                f"--seq-len {self.seq_len} is not divisible by --tp {self.tp} (sequence "
                "parallelism splits the sequence over TP ranks)"
            )
        per_step = self.micro_batch * self.dp
        if self.global_batch % per_step:
            raise ValueError(
                f"--global-batch {self.global_batch} is not divisible by --micro-batch x DP = "
                f"{self.micro_batch} x {self.dp}; use a multiple of {per_step}"
            )
        self._validate_moe()
        if self.save_interval < 0:
            raise ValueError(f"--save-interval must be 0 (end only) or positive, got {self.save_interval}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.lr) and self.lr > 0) or (
            self.min_lr is not None and not 0 <= self.min_lr <= self.lr
        ):
            raise ValueError("--lr must be positive and finite and --min-lr between 0 and --lr")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout_s}")
        if self.resume_fallback and not self.resume:
            raise ValueError("--resume-fallback only applies with --resume")
        if self.overwrite and self.resume:
            raise ValueError(
                "--overwrite discards the old checkpoints, --resume continues from them: pick one"
            )
        self._validate_kernel()
        self._validate_activation()
        self._validate_split()
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                f"--lr-warmup-steps {self.warmup_steps} exceeds the decay steps {self.decay_steps}"
            )
        return self

    def _validate_activation(self) -> None:
        from polycom_megatron.config import activation_flag_conflicts

        conflicts = activation_flag_conflicts(
            argparse.Namespace(swiglu=self.swiglu, ffn_hidden_size=self.ffn_hidden_size),
            self.polycom
        )
        if conflicts:
            raise ValueError(conflicts[0])

    def _validate_split(self) -> None:
        train, valid, _ = self.split_shares
        if train == 0:
            raise ValueError(f"--split {self.split} leaves no documents to train on; give "
                             "the first (training) share a positive weight, e.g. --split 90,10,0")
        if valid == 0 and self.eval_iters:
            raise ValueError(
                f"--split {self.split} holds out no validation documents; give the second "
                "share a positive weight (e.g. --split 90,10,0) or pass --eval-iters 0"
            )
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters must be 0 (no validation) or more, got {self.eval_iters}")

    def _validate_kernel(self) -> None:
        if self.polycom is None or self.polycom.kernel != "triton":
            return
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError(
                "--polycom-kernel triton needs Triton, which is not installed; use "
                "--polycom-kernel torch (or pip install 'polycom-megatron[triton]')"
            )
        import torch

        # The CPU job's tensors live on the CPU: Triton runs them only in its interpreter.
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "--polycom-kernel triton needs CUDA (the CPU job runs on CPU tensors); use "
                "--polycom-kernel torch, or set TRITON_INTERPRET=1 to run the kernels in "
                "Triton's interpreter"
            )

    def _validate_moe(self) -> None:
        if not self.is_moe:
            if self.ep != 1:
                raise ValueError(
                    f"--ep {self.ep} needs experts: set --num-experts (a multiple of the EP size)"
                )
            return
        if self.num_experts % self.ep:
            raise ValueError(
                f"--num-experts {self.num_experts} is not divisible by --ep {self.ep}: each "
                "expert-parallel rank holds the same number of experts"
            )
        if self.dp % self.ep:
            raise ValueError(
                f"--ep {self.ep} must divide the data-parallel size {self.dp} (= world / "
                f"(TP x PP)); experts are spread across data-parallel ranks"
            )
        if self.moe_top_k > self.num_experts:
            raise ValueError(
                f"--moe-top-k {self.moe_top_k} exceeds --num-experts {self.num_experts}"
            )


def split_shares(split: str) -> tuple:
    """Megatron-LM's split string ("90,10,0"; missing shares are 0) as (train, valid, test)
    fractions; ValueError naming --split for anything else."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or (
        sum(weights) <= 0
    ):
        raise ValueError(
            f"--split {split!r}: expected up to three non-negative weights for the train, "
            "validation and test documents, as Megatron-LM's --split (e.g. 90,10,0)"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return tuple(w / total for w in weights)


def split_arg(text: str) -> str:
    """argparse type of --split: the string as given (spaces dropped), once it parses."""
    try:
        split_shares(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    return text.replace(" ", "")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser(prog: str = "polycom-megatron train-cpu") -> argparse.ArgumentParser:
    d = CpuJob()
    p = OneLineErrorParser(
        prog=prog,
        description="Prepare data and train a tiny PolyCom GPT with Megatron-Core on CPU "
        "ranks (gloo): tensor, expert and data parallelism, checkpoints, exact resume.",
        allow_abbrev=False,
    )
    p.add_argument("--output-dir", type=Path, default=d.output_dir,
                   help="data, checkpoints and the summary go here (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the prepared corpus, tokenizer and dataset live (prepared there "
                   "if missing; default: OUTPUT_DIR/data)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="train until this iteration")
    p.add_argument("--world-size", type=positive_int, default=d.world_size, help="ranks (processes), <= 4")
    p.add_argument("--tp", type=positive_int, default=d.tp, help="tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=d.pp, help="pipeline-parallel size")
    p.add_argument("--ep", type=positive_int, default=None,
                   help=f"expert-parallel size (default: {DEFAULT_EP} with experts, else 1)")
    p.add_argument("--num-experts", type=non_negative_int, default=None,
                   help=f"experts per MoE layer; 0 = dense (default: {DEFAULT_NUM_EXPERTS} when "
                   "PolyCom experts are available in this build, else 0)")
    p.add_argument("--moe-top-k", type=positive_int, default=d.moe_top_k, help="experts per token")
    p.add_argument("--layers", type=positive_int, default=d.layers)
    p.add_argument("--hidden", type=positive_int, default=d.hidden)
    p.add_argument("--heads", type=positive_int, default=d.heads)
    p.add_argument("--ffn-hidden", "--ffn-hidden-size", dest="ffn_hidden", type=positive_int,
                   default=None, help="FFN width (default: 4 x hidden dense, 2 x hidden per "
                   "expert; --ffn-hidden-size is Megatron-LM's name)")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len)
    p.add_argument("--micro-batch", type=positive_int, default=d.micro_batch, help="sequences per micro-batch")
    p.add_argument("--global-batch", type=positive_int, default=d.global_batch,
                   help="sequences per optimizer step (micro-batch x DP x micro-batches)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr", type=non_negative_float, default=None, help="cosine floor (default: lr / 10)")
    p.add_argument("--lr-warmup-steps", type=non_negative_int, default=None,
                   help="linear warm-up (default: a tenth of the decay steps)")
    p.add_argument("--lr-decay-steps", type=positive_int, default=None,
                   help="cosine decay horizon (default: --steps). A resumed run keeps the "
                   "schedule stored in its checkpoint, so to stop early and extend later, set "
                   "this to the final length")
    p.add_argument("--dropout", type=real(0.0, 1.0, high_open=True), default=d.dropout,
                   help="hidden and attention dropout (draws on the RNG a checkpoint restores)")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    p.add_argument("--clip-grad", type=non_negative_float, default=d.clip_grad)
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=d.seed)
    p.add_argument("--log-interval", type=positive_int, default=d.log_interval, help="steps between log lines")
    p.add_argument("--save-interval", type=non_negative_int, default=d.save_interval,
                   help="steps between checkpoints (0: only at the end; one is always saved "
                   "at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir up to --steps "
                   "(verified against its checksums and this run's flags first)")
    p.add_argument("--resume-fallback", action="store_true",
                   help="with --resume: if the newest checkpoint is damaged, resume from the "
                   "newest intact one (the damaged ones are renamed iter_N.damaged)")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch although --output-dir holds checkpoints: they "
                   "are deleted (without it such a run is refused)")
    p.add_argument("--vocab-size", type=vocab_size_arg, default=None,
                   help="tokenizer vocabulary when train-cpu prepares the data (default: "
                   f"{DEFAULT_VOCAB_SIZE}); prepared data is used with its own")
    p.add_argument("--timeout", type=positive_float, default=d.timeout_s,
                   help="seconds a collective may wait before the run is declared hung")
    p.add_argument("--split", type=split_arg, default=d.split,
                   help="train, validation and test shares of the documents, as Megatron-LM's "
                   "--split (document level: validation documents are never trained on; "
                   "default: %(default)s)")
    p.add_argument("--eval-interval", type=positive_int, default=d.eval_interval,
                   help="steps between validations; one also runs at the end (default: %(default)s)")
    p.add_argument("--eval-iters", type=non_negative_int, default=d.eval_iters,
                   help="global batches of the validation split per validation, the same ones "
                   "every time; 0: no validation (default: %(default)s)")
    p.add_argument("--tensorboard-dir", type=Path, default=None,
                   help="TensorBoard event files, with Megatron-LM's tags (default: "
                   "OUTPUT_DIR/tensorboard; needs the tensorboard package)")
    p.add_argument("--swiglu", action="store_true",
                   help="with --polycom-activation none: Megatron's SwiGLU MLP (the baseline; "
                   "without it, none is the GELU MLP)")
    add_polycom_args(p)
    # The CPU demo is about PolyCom: PolyNorm unless told otherwise ('none' = stock MLP).
    p.set_defaults(polycom_activation="polynorm")
    return p


def job_from_args(args: argparse.Namespace, experts_available: bool) -> CpuJob:
    """A validated job. ``experts_available`` decides the MoE defaults (see ``--num-experts``)."""
    num_experts = args.num_experts
    if num_experts is None:
        num_experts = DEFAULT_NUM_EXPERTS if experts_available else 0
    ep = args.ep if args.ep is not None else (DEFAULT_EP if num_experts else 1)
    return CpuJob(
        output_dir=args.output_dir,
        steps=args.steps,
        world_size=args.world_size,
        tp=args.tp,
        pp=args.pp,
        ep=ep,
        num_experts=num_experts,
        moe_top_k=args.moe_top_k,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        ffn_hidden=args.ffn_hidden,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        global_batch=args.global_batch,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=args.lr_decay_steps,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        seed=args.seed,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume=args.resume,
        resume_fallback=args.resume_fallback,
        overwrite=args.overwrite,
        vocab_size=args.vocab_size,
        polycom=PolyComConfig.from_args(args),
        timeout_s=args.timeout,
        data=args.data_dir,
        swiglu=args.swiglu,
        split=args.split,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        tensorboard_dir=args.tensorboard_dir,
    ).validate()
