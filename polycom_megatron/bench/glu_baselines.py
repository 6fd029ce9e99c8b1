"""SwiGLU's own activations: the baselines of the gated PolyCom rows in bench-kernels.

Each takes fc1's output ``x = [g, u]`` of shape ``[rows, 2n]`` (gate half first, as
Megatron's gated linear unit lays it out) and returns ``silu(g) * u`` ``[rows, n]``:

- swiglu:          eager PyTorch;
- swiglu-compile:  ``torch.compile`` of the eager form (built per shape);
- swiglu-megatron: Megatron-Core's fused ``bias_swiglu_impl`` without bias, what
                   Megatron runs with ``--swiglu --bias-swiglu-fusion``;
- swiglu-liger:    Liger-Kernel's ``LigerSiLUMulFunction`` (CUDA), called on the two
                   halves as Liger's own SwiGLU MLP does (it makes them contiguous).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

SWIGLU_IMPLS = ("swiglu", "swiglu-compile", "swiglu-megatron", "swiglu-liger")


def swiglu_eager(x: torch.Tensor) -> torch.Tensor:
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def compiled_swiglu() -> Callable:
    torch._dynamo.reset()  # one graph per shape; no recompile limit across shapes
    return torch.compile(swiglu_eager)


def swiglu_baseline(impl: str, device: torch.device) -> Tuple[Optional[object], Optional[str]]:
    """(fn(x), None), the marker "swiglu-compile" (built per shape), or (None, why not)."""
    if impl == "swiglu":
        return swiglu_eager, None
    if impl == "swiglu-compile":
        return impl, None
    if impl == "swiglu-megatron":
        try:
            from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
        except Exception as e:
            return None, f"megatron.core's bias_swiglu_impl not importable ({type(e).__name__}: {e})"
        return (lambda x: bias_swiglu_impl(x, None)), None
    if impl == "swiglu-liger":
        if device.type != "cuda":
            return None, "Liger-Kernel needs CUDA"
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        except Exception as e:
            return None, f"liger_kernel.ops.swiglu not importable ({type(e).__name__}: {e})"

        def liger(x):
            g, u = x.chunk(2, dim=-1)
            return LigerSiLUMulFunction.apply(g, u)

        return liger, None
    raise ValueError(f"not a SwiGLU baseline: {impl!r}")
