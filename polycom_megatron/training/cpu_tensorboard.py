"""TensorBoard event files of a CPU run, under Megatron-LM's tag names, so that one
reader (TensorBoard, or a script over ``EventAccumulator``) serves our runs and
Megatron-LM's alike: 'lm loss', 'learning-rate', 'grad-norm', 'batch-size' (each also
'... vs samples'), 'iteration-time' (seconds per iteration), 'lm loss validation' and
'lm loss validation ppl' (also '... vs samples'), and the run's settings as text
summaries tagged by Megatron-LM's argument names.

Written by the last rank, as Megatron-LM does (it holds the last pipeline stage; every
rank has the all-reduced numbers). Needs the ``tensorboard`` package, an optional extra.
"""

from __future__ import annotations

from typing import Optional

from polycom_megatron.data import DEFAULT_DATASET_NAME
from polycom_megatron.training.cpu_job import CpuJob

INSTALL_HINT = "pip install 'polycom-megatron[experiments]'"


def summary_writer_class():
    """torch's SummaryWriter, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def missing_note(job: CpuJob) -> Optional[str]:
    """The one line the launcher prints when no event files can be written."""
    if summary_writer_class() is not None:
        return None
    return (f"note: no TensorBoard logs are written to {job.tensorboard_path} (the tensorboard "
            f"package is missing; {INSTALL_HINT})")


def megatron_args(job: CpuJob, iteration: int) -> dict:
    """The run's settings under Megatron-LM's argument names (``args.<name>``)."""
    polycom = job.polycom
    return dict(
        num_layers=job.layers,
        hidden_size=job.hidden,
        num_attention_heads=job.heads,
        ffn_hidden_size=job.ffn_hidden_size,
        moe_ffn_hidden_size=job.ffn_hidden_size if job.is_moe else None,
        num_experts=job.num_experts if job.is_moe else None,
        moe_router_topk=job.moe_top_k,
        swiglu=job.swiglu,
        polycom_activation=polycom.activation if polycom else "none",
        polycom_gated=polycom.gated if polycom else False,
        polycom_order=polycom.order if polycom else None,
        polycom_eps=polycom.eps if polycom else None,
        polycom_bias=polycom.bias if polycom else None,
        polycom_coeff_mode=polycom.coeff_mode if polycom else None,
        seq_length=job.seq_len,
        max_position_embeddings=job.seq_len,
        micro_batch_size=job.micro_batch,
        global_batch_size=job.global_batch,
        train_iters=job.steps,
        lr=job.lr,
        min_lr=job.lr_floor,
        lr_warmup_iters=job.warmup_steps,
        lr_decay_iters=job.decay_steps,
        lr_decay_style="cosine",
        weight_decay=job.weight_decay,
        clip_grad=job.clip_grad,
        hidden_dropout=job.dropout,
        attention_dropout=job.dropout,
        seed=job.seed,
        split=job.split,
        eval_interval=job.eval_interval,
        eval_iters=job.eval_iters,
        log_interval=job.log_interval,
        save_interval=job.save_interval,
        vocab_size=job.vocab_size,
        padded_vocab_size=job.padded_vocab_size,
        world_size=job.world_size,
        tensor_model_parallel_size=job.tp,
        pipeline_model_parallel_size=job.pp,
        expert_model_parallel_size=job.ep,
        data_parallel_size=job.dp,
        sequence_parallel=job.tp > 1,
        save=str(job.checkpoint_dir),
        data_path=str(job.data_dir / DEFAULT_DATASET_NAME),
        tensorboard_dir=str(job.tensorboard_path),
        iteration=iteration,
        activation=job.variant,  # ours: the variant name of polycom_megatron.variants
    )


class TrainingLog:
    """The event file writer of one run (a no-op on ranks that do not write)."""

    def __init__(self, job: CpuJob, start_iteration: int, writes: bool):
        self.job = job
        self.writer = None
        cls = summary_writer_class() if writes else None
        if cls is None:
            return
        job.tensorboard_path.mkdir(parents=True, exist_ok=True)
        # A resumed run appends a new events file; steps from the resumed iteration on,
        # left by a run that went further before it stopped, are hidden as superseded.
        self.writer = cls(
            log_dir=str(job.tensorboard_path),
            purge_step=start_iteration + 1 if start_iteration else None,
        )
        # As Megatron-LM's write_args_to_tensorboard: one text summary per argument.
        for name, value in megatron_args(job, start_iteration).items():
            self.writer.add_text(name, str(value), global_step=start_iteration)
        self.writer.flush()

    def samples(self, iteration: int) -> int:
        return iteration * self.job.global_batch

    def _pair(self, tag: str, value: float, iteration: int) -> None:
        self.writer.add_scalar(tag, value, iteration)
        self.writer.add_scalar(f"{tag} vs samples", value, self.samples(iteration))

    def step(self, iteration: int, loss: float, lr: float, grad_norm: float) -> None:
        if self.writer is None:
            return
        self._pair("learning-rate", lr, iteration)
        self._pair("batch-size", self.job.global_batch, iteration)
        self._pair("lm loss", loss, iteration)
        self._pair("grad-norm", grad_norm, iteration)

    def iteration_time(self, iteration: int, seconds_per_iteration: float) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("iteration-time", seconds_per_iteration, iteration)
        self.writer.flush()

    def validation(self, iteration: int, loss: float, ppl: float) -> None:
        if self.writer is None:
            return
        self._pair("lm loss validation", loss, iteration)
        self._pair("lm loss validation ppl", ppl, iteration)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
