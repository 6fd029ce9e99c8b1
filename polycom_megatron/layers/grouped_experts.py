"""PolyCom over all local experts' rows at once, and the grouped-GEMM expert backends.

``ExpertActivation`` owns the PolyCom coefficients of one MoE layer's local experts and
applies the op to fc1's output of all of them in one call: rows are expert-major and
``tokens_per_expert`` (the padded split under FP8) tells the op which coefficient set
each row uses, so there is no Python loop over experts.

Coefficient modes (``PolyComConfig.coeff_mode``):

* "layer": one set (``weight [r]``, ``bias [1]``) shared by every expert of the layer. It
  is replicated on all ranks and reduced by DDP like any dense parameter, but its gradient
  needs a fix first, see ``_SharedCoefficientGrad``.
* "expert": one set per expert, stored as 1-D ``weight{i} [r]`` / ``bias{i} [1]`` per local
  expert i (1-D keeps them out of weight decay), marked ``allreduce = False`` so DDP reduces
  them over the expert-data-parallel group like the experts' own weights. In checkpoints
  they appear as ``<layer>.mlp.experts.experts.activation_func.weight`` of shape
  ``[num_experts, r]`` with the expert axis, exactly as the per-expert loop backend
  (``SequentialMLP``) writes them, so checkpoints move between backends and EP sizes.

Under expert-tensor parallelism (ETP) the FFN hidden dimension of each expert is split
over the expert-TP group, so that is the group PolyNorm reduces its statistics over (and
PolyReLU its coefficient gradients); the op returns full coefficient gradients there.

Backends: ``PolyComTEGroupedMLP`` (Transformer Engine's grouped linears; needs TE) and
``PolyComGroupedMLP`` (megatron-core's legacy ``GroupedMLP``, <= 0.16, needs the
``grouped_gemm`` package). Both reuse Megatron's constructors (weights, checkpoint layout)
and replace only ``forward``, because Megatron calls the activation without the split.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe import experts as mcore_experts
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron import compat
from polycom_megatron.config import PolyComConfig
from polycom_megatron.layers.activation import apply_polycom, check_gated_unit, new_coefficients
from polycom_megatron.layers.mlp import check_transformer_config
from polycom_megatron.ops.common import group_size

# TEGroupedMLP is defined in every supported release (building one needs Transformer
# Engine's grouped linears, which the spec supplies); the legacy GroupedMLP only to 0.16.
LegacyGroupedMLP = compat.legacy_grouped_mlp()
TEGroupedMLP = mcore_experts.TEGroupedMLP


def check_moe_config(config: TransformerConfig, polycom: PolyComConfig) -> None:
    """Refuse MoE settings that change what PolyCom experts compute, naming the flag."""
    check_transformer_config(config, polycom)
    # The gated form keeps the scale through its linear up projection, so only the
    # non-gated PolyNorm is blind to it.
    if config.moe_apply_probs_on_input and polycom.activation == "polynorm" and not polycom.gated:
        raise ValueError(
            "--moe-apply-probs-on-input (TransformerConfig.moe_apply_probs_on_input) scales "
            "each expert's input by its routing probability, and PolyNorm normalises that "
            "scale away, so the router would get no gradient through the experts: drop the "
            "flag with PolyNorm experts (PolyReLU and --polycom-gated accept it)."
        )
    offloaded = set(getattr(config, "offload_modules", None) or ()) & {"expert_fc1", "moe_act"}
    if getattr(config, "fine_grained_activation_offloading", False) and offloaded:
        raise ValueError(
            f"--offload-modules {' '.join(sorted(offloaded))} is not supported with PolyCom "
            "experts; drop those modules from --offload-modules."
        )


def _rank(group) -> int:
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


def dense_data_parallel_size(pg_collection) -> int:
    """Size of the group DDP averages dense gradients over (data x context parallel).

    MoE layers get either TransformerLayer's collection (with ``dp_cp``) or Megatron's
    MoE default (with ``tp_dp_cp`` and ``tp``)."""
    dp_cp = getattr(pg_collection, "dp_cp", None)
    if dp_cp is not None:
        return group_size(dp_cp)
    tp_dp_cp, tp = getattr(pg_collection, "tp_dp_cp", None), getattr(pg_collection, "tp", None)
    if tp_dp_cp is not None:
        return group_size(tp_dp_cp) // group_size(tp)
    if not dist.is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def count_once_per_expert(param: torch.nn.Parameter, expert_tp_group) -> None:
    """Mark a per-expert parameter replicated over expert-TP so the grad norm counts it once.

    Megatron's expert optimizer sums grad norms over expert-TP x EP x PP, and counts a
    parameter without ``tensor_model_parallel`` only on *dense* TP rank 0, which is wrong
    for experts whenever expert TP differs from TP (a whole EP rank may sit on dense TP
    rank 1, or several expert-TP replicas on dense TP rank 0). So the copy on expert-TP
    rank 0 is flagged as counted (``tensor_model_parallel``: not a duplicate) and the other
    copies as ``shared`` (Megatron's flag for copies the norm must skip). Both flags are
    only read by the grad-norm and zero-count code; checkpoints use ``sharded_state_dict``.
    """
    owner = _rank(expert_tp_group) == 0
    param.tensor_model_parallel = owner
    param.shared = not owner


class _SharedCoefficientGrad(torch.autograd.Function):
    """Identity forward. Backward turns this rank's gradient of a layer-shared coefficient
    into the share that Megatron's dense DDP reduction turns into the right total.

    Each rank's gradient covers only the (token, expert) pairs its local experts computed,
    for the tokens gathered over its expert-TP x EP group. Summing over EP and then over
    expert-DP counts every pair exactly once (expert-TP copies are identical, the op already
    reduced over them). DDP then sums the dense gradient over the data(-context)-parallel
    group of size d and scales by 1/d; so each rank hands it total/d, and the result is
    total/d as for any dense parameter.

    DDP alone is right when expert TP equals TP (then EP x expert-DP is the dense DP
    group). Otherwise it is not: e.g. TP=1, EP=2, expert TP=2 doubles the gradient (both
    expert-TP copies are summed), and TP=2 (SP), EP=2, expert TP=1 leaves the two TP
    ranks with different halves.
    """

    @staticmethod
    def forward(ctx, weight, bias, groups, scale):
        # bias is None without the a0 term (PolyComConfig.bias=False).
        ctx.groups, ctx.scale, ctx.has_bias = groups, scale, bias is not None
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        if ctx.has_bias and grad_bias is None:
            grad_bias = torch.zeros(1, dtype=grad_weight.dtype, device=grad_weight.device)
        grads = [grad_weight] + ([grad_bias] if ctx.has_bias else [])
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        for group in ctx.groups:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.mul_(ctx.scale)
        n = grad_weight.numel()
        return (
            flat[:n].view_as(grad_weight).to(grad_weight.dtype),
            flat[n:].view_as(grad_bias).to(grad_bias.dtype) if ctx.has_bias else None,
            None,
            None,
        )


class ExpertActivation(MegatronModule):
    """PolyCom coefficients of one MoE layer's local experts, applied to their rows."""

    def __init__(
        self,
        config: TransformerConfig,
        polycom: PolyComConfig,
        num_local_experts: int,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.polycom = polycom
        self.num_local_experts = num_local_experts
        self.per_expert = polycom.coeff_mode == "expert"
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        # A group of None means a single rank (used by single-process tests).
        self.tp_group = pg_collection.expt_tp
        self.ep_group = pg_collection.ep
        self.expt_dp_group = pg_collection.expt_dp
        self._scoped = None

        check_gated_unit(config, polycom)
        # The names of the coefficient tensors: ("weight", "bias"), or ("weight",) without a0.
        self.coefficient_names = ("weight", "bias") if polycom.bias else ("weight",)
        dtype = config.params_dtype
        if self.per_expert:
            for i in range(num_local_experts):
                weight, bias = new_coefficients(polycom, dtype)
                for name, param in zip(self.coefficient_names, (weight, bias)):
                    param.allreduce = False
                    count_once_per_expert(param, self.tp_group)
                    self.register_parameter(f"{name}{i}", param)
        else:
            self.weight, self.bias = new_coefficients(polycom, dtype)
            # DDP sums dense gradients over the ranks that share this rank's dense TP rank.
            # When expert TP is the dense TP group, those ranks split this layer's (token,
            # expert) pairs exactly between them and DDP alone is right; otherwise (expert
            # TP != TP) the gradient is fixed first, see _SharedCoefficientGrad.
            self._grad_groups, self._grad_scale = (), 1.0
            if group_size(getattr(pg_collection, "tp", None)) != group_size(self.tp_group):
                self._grad_groups = tuple(
                    g for g in (self.ep_group, self.expt_dp_group) if group_size(g) > 1
                )
                self._grad_scale = 1.0 / dense_data_parallel_size(pg_collection)

    def coefficients(self):
        """(weight, bias) for the op: ``[r]``/``[1]``, or ``[E, r]``/``[E, 1]`` per expert."""
        if self._scoped is not None:
            return self._scoped
        if self.per_expert:
            n = self.num_local_experts
            weight = torch.stack([getattr(self, f"weight{i}") for i in range(n)])
            if not self.polycom.bias:
                return weight, None
            bias = torch.stack([getattr(self, f"bias{i}") for i in range(n)])
            return weight, bias
        if not self._grad_groups and self._grad_scale == 1.0:
            return self.weight, self.bias
        return _SharedCoefficientGrad.apply(
            self.weight, self.bias, self._grad_groups, self._grad_scale
        )

    @contextlib.contextmanager
    def shared_coefficients(self):
        """Use one ``coefficients()`` result for every call inside the block.

        The per-expert loop applies a layer-shared set once per expert; taking it once per
        layer forward means its gradient is reduced once, after all experts contributed.
        """
        self._scoped = self.coefficients()
        try:
            yield
        finally:
            self._scoped = None

    def forward(self, x: torch.Tensor, tokens_per_expert=None) -> torch.Tensor:
        weight, bias = self.coefficients()
        split = tokens_per_expert if self.per_expert else None
        group = self.tp_group if group_size(self.tp_group) > 1 else None
        return apply_polycom(x, weight, bias, self.polycom, group=group, tokens_per_expert=split)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        raise RuntimeError(
            "ExpertActivation is checkpointed by its experts module "
            "(coefficients_sharded_state_dict), which knows the expert layout"
        )

    def coefficients_sharded_state_dict(self, prefix: str, sharded_offsets=(), metadata=None):
        """Checkpoint entries for the coefficients of the experts module at ``prefix``.

        State-dict keys are ``{prefix}activation_func.<param>``; checkpoint keys follow
        ``SequentialMLP``: ``{prefix}experts.activation_func.weight`` with a leading expert
        axis in "expert" mode (or ``{prefix}experts.{e}.activation_func.weight`` per expert
        with ``singleton_local_shards``), and without it in "layer" mode.
        """
        tp_rank, ep_rank, dp_rank = (
            _rank(self.tp_group),
            _rank(self.ep_group),
            _rank(self.expt_dp_group),
        )
        state_prefix = f"{prefix}activation_func."
        out = {}
        if not self.per_expert:
            # Replicated on every rank of the stage: (expert-TP, EP, expert-DP) names a rank,
            # and exactly one has replica id (0, 0, 0).
            replica_id = (0, tp_rank, ep_rank + group_size(self.ep_group) * dp_rank)
            for name in self.coefficient_names:
                out[state_prefix + name] = ShardedTensor.from_rank_offsets(
                    f"{prefix}experts.activation_func.{name}",
                    getattr(self, name),
                    *sharded_offsets,
                    replica_id=replica_id,
                    prepend_axis_num=len(sharded_offsets),
                )
            return out

        singleton = (metadata or {}).get("singleton_local_shards", False)
        num_global = group_size(self.ep_group) * self.num_local_experts
        for i in range(self.num_local_experts):
            expert = ep_rank * self.num_local_experts + i
            if singleton:
                key_prefix, offsets = f"{prefix}experts.{expert}.activation_func.", sharded_offsets
            else:
                key_prefix = f"{prefix}experts.activation_func."
                offsets = (*sharded_offsets, (len(sharded_offsets), expert, num_global))
            for name in self.coefficient_names:
                out[f"{state_prefix}{name}{i}"] = ShardedTensor.from_rank_offsets(
                    key_prefix + name,
                    getattr(self, f"{name}{i}"),
                    *offsets,
                    replica_id=(0, tp_rank, dp_rank),
                    prepend_axis_num=len(offsets),
                )
        return out

    def extra_repr(self) -> str:
        p = self.polycom
        return (
            f"{p.name}, order={p.order}, bias={p.bias}, coeff_mode={p.coeff_mode}, "
            f"local_experts={self.num_local_experts}, kernel={p.kernel}"
        )


@contextlib.contextmanager
def without_child(module: torch.nn.Module, name: str):
    """Hide a child module while Megatron's own ``sharded_state_dict`` walks the others
    (legacy GroupedMLP treats every state-dict entry that is not weight1 as weight2)."""
    child = module._modules.pop(name)
    try:
        yield
    finally:
        module._modules[name] = child


class _GroupedPolyCom:
    """What both grouped backends add to Megatron's: the activation module and its call."""

    def _init_polycom(self, polycom: PolyComConfig, pg_collection) -> None:
        # Replaces the plain function Megatron stored under this name.
        self.activation_func = ExpertActivation(
            self.config, polycom, self.num_local_experts, pg_collection
        )

    def _activate(self, fc1_output, tokens_per_expert, probs):
        """PolyCom of every local expert's rows times the routing probabilities, optionally
        recomputed in backward (``moe_act``). The split is bound here, not passed as a
        checkpoint input, so a recompute uses the split of its own forward."""

        def act(x, p):
            y = self.activation_func(x, tokens_per_expert)
            return (y * p).to(y.dtype)

        if self.activation_recompute:
            # Its default (fp8=False) means "ask Transformer Engine whether FP8 is on", which
            # fails without TE; fp8=None skips the question (megatron-core 0.16).
            fp8 = False if mcore_random.HAVE_TE else None
            self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=fp8)
            return self.activation_checkpoint.checkpoint(act, fc1_output, probs)
        return act(fc1_output, probs)

    def _apply_probs_on_input(self, hidden, probs):
        """``moe_apply_probs_on_input`` (PolyReLU only, top-1): scale the input instead."""
        if not self.config.moe_apply_probs_on_input:
            return hidden, probs
        hidden = (probs * hidden).to(hidden.dtype)
        return hidden, torch.ones_like(probs)

    def _polycom_sharded_state_dict(self, super_fn, prefix, sharded_offsets, metadata):
        with without_child(self, "activation_func"):
            state = super_fn(prefix, sharded_offsets, metadata)
        state.update(
            self.activation_func.coefficients_sharded_state_dict(prefix, sharded_offsets, metadata)
        )
        return state


class PolyComTEGroupedMLP(_GroupedPolyCom, TEGroupedMLP):
    """Transformer Engine grouped experts with PolyCom between the grouped fc1 and fc2."""

    def __init__(
        self, num_local_experts, config, submodules, pg_collection=None, name=None, *, polycom
    ):
        check_moe_config(config, polycom)
        super().__init__(
            num_local_experts, config, submodules, pg_collection=pg_collection,
            **compat.name_kwarg(name),
        )
        self._init_polycom(polycom, pg_collection)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        tokens_per_expert = tokens_per_expert.tolist()
        hidden = permuted_local_hidden_states
        quantized = self.config.fp8 or self.config.fp4
        if quantized:
            # FP8/FP4 GEMMs want each expert's rows padded; everything up to fc2 then runs
            # on the padded split, and padded rows carry probability 0.
            actual_tokens_per_expert = tokens_per_expert
            hidden, tokens_per_expert = self.quantization_padding(hidden, tokens_per_expert)
            probs, _ = self.quantization_padding(
                permuted_probs.unsqueeze(-1), actual_tokens_per_expert
            )
        else:
            probs = permuted_probs.unsqueeze(-1)
        hidden, probs = self._apply_probs_on_input(hidden, probs)

        fc1_output, fc1_bias = self.linear_fc1(hidden, tokens_per_expert)
        if fc1_bias is not None:  # fc1 is built with skip_bias_add=False: never here
            raise RuntimeError("PolyComTEGroupedMLP expects fc1 to add its own bias")
        intermediate = self._activate(fc1_output, tokens_per_expert, probs)
        output, output_bias = self.linear_fc2(intermediate, tokens_per_expert)
        if self.activation_recompute:
            self.activation_checkpoint.discard_output_and_register_recompute(output)
        output = self._apply_bias(output, output_bias, tokens_per_expert, probs)
        if quantized:
            output = self.quantization_unpadding(output, actual_tokens_per_expert)
        return output, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._polycom_sharded_state_dict(
            super().sharded_state_dict, prefix, sharded_offsets, metadata
        )


if LegacyGroupedMLP is not None:

    class PolyComGroupedMLP(_GroupedPolyCom, LegacyGroupedMLP):
        """megatron-core's legacy GroupedMLP (``grouped_gemm``) with PolyCom experts."""

        def __init__(self, num_local_experts, config, pg_collection=None, *, polycom):
            check_moe_config(config, polycom)
            super().__init__(num_local_experts, config, pg_collection=pg_collection)
            self._init_polycom(polycom, pg_collection)

        def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
            hidden, probs = self._apply_probs_on_input(
                permuted_local_hidden_states, permuted_probs.unsqueeze(-1)
            )
            h = self.config.hidden_size
            if hidden.nelement() != 0:
                w1 = self.weight1.view(self.num_local_experts, h, -1)
                w2 = self.weight2.view(self.num_local_experts, -1, h)
                gmm = compat.legacy_grouped_gemm().ops.gmm
                fc1_output = gmm(hidden, w1, tokens_per_expert, trans_b=False)
                intermediate = self._activate(fc1_output, tokens_per_expert, probs)
                output = gmm(intermediate, w2, tokens_per_expert, trans_b=False)
            else:
                # No rows for the local experts: still put the weights and coefficients in
                # the graph, so every rank runs the same backward (and its collectives).
                fc1_output = torch.matmul(hidden, self.weight1.view(h, -1))
                intermediate = self._activate(fc1_output, tokens_per_expert, probs)
                output = torch.matmul(intermediate, self.weight2.view(-1, h))
            if self.activation_recompute:
                self.activation_checkpoint.discard_output_and_register_recompute(output)
            return output, None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return self._polycom_sharded_state_dict(
                super().sharded_state_dict, prefix, sharded_offsets, metadata
            )

else:
    PolyComGroupedMLP = None
