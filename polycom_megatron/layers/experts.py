"""PolyCom experts for Megatron's MoE layer: the spec rewrite and the per-expert loop.

``polycom_moe_spec`` turns a ``MoELayer`` spec into one whose routed experts and shared
experts use PolyCom; the router, the token dispatcher and the layer itself stay Megatron's
(``module=MoELayer`` exactly: TransformerLayer hands its process groups only to that class).

Expert backends, by the module Megatron's spec chose:

* ``SequentialMLP`` (one ``MLP`` per local expert, a Python loop) -> ``PolyComSequentialMLP``:
  the same loop over ``PolyComMLP`` experts.
* ``TEGroupedMLP`` / legacy ``GroupedMLP`` -> ``PolyComTEGroupedMLP`` / ``PolyComGroupedMLP``
  (see ``grouped_experts.py``): PolyCom over all local experts' rows in one call.

Both coefficient modes give the same checkpoint keys in every backend, so a checkpoint
written by one loads into the other and at any EP / expert-TP size.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron import compat
from polycom_megatron.config import PolyComConfig
from polycom_megatron.layers.activation import PolyComActivation
from polycom_megatron.layers.grouped_experts import (
    LegacyGroupedMLP,
    PolyComGroupedMLP,
    PolyComTEGroupedMLP,
    TEGroupedMLP,
    ExpertActivation,
    check_moe_config,
    count_once_per_expert,
)
from polycom_megatron.layers.mlp import PolyComMLP, check_transformer_config, spec_polycom


def _activation_spec(polycom: PolyComConfig) -> ModuleSpec:
    return ModuleSpec(module=PolyComActivation, params={"polycom": polycom})


class _LayerCoefficients(MegatronModule):
    """An expert's activation in "layer" mode: the layer's shared ``ExpertActivation``.

    Holds it without registering it (it belongs to the experts module, and registering
    it under every expert would loop the module tree and repeat it in state dicts).
    """

    def __init__(self, config: TransformerConfig, tp_group=None, *, source: ExpertActivation):
        super().__init__(config=config)
        self._source = [source]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._source[0](x)


class PolyComSequentialMLP(SequentialMLP):
    """Megatron's per-expert loop (``SequentialMLP``) with ``PolyComMLP`` experts.

    "expert" mode: each expert's own ``PolyComActivation`` holds its coefficients, so
    SequentialMLP's checkpoint code gives them the expert axis like the expert's linears.
    "layer" mode: the experts module holds one ``ExpertActivation`` and each expert calls it.
    """

    def __init__(
        self, num_local_experts, config, submodules, pg_collection=None, name=None, *, polycom
    ):
        check_moe_config(config, polycom)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        # SequentialMLP.__init__ builds plain MLP experts, so its setup is redone here.
        if config.moe_ffn_hidden_size != config.ffn_hidden_size:
            # MLP sizes fc2's input from config.ffn_hidden_size.
            config = copy.deepcopy(config)
            config.ffn_hidden_size = config.moe_ffn_hidden_size
        MegatronModule.__init__(self, config=config)
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.polycom = polycom

        if polycom.coeff_mode == "layer":
            self.activation_func = ExpertActivation(
                self.config, polycom, num_local_experts, pg_collection
            )
            activation = ModuleSpec(
                module=_LayerCoefficients, params={"source": self.activation_func}
            )
        else:
            self.activation_func = None
            activation = _activation_spec(polycom)
        expert_submodules = dataclasses.replace(submodules, activation_func=activation)

        self.local_experts = torch.nn.ModuleList()
        for index in range(num_local_experts):
            expert = PolyComMLP(
                self.config,
                expert_submodules,
                ffn_hidden_size=self.config.moe_ffn_hidden_size,
                is_expert=True,
                tp_group=pg_collection.expt_tp,
                **compat.name_kwarg(name and f"{name}.local_experts.{index}"),
            )
            if self.activation_func is None:
                for param in expert.activation_func.parameters():
                    # Reduced over expert-DP like the expert's weights, at any EP size.
                    param.allreduce = False
                    count_once_per_expert(param, pg_collection.expt_tp)
            self.local_experts.append(expert)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.activation_func is None:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        with self.activation_func.shared_coefficients():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.activation_func is not None:
            state.update(
                self.activation_func.coefficients_sharded_state_dict(
                    prefix, sharded_offsets, metadata
                )
            )
        return state


class PolyComSharedExpertMLP(SharedExpertMLP, PolyComMLP):
    """Megatron's shared expert (a dense MLP beside the routed experts) with PolyCom.

    It is sharded over the dense TP group, so its activation reduces over that group.
    ``SharedExpertMLP.forward`` calls ``super().forward``, which this base order makes
    ``PolyComMLP.forward``: Megatron's own MLP forward would, for a gated linear unit,
    apply ``config.activation_func`` to the gate instead of the PolyCom module."""

    def __init__(self, config, submodules, gate, pg_collection=None, name=None):
        check_transformer_config(config, spec_polycom(submodules.activation_func))
        if getattr(config, "use_grouped_gemm_for_shared_expert", False):
            raise ValueError(
                "--use-grouped-gemm-for-shared-expert (use_grouped_gemm_for_shared_expert) "
                "selects Megatron's FusedSharedExpertMLP, which has no PolyCom version: drop "
                "it for PolyCom shared experts."
            )
        if getattr(config, "moe_shared_expert_overlap", False) and config.gated_linear_unit:
            # Its overlapped path applies config.activation_func to the gate itself.
            raise ValueError(
                "--moe-shared-expert-overlap (moe_shared_expert_overlap) computes the gated "
                "shared expert with Megatron's own activation: drop it with --polycom-gated."
            )
        # PolyComMLP.__init__ (next after SharedExpertMLP) builds the PolyCom activation.
        super().__init__(
            config, submodules, gate, pg_collection=pg_collection, **compat.name_kwarg(name)
        )


def _routed_experts_spec(spec, polycom: PolyComConfig):
    module, submodules, params = compat.builder_parts(spec) or (spec, None, {})
    params = {**params, "polycom": polycom}
    if LegacyGroupedMLP is not None and module in (LegacyGroupedMLP, PolyComGroupedMLP):
        return compat.builder_like(spec, PolyComGroupedMLP, None, params)  # no submodules
    polycom_module = {
        SequentialMLP: PolyComSequentialMLP,
        PolyComSequentialMLP: PolyComSequentialMLP,
        TEGroupedMLP: PolyComTEGroupedMLP,
        PolyComTEGroupedMLP: PolyComTEGroupedMLP,
    }.get(module)
    if polycom_module is None or submodules is None:
        raise ValueError(
            f"PolyCom has no version of the MoE experts module "
            f"{getattr(module, '__name__', module)}; use SequentialMLP (--moe-grouped-gemm "
            "off), TEGroupedMLP (--moe-grouped-gemm with Transformer Engine) or the legacy "
            "GroupedMLP."
        )
    submodules = dataclasses.replace(submodules, activation_func=None)
    return compat.builder_like(spec, polycom_module, submodules, params)


def _shared_experts_spec(spec, polycom: PolyComConfig):
    if spec is None:
        return None
    module, submodules, params = compat.builder_parts(spec) or (spec, None, {})
    if module is not PolyComSharedExpertMLP and module not in compat.shared_expert_builders():
        raise ValueError(
            f"PolyCom has no version of the shared-experts module "
            f"{getattr(module, '__name__', module)}; expected SharedExpertMLP."
        )
    submodules = dataclasses.replace(
        submodules or MLPSubmodules(), activation_func=_activation_spec(polycom)
    )
    return compat.builder_like(spec, PolyComSharedExpertMLP, submodules, params)


def polycom_moe_spec(moe_spec, polycom: PolyComConfig):
    """A ``MoELayer`` spec (a ModuleSpec, or from 0.18 a ``partial(MoELayer, ...)``) -> the
    same layer with PolyCom routed and shared experts, in the same form.

    The router and the rest of the spec are kept; applying it twice only updates
    ``polycom``.
    """
    module, sub, params = compat.builder_parts(moe_spec) or (moe_spec, None, {})
    if module is not MoELayer:
        raise ValueError(f"expected a MoELayer spec, got {moe_spec!r}")
    new_sub = dataclasses.replace(
        sub,
        experts=_routed_experts_spec(sub.experts, polycom),
        shared_experts=_shared_experts_spec(sub.shared_experts, polycom),
    )
    return compat.builder_like(moe_spec, MoELayer, new_sub, params)
