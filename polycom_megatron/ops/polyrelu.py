"""PolyReLU: the math, its PyTorch kernels and its autograd Function.

    PolyReLU(x) = a_0 + sum_{p=1..r} a_p * relu(x)^p

Elementwise, so tensor parallelism needs no statistics. The coefficient gradients,
however, are sums over the FFN hidden dimension, which TP splits across ranks: each rank
holds a partial sum. The Function all-reduces them over the tensor-parallel group in
backward, so every rank ends with the full gradient whether or not sequence parallelism
is on, and no later gradient reduction may touch them.

Backward, with q = relu(x) and g = dL/dy:

    dL/da_p = sum g * q^p        dL/da_0 = sum g
    dL/dx   = g * sum_p p * a_p * q^(p-1) * [x > 0]

Only the input is saved for backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from polycom_megatron.ops import dispatch
from polycom_megatron.ops.common import (
    TokensPerExpert,
    upcast,
    all_reduce_sum,
    as_rows,
    coeff_table,
    coeffs_per_row,
    row_sets,
    split_table_grad,
    sum_rows_per_set,
)


def polyrelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The formula written out directly (one coefficient set); ground truth for tests."""
    q = torch.relu(upcast(x))
    order = weight.shape[-1]
    out = upcast(bias)
    for i in range(order):
        out = out + upcast(weight[i]) * q.pow(order - i)
    return out.to(x.dtype)


class TorchPolyReLUKernels:
    """The op's pieces in plain PyTorch (float32 or wider inside); see ``TorchPolyNormKernels``."""

    name = "torch"

    @staticmethod
    def forward(x, coeffs, sets):
        q = torch.relu(upcast(x))
        c = coeffs_per_row(coeffs, sets)
        order = c.shape[1] - 1
        # Horner's rule: a_0 + q (a_1 + q (a_2 + ...)).
        out = torch.broadcast_to(c[:, order : order + 1], q.shape).clone()
        for p in range(order - 1, -1, -1):
            out = out * q + c[:, p : p + 1]
        return out.to(x.dtype)

    @staticmethod
    def backward(x, dy, coeffs, sets):
        """-> (dx, per-row ``[sum g, sum g*q, ..., sum g*q^r]`` float32 ``[rows, r+1]``)."""
        xf, g = upcast(x), upcast(dy)
        q = torch.relu(xf)
        c = coeffs_per_row(coeffs, sets)
        order = c.shape[1] - 1
        slope = torch.zeros_like(q)
        power_below = torch.ones_like(q)  # q^(p-1)
        row_grads = [g.sum(dim=-1)]
        for p in range(1, order + 1):
            slope = slope + (p * c[:, p : p + 1]) * power_below
            power_below = power_below * q
            row_grads.append((g * power_below).sum(dim=-1))
        dx = torch.where(xf > 0, g * slope, torch.zeros_like(g))
        return dx.to(x.dtype), torch.stack(row_grads, dim=-1)


def elementwise_backward(kernels, rows, dy, coeffs, sets, group, weight, bias):
    """-> (dx, grad_weight, grad_bias), the coefficient gradients summed over TP.

    Shared with PolyReLU-GLU, whose kernel sets take fc1's ``[rows, 2n]`` instead.
    """
    dx, row_grads = kernels.backward(rows, dy, coeffs, sets)
    table_grad = sum_rows_per_set(row_grads, sets, coeffs.shape[0])
    # Each TP rank summed over its own slice of the hidden dimension.
    all_reduce_sum(table_grad, group)
    grad_weight, grad_bias = split_table_grad(table_grad, weight, bias)
    return dx, grad_weight, grad_bias


class PolyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, tokens_per_expert, kernels):
        rows = as_rows(x)
        coeffs = coeff_table(weight, bias)
        sets = row_sets(tokens_per_expert, coeffs.shape[0], rows.shape[0], x.device)
        y = kernels.forward(rows, coeffs, sets)
        ctx.save_for_backward(rows, coeffs, sets, weight, bias)
        ctx.group, ctx.kernels = group, kernels
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        rows, coeffs, sets, weight, bias = ctx.saved_tensors
        dx, grad_weight, grad_bias = elementwise_backward(
            ctx.kernels, rows, as_rows(grad_out), coeffs, sets, ctx.group, weight, bias
        )
        return dx.view(grad_out.shape), grad_weight, grad_bias, None, None, None


def polyrelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    tokens_per_expert: TokensPerExpert = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """PolyReLU of ``x`` (any shape), output in x's dtype; arguments as ``polynorm``."""
    kernels = dispatch.kernels_for("polyrelu", kernel, x.device)
    return PolyReLUFunction.apply(x, weight, bias, group, tokens_per_expert, kernels)
