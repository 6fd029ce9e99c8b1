"""PolyReLU-GLU: PolyReLU as the gate of a gated linear unit, and its autograd Function.

    PolyReLU-GLU([g, u]) = PolyReLU(g) * u        (elementwise)

The input is fc1's output ``[..., 2n]`` in Megatron's gated layout (per tensor-parallel
shard: gate slice, then up slice; see polynorm_glu.py). Elementwise, so TP needs no
statistics in forward; the coefficient gradients are sums over the hidden dimension,
partial on each TP rank, and are all-reduced over the group in backward as for PolyReLU.

Backward, with Q = PolyReLU(g), q = relu(g), dy = dL/dy and h = dy * u:

    dL/du = dy * Q
    dL/dg = h * sum_p p * a_p * q^(p-1) * [g > 0]
    dL/da_p = sum h * q^p        dL/da_0 = sum h

Only the input is saved for backward. ``bias=None`` drops the a_0 term.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from polycom_megatron.ops import dispatch
from polycom_megatron.ops.common import (
    TokensPerExpert,
    as_rows,
    coeff_table,
    gate_up,
    glu_rows,
    row_sets,
    upcast,
)
from polycom_megatron.ops.polyrelu import (
    TorchPolyReLUKernels,
    elementwise_backward,
    polyrelu_reference,
)


def polyrelu_glu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """The formula written out directly (one coefficient set); ground truth for tests."""
    g, u = upcast(x).chunk(2, dim=-1)
    if bias is None:
        bias = weight.new_zeros(1)
    return (polyrelu_reference(g, weight, bias) * u).to(x.dtype)


class TorchPolyReLUGLUKernels:
    """PolyReLU-GLU's pieces in plain PyTorch; the interface of ``TorchPolyReLUKernels``
    with ``x`` being fc1's ``[rows, 2n]`` and y, dy ``[rows, n]``."""

    name = "torch"

    @staticmethod
    def forward(x, coeffs, sets):
        g, u = gate_up(x)
        return (TorchPolyReLUKernels.forward(upcast(g), coeffs, sets) * upcast(u)).to(x.dtype)

    @staticmethod
    def backward(x, dy, coeffs, sets):
        """-> (dx ``[rows, 2n]``, per-row ``[sum h, sum h*q, ..., sum h*q^r]`` float32)."""
        g, u = gate_up(x)
        gf, dyf = upcast(g), upcast(dy)
        dg, row_grads = TorchPolyReLUKernels.backward(gf, dyf * upcast(u), coeffs, sets)
        du = dyf * TorchPolyReLUKernels.forward(gf, coeffs, sets)
        return torch.cat([dg, du], dim=-1).to(x.dtype), row_grads


class PolyReLUGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, tokens_per_expert, kernels):
        rows = glu_rows(x, "polyrelu_glu")
        coeffs = coeff_table(weight, bias)
        sets = row_sets(tokens_per_expert, coeffs.shape[0], rows.shape[0], x.device)
        y = kernels.forward(rows, coeffs, sets)
        ctx.save_for_backward(rows, coeffs, sets, weight, bias)
        ctx.group, ctx.kernels, ctx.x_shape = group, kernels, x.shape
        return y.view(*x.shape[:-1], rows.shape[1] // 2)

    @staticmethod
    def backward(ctx, grad_out):
        rows, coeffs, sets, weight, bias = ctx.saved_tensors
        dx, grad_weight, grad_bias = elementwise_backward(
            ctx.kernels, rows, as_rows(grad_out), coeffs, sets, ctx.group, weight, bias
        )
        return dx.view(ctx.x_shape), grad_weight, grad_bias, None, None, None


def polyrelu_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    group: Optional[dist.ProcessGroup] = None,
    tokens_per_expert: TokensPerExpert = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """PolyReLU(g) * u for ``x = [g, u]`` ``[..., 2n]`` -> ``[..., n]``; arguments as
    ``polynorm_glu`` (bias may be None)."""
    kernels = dispatch.kernels_for("polyrelu_glu", kernel, x.device)
    return PolyReLUGLUFunction.apply(x, weight, bias, group, tokens_per_expert, kernels)
