"""The PolyCom math as differentiable functions: ``polynorm`` and ``polyrelu``, and their
gated forms ``polynorm_glu`` and ``polyrelu_glu`` (the activation as a GLU's gate)."""

from polycom_megatron.ops.polynorm import polynorm, polynorm_reference
from polycom_megatron.ops.polynorm_glu import polynorm_glu, polynorm_glu_reference
from polycom_megatron.ops.polyrelu import polyrelu, polyrelu_reference
from polycom_megatron.ops.polyrelu_glu import polyrelu_glu, polyrelu_glu_reference

__all__ = [
    "polynorm",
    "polynorm_glu",
    "polynorm_glu_reference",
    "polynorm_reference",
    "polyrelu",
    "polyrelu_glu",
    "polyrelu_glu_reference",
    "polyrelu_reference",
]
