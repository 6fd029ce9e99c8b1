"""MoE parallel-equivalence harness, on top of ``gpt_harness``.

Two things differ from the dense harness:

* Weights. Megatron draws expert weights from one RNG stream per rank, so EP=1 and EP=4
  would start from different experts (and everything drawn after them). ``set_weights_by_key``
  overwrites every randomly initialised parameter with values that depend only on its
  checkpoint key and global position, read from the model's ``sharded_state_dict``: the
  same model at every layout and in every expert backend (their checkpoint keys agree).
* Gathering. Each EP rank holds different experts, so full tensors are assembled from
  the ``sharded_state_dict`` too (global shape, offset, replica id), over all ranks.
  Non-main replicas are checked to be bit-identical to the main one.

Data differ per data-parallel rank (two batches, by DP rank parity), so EP ranks route
different tokens and every gradient reduction is exercised; any layout with an even DP
size then trains on the same mean of those two batches. Rank 0 always holds batch 0.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

import gpt_harness as h
from polycom_megatron import compat

# A small MoE GPT: layer 0 dense, layer 1 MoE with 4 experts (top-2) and a shared expert.
MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=24,
    moe_shared_expert_intermediate_size=16,
    moe_layer_freq=[0, 1],
    moe_token_dispatcher_type="allgather",
    moe_router_load_balancing_type="none",
    moe_aux_loss_coeff=0.0,
)
INIT_STD = 0.05


_current_layout = None


def init_parallel(layout: h.Layout) -> None:
    """``gpt_harness.init_parallel``, skipped when the layout is already set up: creating
    the process groups is most of a build's time on CPU, so callers run the same layout
    back to back. Only the seed is reset then (weights come from set_weights_by_key)."""
    global _current_layout
    if layout == _current_layout:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(h.SEED)
        return
    h.init_parallel(layout)
    _current_layout = layout


def build(layout: h.Layout, polycom, salt: str = "", **overrides):
    """Model (same weights at every layout) in Megatron DDP, plus its optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from polycom_megatron.model import build_gpt_model

    from megatron.core import parallel_state

    init_parallel(layout)
    staged = {}
    if layout.pp > 1:
        # Each stage builds its own layers; activations cross stages in fp32.
        overrides = dict(pipeline_dtype=torch.float32, **overrides)
        staged = dict(
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    config = h.transformer_config(layout, **{**MOE, **h.gated_unit(polycom), **overrides})
    model = build_gpt_model(
        config, polycom, vocab_size=h.VOCAB, max_sequence_length=h.SEQ, **staged
    )
    set_weights_by_key(model, salt)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    # Adam's eps: with the default 1e-8, a gradient of ~1e-8 (there are some in attention)
    # moves its weight by lr * g / (|g| + eps), so its fp32 round-off between layouts
    # (~5e-10) became 4% of a step; at 1e-6 the same round-off is 1e-8 of the weight.
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1e9, adam_eps=1e-6),
        [ddp],
    )
    return config, ddp, optimizer


def train_step(ddp, optimizer, step: int = 0):
    """One forward/backward/finalise/step on this DP rank's batch; (loss, grad_norm)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    tokens, position_ids, mask, labels = h.batch(h.SEED + 2 * step + dp_rank % 2)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        loss = _pipeline_forward_backward(ddp, (tokens, position_ids, mask, labels))
    else:
        loss = ddp(tokens, position_ids, mask, labels=labels).float().mean()
        loss.backward()
    finalize_model_grads([ddp])
    _, grad_norm, _ = optimizer.step()
    return loss.detach(), torch.tensor(float(grad_norm))


def _pipeline_forward_backward(ddp, batch) -> torch.Tensor:
    """One micro-batch through Megatron's pipeline schedule; the loss of the last stage,
    given to every stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, position_ids, mask, labels = batch

    def forward_step(data_iterator, model):
        output = model(tokens, position_ids, mask, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ddp],
        num_microbatches=1,
        seq_length=h.SEQ,
        micro_batch_size=h.BATCH,
        forward_only=False,
    )
    loss = torch.zeros(())
    if parallel_state.is_pipeline_last_stage():
        loss = reports[0]["loss"].float()
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss


