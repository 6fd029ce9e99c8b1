"""The PolyCom activation as a Megatron module: learnable coefficients plus the op call.

The math lives in ``polycom_megatron.ops``; this module owns the parameters, their
initialisation and the process group that the FFN hidden dimension is sharded over.

Gradient bookkeeping. The coefficients are replicated on every tensor-parallel rank, but
each rank only sees its slice of the hidden dimension. The ops reduce the coefficient
gradients over that group themselves (see ``ops/polynorm.py``), so every rank ends with
the full gradient. The parameters therefore carry neither ``sequence_parallel`` (Megatron
would sum them across TP a second time) nor ``tensor_model_parallel`` (they are counted
once in the grad norm, on TP rank 0). Being 1-D, they are excluded from weight decay by
Megatron's default rule, like biases and norm weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron import ops
from polycom_megatron.config import PolyComConfig
from polycom_megatron.ops.common import group_size


def apply_polycom(x, weight, bias, polycom: PolyComConfig, group=None, tokens_per_expert=None):
    """The op ``polycom`` names, on fc1's output ``x``: the one place that picks between the
    non-gated ops (``x`` is the hidden activation) and the gated ones (``x`` is
    ``[gate, up]``, each half of the last dimension, as Megatron's GLU lays out every TP
    shard). ``bias`` is None without the a0 term."""
    kwargs = dict(group=group, tokens_per_expert=tokens_per_expert, kernel=polycom.kernel)
    if polycom.activation == "polynorm":
        op = ops.polynorm_glu if polycom.gated else ops.polynorm
        return op(x, weight, bias, polycom.eps, **kwargs)
    op = ops.polyrelu_glu if polycom.gated else ops.polyrelu
    return op(x, weight, bias, **kwargs)


def check_gated_unit(config: TransformerConfig, polycom: PolyComConfig) -> None:
    """Megatron's gated linear unit (fc1 twice as wide, ``[gate, up]``) must be on exactly
    for the gated form, and none of its SwiGLU-only variations may apply."""
    if config.gated_linear_unit and not polycom.gated:
        raise ValueError(
            "PolyCom replaces the gated linear unit: turn off --swiglu "
            "(TransformerConfig.gated_linear_unit=False) and widen --ffn-hidden-size 1.5x "
            "for matched parameters (polycom_megatron.matched_ffn_hidden_size), or use the "
            "gated form (--polycom-gated, PolyComConfig(gated=True))."
        )
    if polycom.gated and not config.gated_linear_unit:
        raise ValueError(
            "--polycom-gated (PolyComConfig.gated) needs Megatron's gated linear unit: set "
            "TransformerConfig.gated_linear_unit=True (the launchers and patches do it)."
        )
    if not polycom.gated:
        return
    if getattr(config, "glu_linear_offset", 0.0):
        raise ValueError(
            "--glu-linear-offset (TransformerConfig.glu_linear_offset) shifts SwiGLU's up "
            "projection and does not apply to --polycom-gated: drop it."
        )
    if getattr(config, "activation_func_clamp_value", None) is not None:
        raise ValueError(
            "--activation-func-clamp-value (TransformerConfig.activation_func_clamp_value) "
            "clamps SwiGLU's inputs and does not apply to --polycom-gated: drop it."
        )


def new_coefficients(polycom: PolyComConfig, dtype):
    """(weight, bias) at the reference init: each power 1/r, a0 = 0 (bias None if off)."""
    order = polycom.order
    weight = torch.nn.Parameter(torch.full((order,), 1.0 / order, dtype=dtype))
    bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype)) if polycom.bias else None
    return weight, bias


class PolyComActivation(MegatronModule):
    """PolyNorm or PolyReLU over the last dimension, with its own coefficients.

    Storage follows the authors' checkpoints: ``weight = [a_r, ..., a_1]``, ``bias = [a_0]``.
    Reference initialisation: every power's coefficient 1/r, bias 0.
    """

    def __init__(
        self,
        config: TransformerConfig,
        polycom: PolyComConfig,
        tp_group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__(config=config)
        check_gated_unit(config, polycom)
        self.polycom = polycom
        # Megatron's default sharded_state_dict reads self.tp_group to mark replicas.
        self.tp_group = tp_group
        self.weight, self.bias = new_coefficients(polycom, config.params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group if group_size(self.tp_group) > 1 else None
        return apply_polycom(x, self.weight, self.bias, self.polycom, group=group)

    def extra_repr(self) -> str:
        p = self.polycom
        return f"{p.name}, order={p.order}, bias={p.bias}, eps={p.eps}, kernel={p.kernel}"
