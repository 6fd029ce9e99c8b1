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
from typing import Dict, Iterator, List, Optional

import numpy as np
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
from polycom_megatron.training import checkpoint, common, cpu_resume
from polycom_megatron.training.cpu_job import CpuJob
from polycom_megatron.data import DEFAULT_DATASET_NAME

# The attention mask comes from the dataset rather than being built inside attention:
# Megatron's default causal-mask helper allocates on CUDA.
WITH_ATTENTION_MASK = True


@dataclass
class RankResult:
    """What rank 0 reports back to the launcher."""

    start_iteration: int
    final_iteration: int
    losses: Dict[int, float] = field(default_factory=dict)
    grad_norms: Dict[int, float] = field(default_factory=dict)
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

    dataset = _train_dataset(job)
    batches = _micro_batches(job, dataset, first_iteration=iteration)
    forward_backward = get_forward_backward_func()
    shape = common.BatchShape(job.micro_batch, job.seq_len, WITH_ATTENTION_MASK)

    def forward_step(data_iterator, model_chunk):
        return common.gpt_forward(model_chunk, common.get_batch(data_iterator, shape))

    tokens_per_step = job.global_batch * job.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    train_start = time.perf_counter()
    while iteration < job.steps:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[ddp],
            num_microbatches=job.num_micro_batches,
            seq_length=job.seq_len,
            micro_batch_size=job.micro_batch,
            forward_only=False,
        )
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
        result.losses[iteration] = loss
        result.grad_norms[iteration] = float(grad_norm)
        window_tokens += tokens_per_step
        if iteration % job.log_interval == 0 or iteration == job.steps:
            now = time.perf_counter()
            _print(
                f"iter {iteration:>5}/{job.steps} | loss {loss:.4f} | lr "
                f"{optimizer.param_groups[0]['lr']:.3e} | grad norm {float(grad_norm):.3f} | "
                f"{window_tokens / (now - window_start):,.0f} tokens/s"
            )
            window_start, window_tokens = now, 0
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
        # On for --polycom-gated only: fc1 then holds [gate, up] (PolyNorm-GLU).
        gated_linear_unit=job.polycom is not None and job.polycom.gated,
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
        min_lr=_min_lr(job),
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
        min_lr=_min_lr(job),
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


def _min_lr(job: CpuJob) -> float:
    return job.min_lr if job.min_lr is not None else job.lr / 10


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
# Data
# --------------------------------------------------------------------------------------


def _train_dataset(job: CpuJob):
    """One epoch of the prepared corpus as a GPTDataset (on the ranks that read data).

    Its length does not depend on --steps, so a run cut short and resumed sees exactly
    the samples of a run that went straight through; epochs repeat via ``_micro_batches``.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(job.data_dir / "tokenizer.model"),
        metadata_path={"library": "sentencepiece"},
    )
    config = common.gpt_dataset_config(
        seed=job.seed,
        seq_length=job.seq_len,
        tokenizer=tokenizer,
        blend=([str(job.data_dir / DEFAULT_DATASET_NAME)], None),
        split="100,0,0",
        # In the run, not the data directory: that may be shared, read-only, or the user's.
        path_to_cache=str(job.output_dir / "index-cache"),
        create_attention_mask=WITH_ATTENTION_MASK,
    )
    train_ds, _, _ = common.build_gpt_datasets(config, [None, None, None])
    if train_ds is not None and len(train_ds) < job.global_batch:
        raise ValueError(
            f"the corpus yields only {len(train_ds)} sequences of {job.seq_len} tokens, fewer "
            f"than one global batch ({job.global_batch}); lower --seq-len or --global-batch"
        )
    return train_ds


def _micro_batches(job: CpuJob, dataset, first_iteration: int) -> Optional[Iterator[dict]]:
    """This rank's micro-batches from ``first_iteration`` on, as Megatron's pretraining
    sampler lays them out: each step takes the next ``global_batch`` samples; every
    micro-batch round takes ``micro_batch x DP`` of them and DP rank r gets the r-th slice.
    Each pass over the data uses a fresh permutation seeded by (seed, epoch)."""
    if dataset is None:
        return None
    n = len(dataset)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), job.dp

    def sample_ids(position: int) -> int:
        epoch, offset = divmod(position, n)
        return int(_epoch_order(job.seed, epoch, n)[offset])

    def generate():
        position = first_iteration * job.global_batch
        while True:
            start = position + dp_rank * job.micro_batch
            samples = [dataset[sample_ids(p)] for p in range(start, start + job.micro_batch)]
            yield torch.utils.data.default_collate(samples)
            position += job.micro_batch * dp

    return generate()


_EPOCH_ORDERS: Dict[tuple, np.ndarray] = {}


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _EPOCH_ORDERS:
        _EPOCH_ORDERS.clear()  # only the current epoch is ever needed again
        _EPOCH_ORDERS[key] = np.random.RandomState((seed + 7919 * epoch) % 2**32).permutation(n)
    return _EPOCH_ORDERS[key]


# --------------------------------------------------------------------------------------
# Reporting and saving
# --------------------------------------------------------------------------------------


def _global_loss(reports: List[dict]) -> float:
    """Token-weighted mean LM loss of the step over all micro-batches and DP ranks.

    Reports exist on the last pipeline stage only, identical across its TP ranks; TP
    rank 0 of the last stage contributes, everyone else adds zeros, and one all-reduce
    over the world gives every rank the same number.
    """
    totals = torch.zeros(2, dtype=torch.float64)
    contributes = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    if contributes:
        for report in reports:
            totals += report["lm loss"].detach().to(torch.float64).cpu()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


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