def run_layout(layout: h.Layout, polycom, steps: int = 2, **overrides) -> dict:
    """Loss and grad norm of step 1, full gradients of step 1, full params after ``steps``,
    how many replicas of each key were checked, and each parameter's weight-decay factor."""
    config, ddp, optimizer = build(layout, polycom, **overrides)
    replicas = {}
    loss, grad_norm = train_step(ddp, optimizer)
    grads = gather(ddp.module, "grad", replicas)
    for step in range(1, steps):
        train_step(ddp, optimizer, step)
    params = gather(ddp.module, "param", replicas)
    return dict(
        loss=loss,
        grad_norm=grad_norm,
        grads=grads,
        params=params,
        replicas_checked=replicas,
        wd_mult=weight_decay_factors(ddp, optimizer),
    )


def weight_decay_factors(ddp, optimizer) -> dict:
    """Parameter name -> the ``wd_mult`` of its optimizer param group."""
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                out[names[id(param)]] = group["wd_mult"]
    return out


def per_token_losses(model, seed: int = 99) -> torch.Tensor:
    tokens, position_ids, mask, labels = h.batch(seed)
    with torch.no_grad():
        return model(tokens, position_ids, mask, labels=labels).detach().clone()


# --- sharded_state_dict walking --------------------------------------------------------


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def _sharded_tensors(model, what: str):
    """(ShardedTensor, local tensor) for every tensor in the model's checkpoint layout;
    ``what`` picks the parameter ("param") or its main_grad ("grad")."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for item in _leaves(model.sharded_state_dict()):
        if isinstance(item, ShardedTensor):
            assert isinstance(item.data, torch.nn.Parameter), f"{item.key} is not a parameter"
            yield item, item.data.main_grad if what == "grad" else item.data
        elif isinstance(item, ShardedTensorFactory):
            # e.g. legacy GroupedMLP, stored transposed: build the checkpoint-layout shards.
            source = item.data.main_grad if what == "grad" else item.data
            for part in _leaves(item.build_fn(item.key, source, item.replica_id, None)):
                yield part, part.data


def _map_data(tree):
    if isinstance(tree, dict):
        return {k: _map_data(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_data(v) for v in tree]
    return tree.data


def _local_index(st):
    """Index of this shard inside the global tensor (prepended axes have local size 1)."""
    index = []
    for axis, (offset, size) in enumerate(zip(st.global_offset, st.global_shape)):
        if axis < st.prepend_axis_num:
            index.append(offset)
        else:
            index.append(slice(offset, offset + st.local_shape[axis - st.prepend_axis_num]))
    return tuple(index)


def _is_main(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(r == 0 for r in ids)


@torch.no_grad()
def set_weights_by_key(model, salt: str = "") -> None:
    """Overwrite randomly initialised parameters (those not constant) with N(0, INIT_STD)
    values fixed by (salt, checkpoint key, global position). Constant-initialised ones
    (norm weights, PolyCom coefficients) are already layout-independent."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def fill(st, data):
        if data.numel() == 0 or bool((data == data.reshape(-1)[0]).all()):
            return
        g = torch.Generator().manual_seed(zlib.crc32(f"{salt}/{st.key}".encode()))
        values = torch.randn(st.global_shape, generator=g, dtype=torch.float32) * INIT_STD
        data.copy_(values[_local_index(st)].reshape(data.shape))

    for item in _leaves(model.sharded_state_dict()):
        if isinstance(item, ShardedTensor):
            fill(item, item.data)
        elif isinstance(item, ShardedTensorFactory):
            built = item.build()
            for part in _leaves(built):
                fill(part, part.data)
            item.data.copy_(item.merge_fn(_map_data(built)))


