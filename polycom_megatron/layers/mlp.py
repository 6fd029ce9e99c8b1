"""Megatron's MLP with a PolyCom activation between fc1 and fc2.

Subclassing Megatron's ``MLP`` keeps its linear layers, tensor/sequence parallelism,
Transformer Engine linears and checkpoint layout; only the activation changes. We do
not go through Megatron's ``use_te_activation_func`` hook: it insists that
``config.activation_func`` be one of its built-ins and builds the activation with the
config alone, while ours needs its settings and the tensor-parallel group.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron import compat
from polycom_megatron.config import PolyComConfig
from polycom_megatron.layers.activation import check_gated_unit


def check_transformer_config(config: TransformerConfig, polycom: Optional[PolyComConfig] = None) -> None:
    """Refuse Megatron settings that cannot mean anything with a PolyCom activation
    (``polycom``, when known, decides whether the gated linear unit must be on or off)."""
    if polycom is not None:
        check_gated_unit(config, polycom)
    if config.bias_activation_fusion:
        raise ValueError(
            "Bias-activation fusion only fuses Megatron's built-in activations: pass "
            "--no-bias-gelu-fusion / --no-bias-swiglu-fusion "
            "(TransformerConfig.bias_activation_fusion=False)."
        )
    if config.activation_func_fp8_input_store:
        raise ValueError(
            "--activation-func-fp8-input-store stores SwiGLU's input in FP8 and does not "
            "apply to PolyCom: drop the flag (activation_func_fp8_input_store=False)."
        )
    if getattr(config, "use_te_activation_func", False):
        raise ValueError(
            "--use-te-activation-func selects Transformer Engine's built-in activation; "
            "PolyCom brings its own: drop the flag (use_te_activation_func=False)."
        )


def spec_polycom(activation_spec) -> Optional[PolyComConfig]:
    """The PolyComConfig an activation spec builds with (a ``polycom`` parameter, or the
    layer-shared coefficients' ``source`` in MoE), or None when the spec does not say."""
    parts = compat.builder_parts(activation_spec) if activation_spec is not None else None
    params = parts[2] if parts else {}
    if "polycom" in params:
        return params["polycom"]
    return getattr(params.get("source"), "polycom", None)


class _QuietUnknownMLP(logging.Filter):
    """TransformerLayer hands its TP group only to the exact ``MLP`` class and logs
    "Unknown MLP type" for subclasses. PolyComMLP then takes the TP group from
    parallel_state, which is the same group unless a custom pg_collection is used."""

    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietUnknownMLP())


class PolyComMLP(MLP):
    """fc1 -> PolyCom activation -> fc2, with the activation built from
    ``submodules.activation_func``: a builder (or ModuleSpec) of ``PolyComActivation``
    taking ``config`` and ``tp_group``."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, *args, **kwargs):
        check_transformer_config(config, spec_polycom(submodules.activation_func))
        if submodules.activation_func is None:
            raise ValueError(
                "PolyComMLP needs submodules.activation_func (a PolyComActivation spec); "
                "build the spec with polycom_megatron.with_polycom"
            )
        plain = dataclasses.replace(submodules, activation_func=None)
        super().__init__(config, plain, *args, **kwargs)
        self.activation_func = compat.build_submodule(
            submodules.activation_func, config=config, tp_group=compat.mlp_tp_group(self)
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        intermediate, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            intermediate = intermediate + fc1_bias
        intermediate = self.activation_func(intermediate)
        if per_token_scale is not None:
            intermediate = (intermediate * per_token_scale.unsqueeze(-1)).to(intermediate.dtype)

        output, output_bias = self.linear_fc2(intermediate)
        if per_token_scale is not None and output_bias is not None:
            # An expert's bias is scaled by its routing probability like its output.
            output = output + output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)
            output_bias = None
        return output, output_bias
