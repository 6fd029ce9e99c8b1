"""Parallel-equivalence harness: build the same small GPT at a parallel layout, run one
training step through Megatron's real DDP, gradient finalisation and optimizer, and
return loss, full-shape gradients and parameters (gathered across tensor parallelism).

Every equivalence test has one shape: run layout A and layout B from the same seed on
the same batch, then compare what this returns.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch
import torch.distributed as dist

SEED = 1234
VOCAB = 64
SEQ = 16
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: bool = False
    ep: int = 1
    etp: Optional[int] = None
    pp: int = 1

    def __str__(self):
        text = f"tp{self.tp}{'-sp' if self.sp else ''}-ep{self.ep}-etp{self.etp or self.tp}"
        return text + (f"-pp{self.pp}" if self.pp > 1 else "")


def init_parallel(layout: Layout, seed: int = SEED) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    model_parallel_cuda_manual_seed(seed)


def transformer_config(layout: Layout, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        normalization="RMSNorm",
        add_bias_linear=False,
        bias_activation_fusion=False,
        gated_linear_unit=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sp,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def batch(seed: int = SEED):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return tokens[:, :-1], position_ids, mask, tokens[:, 1:]


def build(layout: Layout, polycom, seed: int = SEED, **config_overrides):
    """Model wrapped in Megatron DDP plus its Megatron optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from polycom_megatron.model import build_gpt_model

    init_parallel(layout, seed)
    config = transformer_config(layout, **{**gated_unit(polycom), **config_overrides})
    torch.manual_seed(seed)
    model = build_gpt_model(config, polycom, vocab_size=VOCAB, max_sequence_length=SEQ)
    if config.gated_linear_unit:
        same_glu_fc1_at_every_tp_size(model, seed)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1e9),
        [ddp],
    )
    return config, ddp, optimizer


def gated_unit(polycom) -> dict:
    """The TransformerConfig setting the gated PolyCom form needs (the launchers set it)."""
    return dict(gated_linear_unit=polycom is not None and polycom.gated)


def is_glu_fc1(name: str, config) -> bool:
    """A gated fc1 parameter: each TP rank holds ``[gate shard; up shard]``."""
    return config.gated_linear_unit and ".linear_fc1." in name


@torch.no_grad()
def same_glu_fc1_at_every_tp_size(model, seed: int) -> None:
    """Draw each gated fc1 weight whole (``[gate; up]``) and keep this TP rank's gate and
    up shards. megatron-core 0.16+ initialises it so itself (fc1 stride 2); 0.15 splits
    the whole matrix into contiguous TP blocks, a different model at each TP size."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if not (is_glu_fc1(name, model.config) and name.endswith("weight")):
            continue
        rows = param.shape[0] // 2
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        full = torch.randn(2, rows * tp, *param.shape[1:], generator=g) * model.config.init_method_std
        param.copy_(full[:, rank * rows : (rank + 1) * rows].reshape(param.shape))


def train_step(ddp, optimizer, config, seed: int = SEED):
    """One forward/backward/finalise/step; returns (loss, grad_norm)."""
    from megatron.core.distributed import finalize_model_grads

    tokens, position_ids, mask, labels = batch(seed)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = ddp(tokens, position_ids, mask, labels=labels)
    loss = losses.float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    _, grad_norm, _ = optimizer.step()
    return loss.detach(), grad_norm


def gather_full(param: torch.Tensor, tensor: torch.Tensor, glu: bool = False) -> torch.Tensor:
    """A TP-sharded tensor gathered back to full shape (replicated ones as they are);
    ``glu``: a gated fc1, whose shards are ``[gate_i; up_i]``, gathered to ``[gate; up]``."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    is_expert = not getattr(param, "allreduce", True)
    group = (
        parallel_state.get_expert_tensor_parallel_group()
        if is_expert
        else parallel_state.get_tensor_model_parallel_group()
    )
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    if glu:
        halves = [part.chunk(2, dim=param.partition_dim) for part in parts]
        parts = [half[0] for half in halves] + [half[1] for half in halves]
    return torch.cat(parts, dim=param.partition_dim)


def snapshot(ddp, what: str) -> dict:
    """Full-shape ``main_grad`` ("grad") or parameter values ("param") by name."""
    out = {}
    for name, param in ddp.module.named_parameters():
        tensor = param.main_grad if what == "grad" else param.data
        out[name] = gather_full(param, tensor, glu=is_glu_fc1(name, ddp.module.config))
    return out


def run_layout(layout: Layout, polycom, steps: int = 1, **config_overrides) -> dict:
    """Build at ``layout``, record initial params, gradients of the first step, and
    params after ``steps`` optimizer steps."""
    config, ddp, optimizer = build(layout, polycom, **config_overrides)
    initial = snapshot(ddp, "param")
    loss, grad_norm = train_step(ddp, optimizer, config)
    grads = snapshot(ddp, "grad")
    for step in range(1, steps):
        train_step(ddp, optimizer, config, seed=SEED + step)
    return dict(
        loss=loss,
        grad_norm=torch.tensor(float(grad_norm)),
        initial=initial,
        grads=grads,
        params=snapshot(ddp, "param"),
    )


def assert_same(a: dict, b: dict, rtol=1e-4, atol=1e-5, label=""):
    """Every tensor of ``a`` equals ``b``'s, same names, to fp32 tolerance."""
    assert a.keys() == b.keys(), f"{label}: parameter names differ: {a.keys() ^ b.keys()}"
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{label} {name}: {m}"
        )
