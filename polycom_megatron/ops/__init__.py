"""The PolyCom math as differentiable functions: ``polynorm`` and ``polyrelu``."""

from polycom_megatron.ops.polynorm import polynorm, polynorm_reference
from polycom_megatron.ops.polyrelu import polyrelu, polyrelu_reference

__all__ = ["polynorm", "polynorm_reference", "polyrelu", "polyrelu_reference"]
