"""One rank of the CPU training job: model, optimizer, data and the step loop, all
megatron-core's own pieces (parallel state, GPTModel from our specs, DDP, the Megatron
optimizer and LR scheduler, the forward/backward schedule, GPTDataset, dist_checkpointing).

Runs inside a process whose gloo group is already up (see ``cpu_loop``). Rank 0 prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron.model import build_gpt_model
from polycom_megatron.variants import GATED
from polycom_megatron.training import checkpoint, common, cpu_data, cpu_resume
from polycom_megatron.training.cpu_data import WITH_ATTENTION_MASK
from polycom_megatron.training.cpu_job import CpuJob
from polycom_megatron.training.cpu_tensorboard import TrainingLog


@dataclass
class RankResult:
    """What rank 0 reports back to the launcher."""

    start_iteration: int
    final_iteration: int
    losses: Dict[int, float] = field(default_factory=dict)
    grad_norms: Dict[int, float] = field(default_factory=dict)
    learning_rates: Dict[int, float] = field(default_factory=dict)
    # iteration -> {"loss": token-weighted mean LM loss on the validation split, "ppl": exp(loss)}
    validation: Dict[int, Dict[str, float]] = field(default_factory=dict)
    validation_tokens: int = 0
    train_seconds: float = 0.0
    tokens_trained: int = 0
    num_parameters: int = 0
    checkpoint_path: Optional[str] = None
    checkpoint_bytes: int = 0
    resumed_from: Optional[str] = None
    rng_restored: Optional[bool] = None


def train(job: CpuJob, start_from: Optional[int] = None) -> RankResult:
    """Build everything, resume from checkpoint ``start_from`` (an iteration the launcher
    has verified) if given, train to ``job.steps``, save; collective."""
    _init_parallel(job)
    config = transformer_config(job)
    torch.manual_seed(job.seed)
    model = build_gpt_model(
        config,
        job.polycom,
        vocab_size=job.padded_vocab_size,
        max_sequence_length=job.seq_len,
        use_te=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        model,
    )
    optimizer = get_megatron_optimizer(_optimizer_config(job), [ddp])
    scheduler = _scheduler(job, optimizer)
    # What Megatron's training loop wires into the config for the schedule to call.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_scale_func = optimizer.scale_loss

    result = RankResult(start_iteration=0, final_iteration=0)
    result.num_parameters = _count_parameters(model)
    iteration = 0
    if start_from is not None:
        loaded = checkpoint.load_checkpoint(
            job.checkpoint_dir, model, optimizer, scheduler, iteration=start_from
        )
        iteration = loaded.iteration
        result.resumed_from, result.rng_restored = str(loaded.path), loaded.rng_restored
        _print(
            f"resumed from {loaded.path} at iteration {iteration}"
            + ("" if loaded.rng_restored else " (RNG not restored: different world size)")
        )
        if iteration >= job.steps:
            _print(f"nothing to do: the checkpoint is at {iteration} >= --steps {job.steps}")
    result.start_iteration = iteration

    dataset = cpu_data.train_dataset(job)
    batches = cpu_data.micro_batches(job, dataset, first_iteration=iteration)
    valid_dataset = cpu_data.validation_dataset(job)
    shape = common.BatchShape(job.micro_batch, job.seq_len, WITH_ATTENTION_MASK)

    def forward_step(data_iterator, model_chunk):
        return common.gpt_forward(model_chunk, common.get_batch(data_iterator, shape))

    def validate():
        loss, tokens = _evaluate(job, ddp, forward_step, valid_dataset)
        ppl = math.exp(loss) if loss < 700 else math.inf
        result.validation[iteration] = dict(loss=loss, ppl=ppl)
        result.validation_tokens = tokens
        log.validation(iteration, loss, ppl)
        _print(
            f"validation loss at iteration {iteration:>5} | lm loss value: {loss:.4f} | "
            f"lm loss PPL: {ppl:.3f} | {tokens:,} tokens"
        )

    # Megatron-LM's writer: the last rank.
    log = TrainingLog(job, iteration, writes=dist.get_rank() == dist.get_world_size() - 1)

    tokens_per_step = job.global_batch * job.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    train_start = time.perf_counter()
    while iteration < job.steps:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = _run_schedule(job, ddp, forward_step, batches, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {iteration + 1} was skipped (inf/NaN gradients)")
        scheduler.step(increment=1)
        iteration += 1
        loss = _global_loss(reports)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at iteration {iteration}; lower --lr or check the data"
            )
        lr = optimizer.param_groups[0]["lr"]
        result.losses[iteration] = loss
        result.grad_norms[iteration] = float(grad_norm)
        result.learning_rates[iteration] = lr
        log.step(iteration, loss, lr, float(grad_norm))
        window_tokens += tokens_per_step
        if iteration % job.log_interval == 0 or iteration == job.steps:
            now = time.perf_counter()
            _print(
                f"iter {iteration:>5}/{job.steps} | loss {loss:.4f} | lr "
                f"{lr:.3e} | grad norm {float(grad_norm):.3f} | "
                f"{window_tokens / (now - window_start):,.0f} tokens/s"
            )
            log.iteration_time(iteration, (now - window_start) / (window_tokens / tokens_per_step))
            window_start, window_tokens = now, 0
        if job.eval_iters and (iteration % job.eval_interval == 0 or iteration == job.steps):
            eval_start = time.perf_counter()
            validate()  # collective: every rank evaluates
            # Evaluation time is not training time.
            window_start += time.perf_counter() - eval_start
            train_start += time.perf_counter() - eval_start
        if job.save_interval and iteration % job.save_interval == 0 and iteration < job.steps:
            _save(job, iteration, model, optimizer, scheduler)
    result.train_seconds = time.perf_counter() - train_start
    result.tokens_trained = (iteration - result.start_iteration) * tokens_per_step
    result.final_iteration = iteration

    path = checkpoint.iteration_dir(job.checkpoint_dir, iteration)
    if iteration > result.start_iteration or not path.is_dir():
        path = _save(job, iteration, model, optimizer, scheduler)
    result.checkpoint_path = str(path)
    if dist.get_rank() == 0:
        result.checkpoint_bytes = checkpoint.size_on_disk(path)
    log.close()
    parallel_state.destroy_model_parallel()
    return result


# --------------------------------------------------------------------------------------
# Model, optimizer, scheduler
# --------------------------------------------------------------------------------------


def _init_parallel(job: CpuJob) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=job.tp,
        pipeline_model_parallel_size=job.pp,
        expert_model_parallel_size=job.ep,
    )
    # Seeds the default generator and Megatron's named (TP / expert) RNG streams.
    model_parallel_cuda_manual_seed(job.seed)


def transformer_config(job: CpuJob) -> TransformerConfig:
    """The tiny Llama-style GPT: RMSNorm, RoPE, no biases, fp32 on CPU."""
    fields = dict(
        num_layers=job.layers,
        hidden_size=job.hidden,
        num_attention_heads=job.heads,
        ffn_hidden_size=job.ffn_hidden_size,
        normalization="RMSNorm",
        add_bias_linear=False,
        # On for --polycom-gated (fc1 holds [gate, up]: PolyNorm-GLU) and --swiglu.
        gated_linear_unit=job.variant in GATED,
        # Megatron's MLP applies this to the gate (SwiGLU) or to fc1's output (GELU);
        # a PolyCom MLP replaces it.
        activation_func=torch.nn.functional.silu if job.swiglu else torch.nn.functional.gelu,
        # PolyCom is not one of the activations Megatron's bias-activation fusion knows.
        bias_activation_fusion=False,
        hidden_dropout=job.dropout,
        attention_dropout=job.dropout,
        init_method_std=0.02,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=job.tp,
        pipeline_model_parallel_size=job.pp,
        expert_model_parallel_size=job.ep,
        # Megatron requires sequence parallelism for MoE under TP; dense runs use it too so
        # that both take the same path.
        sequence_parallel=job.tp > 1,
    )
    if job.is_moe:
        fields.update(
            num_moe_experts=job.num_experts,
            moe_router_topk=job.moe_top_k,
            moe_ffn_hidden_size=job.ffn_hidden_size,
            # gloo's all_to_all cannot take the alltoall dispatcher's split sizes.
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,
            moe_z_loss_coeff=1e-3,
            moe_grouped_gemm=False,
        )
    return TransformerConfig(**fields)


def _optimizer_config(job: CpuJob) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=job.lr,
        min_lr=job.lr_floor,
        weight_decay=job.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=job.clip_grad,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        use_distributed_optimizer=False,
    )


def _scheduler(job: CpuJob, optimizer) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=job.lr,
        min_lr=job.lr_floor,
        lr_warmup_steps=job.warmup_steps,
        lr_decay_steps=job.decay_steps,
        lr_decay_style="cosine",
        start_wd=job.weight_decay,
        end_wd=job.weight_decay,
        wd_incr_steps=job.decay_steps,
        wd_incr_style="constant",
        # On resume the schedule in the checkpoint wins: the run continues as planned.
        use_checkpoint_opt_param_scheduler=True,
    )


def _count_parameters(model) -> int:
    """Parameters of the whole model: local shards summed over TP, PP and EP (replicas once)."""
    local = 0
    for param in model.parameters():
        # A tensor-parallel shard counts on every TP rank, a replicated one on TP rank 0;
        # expert parameters are unique per EP rank, the rest are replicated across DP.
        if getattr(param, "tensor_model_parallel", False) or (
            parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            if not getattr(param, "allreduce", True):  # expert parameter
                local += param.numel() if parallel_state.get_expert_data_parallel_rank() == 0 else 0
            elif parallel_state.get_data_parallel_rank() == 0:
                local += param.numel()
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


# --------------------------------------------------------------------------------------
# Reporting and saving
# --------------------------------------------------------------------------------------


def _global_loss(reports: List[dict]) -> float:
    """Token-weighted mean LM loss of the step over all micro-batches and DP ranks.

    Reports exist on the last pipeline stage only, identical across its TP ranks; TP
    rank 0 of the last stage contributes, everyone else adds zeros, and one all-reduce
    over the world gives every rank the same number.
    """
    totals = _loss_totals(reports)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def _loss_totals(reports: List[dict]) -> torch.Tensor:
    """This rank's (sum of token losses, tokens): nonzero on TP rank 0 of the last stage."""
    totals = torch.zeros(2, dtype=torch.float64)
    contributes = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if contributes:
        for report in reports:
            totals += report["lm loss"].detach().to(torch.float64).cpu()
    return totals


