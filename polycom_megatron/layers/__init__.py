"""Megatron modules built on the PolyCom ops."""

from polycom_megatron.layers.activation import PolyComActivation
from polycom_megatron.layers.mlp import PolyComMLP

__all__ = ["PolyComActivation", "PolyComMLP"]
