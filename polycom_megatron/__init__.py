"""PolyCom activations (PolyNorm, PolyReLU, and their gated forms) for Megatron-Core.

Public API: the functional ops, the config, and the spec builders. The ops and the config
import without megatron-core; the spec builders load it on first use.
"""

import importlib

from polycom_megatron.config import PolyComConfig, add_polycom_args, matched_ffn_hidden_size
from polycom_megatron.ops import polynorm, polynorm_glu, polyrelu, polyrelu_glu

__version__ = "0.1.0"

_SPEC_BUILDERS = ("get_gpt_block_spec", "get_gpt_layer_spec", "with_polycom")

__all__ = [
    "PolyComConfig",
    "add_polycom_args",
    "matched_ffn_hidden_size",
    "polynorm",
    "polynorm_glu",
    "polyrelu",
    "polyrelu_glu",
    *_SPEC_BUILDERS,
]


def __getattr__(name):
    if name in _SPEC_BUILDERS:
        return getattr(importlib.import_module("polycom_megatron.specs"), name)
    raise AttributeError(f"module 'polycom_megatron' has no attribute {name!r}")