def gather(model, what: str, replicas_checked: dict = None) -> dict:
    """Full tensors by checkpoint key (params or main_grads), identical on every rank.

    Asserts each global element is covered by exactly one main replica and that every
    non-main replica equals its main replica bit for bit (counted per key into
    ``replicas_checked`` if given)."""
    pieces = [
        (st.key, tuple(st.global_shape), _local_index(st), _is_main(st.replica_id), data.detach().clone())
        for st, data in _sharded_tensors(model, what)
    ]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, pieces)

    full, covered, mains = {}, {}, {}
    for rank_pieces in everything:
        for key, shape, index, main, tensor in rank_pieces:
            if not main:
                continue
            full.setdefault(key, torch.zeros(shape, dtype=torch.float32))
            covered.setdefault(key, torch.zeros(shape, dtype=torch.int32))
            full[key][index] = tensor.float().reshape(full[key][index].shape)
            covered[key][index] += 1
            mains[(key, repr(index))] = tensor
    for key, count in covered.items():
        assert bool((count == 1).all()), f"{key}: global elements covered {count.unique().tolist()} times"
    for rank, rank_pieces in enumerate(everything):
        for key, shape, index, main, tensor in rank_pieces:
            if not main:
                if replicas_checked is not None:
                    replicas_checked[key] = replicas_checked.get(key, 0) + 1
                reference = mains[(key, repr(index))]
                assert torch.equal(tensor, reference), (
                    f"{what} {key}{index}: replica on rank {rank} differs from the main copy "
                    f"by {(tensor.float() - reference.float()).abs().max().item():.3g}"
                )
    return full


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- CPU stand-ins for GPU-only pieces (worker processes only) -------------------------


def _reference_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm in plain PyTorch: rows of ``a`` split by ``batch_sizes``, each
    block times its expert's matrix ``b[e]``."""
    blocks = a.split(batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(blocks, b)])


def reference_grouped_gemm():
    """A stand-in for the ``grouped_gemm`` module (only ``ops.gmm`` is used)."""
    import types

    return types.SimpleNamespace(ops=types.SimpleNamespace(gmm=_reference_gmm))


# megatron-core <= 0.16 has a grouped experts backend that runs without Transformer
# Engine (the legacy GroupedMLP); from 0.17 --moe-grouped-gemm without TE means the
# per-expert loop, and TEGroupedMLP needs TE and CUDA.
HAS_LEGACY_GROUPED = compat.legacy_grouped_mlp() is not None
needs_legacy_grouped = pytest.mark.skipif(
    not HAS_LEGACY_GROUPED,
    reason="this megatron-core has no grouped experts backend without Transformer Engine",
)


def use_reference_grouped_gemm() -> None:
    """Let megatron-core's legacy GroupedMLP run on CPU (where it exists, see above).

    It calls ``grouped_gemm.ops.gmm``, a CUDA extension (bf16 only) that cannot be built
    or run here; this puts a PyTorch reference of the same function in its place, so
    everything around the kernel (our forward, per-expert coefficients, moe_act
    recompute, checkpoint layout) runs for real."""
    if not HAS_LEGACY_GROUPED:
        return
    gg = compat.legacy_grouped_gemm()

    gg.grouped_gemm = reference_grouped_gemm()
    gg.ops = gg.grouped_gemm.ops


class _CpuDtoHStream:
    """The alltoall dispatcher's device-to-host stream: on CPU nothing to wait for, but
    ``record_event()`` must return an event (``polycom_megatron.cpu``'s stream stand-in
    returns None, and the dispatcher calls ``.synchronize()`` on it)."""

    def wait_stream(self, other):
        pass

    def record_event(self, *args, **kwargs):
        return self

    def synchronize(self):
        pass


def enable_alltoall_on_cpu() -> None:
    """Let the alltoall token dispatcher run under gloo on CPU (expert TP = 1 only).

    Two CPU-only gaps: the event above, and the split sizes. The dispatcher moves its
    split sizes to host as numpy arrays only when they are CUDA tensors
    (``maybe_move_tensor_to_cpu``); on CPU they stay tensors, which
    ``torch.distributed.all_to_all_single`` rejects (it wants int sequences). Here every
    host copy requested ``as_numpy`` becomes numpy, as on GPU."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CpuDtoHStream()
    original = token_dispatcher.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host