def _run_schedule(job: CpuJob, ddp, forward_step, batches, forward_only: bool) -> List[dict]:
    """One global batch through megatron-core's forward(/backward) schedule."""
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=job.num_micro_batches,
        seq_length=job.seq_len,
        micro_batch_size=job.micro_batch,
        forward_only=forward_only,
    )


def _evaluate(job: CpuJob, ddp, forward_step, dataset) -> tuple:
    """(token-weighted mean LM loss, tokens) over the first ``--eval-iters`` global batches
    of the validation split, as Megatron-LM's evaluate: eval mode, no gradients, the
    forward-only schedule, sums of (loss, tokens) over micro-batches and DP ranks. The
    RNG states are put back afterwards, so training goes on exactly as without it."""
    rng = checkpoint.get_rng_state()
    batches = cpu_data.validation_batches(job, dataset)
    totals = torch.zeros(2, dtype=torch.float64)
    ddp.eval()
    try:
        with torch.no_grad():
            for _ in range(job.eval_iters):
                reports = _run_schedule(job, ddp, forward_step, batches, forward_only=True)
                totals += _loss_totals(reports)
    finally:
        ddp.train()
        checkpoint.set_rng_state(rng)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]), int(totals[1])


def _save(job: CpuJob, iteration: int, model, optimizer, scheduler):
    start = time.perf_counter()
    train_state = dict(
        layout=job.describe_layout(), model=job.describe_model(), steps=job.steps,
        # The whole job (as plain JSON values), so export-hf can rebuild the model from
        # the checkpoint alone.
        job=json.loads(json.dumps(dataclasses.asdict(job), default=str)),
    )
    path = checkpoint.save_checkpoint(
        job.checkpoint_dir, iteration, model, optimizer, scheduler, train_state,
        fingerprint=cpu_resume.fingerprint(job),
    )
    _print(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")
    return path


def _print(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)
