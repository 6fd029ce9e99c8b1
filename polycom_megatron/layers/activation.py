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

from polycom_megatron.config import PolyComConfig
from polycom_megatron.ops import polynorm, polyrelu
from polycom_megatron.ops.common import group_size


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
        self.polycom = polycom
        # Megatron's default sharded_state_dict reads self.tp_group to mark replicas.
        self.tp_group = tp_group
        order = polycom.order
        self.weight = torch.nn.Parameter(
            torch.full((order,), 1.0 / order, dtype=config.params_dtype)
        )
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group if group_size(self.tp_group) > 1 else None
        if self.polycom.activation == "polynorm":
            return polynorm(
                x, self.weight, self.bias, self.polycom.eps, group=group, kernel=self.polycom.kernel
            )
        return polyrelu(x, self.weight, self.bias, group=group, kernel=self.polycom.kernel)

    def extra_repr(self) -> str:
        p = self.polycom
        return f"{p.activation}, order={p.order}, eps={p.eps}, kernel={p.kernel}"
