"""PolyNorm: the math, its PyTorch kernels and its autograd Function.

    PolyNorm(x) = a_0 + sum_{p=1..r} a_p * N(x^p),   N(v) = v / sqrt(mean(v^2) + eps)

The mean runs over the whole FFN hidden dimension of a token. Under tensor parallelism
each rank holds a slice of that dimension, so the per-row sums of squares are all-reduced
over the tensor-parallel group before normalising, and in backward the per-row dot
products that the normalisation's gradient needs are all-reduced likewise. With that
the op is exact at any TP size, and the coefficient gradients come out complete (not
partial) on every rank, so no later gradient reduction may touch them.

Backward, per row, with u_p = x^p, s_p = 1/sqrt(mean(u_p^2) + eps) over n columns,
g = dL/dy, D_p = sum_j g_j u_pj and G = sum_j g_j:

    dL/da_p = D_p * s_p           dL/da_0 = G
    dL/du_p = a_p * s_p * (g - u_p * D_p * s_p^2 / n)
    dL/dx   = sum_p dL/du_p * p * x^(p-1)

Only the input and ``r`` float32 statistics per row are saved for backward.
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
    group_size,
    row_sets,
    split_table_grad,
    sum_rows_per_set,
)


def polynorm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The formula written out directly (single device, one coefficient set).

    Used by the tests as ground truth and by the benchmark as "naive PyTorch".
    """
    xf = upcast(x)
    order = weight.shape[-1]

    def norm(v):
        return v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)

    out = upcast(bias)
    for i in range(order):
        out = out + upcast(weight[i]) * norm(xf.pow(order - i))
    return out.to(x.dtype)


class TorchPolyNormKernels:
    """The op's heavy pieces in plain PyTorch (float32 or wider inside). Any tensor, any device.

    A kernel set works on contiguous ``[rows, n]`` inputs; ``coeffs`` is the
    ``[sets, r + 1]`` table of ``common.coeff_table`` and ``sets`` the per-row set index
    (or None). A faster set (Triton) provides the same methods, and may add
    ``forward_fused`` / ``backward_fused`` used when no reduction sits in between.
    """

    name = "torch"

    @staticmethod
    def moments(x: torch.Tensor, order: int) -> torch.Tensor:
        """Per-row sums of x^(2p), p = 1..order -> ``[rows, order]``."""
        xf = upcast(x)
        power = xf
        sums = []
        for _ in range(order):
            sums.append(power.square().sum(dim=-1))
            power = power * xf
        return torch.stack(sums, dim=-1)

    @staticmethod
    def forward(x, inv_rms, coeffs, sets):
        xf = upcast(x)
        c = coeffs_per_row(coeffs, sets)
        out = torch.broadcast_to(c[:, :1], xf.shape).clone()
        power = xf
        for p in range(1, inv_rms.shape[1] + 1):
            out = out + (c[:, p : p + 1] * inv_rms[:, p - 1 : p]) * power
            power = power * xf
        return out.to(x.dtype)

    @staticmethod
    def backward_dots(x, dy, order):
        """Per-row ``[sum g, sum g*x, ..., sum g*x^order]`` -> ``[rows, order+1]``."""
        xf, g = upcast(x), upcast(dy)
        dots = [g.sum(dim=-1)]
        power = xf
        for _ in range(order):
            dots.append((g * power).sum(dim=-1))
            power = power * xf
        return torch.stack(dots, dim=-1)

    @staticmethod
    def backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total):
        xf, g = upcast(x), upcast(dy)
        c = coeffs_per_row(coeffs, sets)
        dx = torch.zeros_like(xf)
        power_below = torch.ones_like(xf)  # x^(p-1)
        for p in range(1, inv_rms.shape[1] + 1):
            s = inv_rms[:, p - 1 : p]
            correction = dots[:, p : p + 1] * s * s / n_total
            power = power_below * xf
            du = (c[:, p : p + 1] * s) * (g - power * correction)
            dx = dx + du * (p * power_below)
            power_below = power
        return dx.to(x.dtype)


def normalised_forward(kernels, rows, coeffs, sets, eps, n_total, group):
    """-> (y, inv_rms): the fused kernel on one device, else moments all-reduced over TP.

    Shared with PolyNorm-GLU, whose kernel sets take fc1's ``[rows, 2n]`` instead.
    """
    fused = getattr(kernels, "forward_fused", None)
    if fused is not None and group_size(group) == 1:
        return fused(rows, coeffs, sets, eps)
    moments = kernels.moments(rows, coeffs.shape[1] - 1)
    all_reduce_sum(moments, group)
    inv_rms = torch.rsqrt(moments / n_total + eps)
    return kernels.forward(rows, inv_rms, coeffs, sets), inv_rms


def normalised_backward(kernels, rows, dy, inv_rms, coeffs, sets, n_total, group, weight, bias):
    """-> (dx, grad_weight, grad_bias), the dot products all-reduced over TP in between."""
    fused = getattr(kernels, "backward_fused", None)
    if fused is not None and group_size(group) == 1:
        dx, dots = fused(rows, dy, inv_rms, coeffs, sets, n_total)
    else:
        dots = kernels.backward_dots(rows, dy, inv_rms.shape[1])
        all_reduce_sum(dots, group)
        dx = kernels.backward_dx(rows, dy, inv_rms, dots, coeffs, sets, n_total)
    # dots were all-reduced, so these are the full coefficient gradients on every rank.
    row_grads = torch.cat([dots[:, :1], dots[:, 1:] * inv_rms], dim=-1)
    table_grad = sum_rows_per_set(row_grads, sets, coeffs.shape[0])
    grad_weight, grad_bias = split_table_grad(table_grad, weight, bias)
    return dx, grad_weight, grad_bias


class PolyNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, tokens_per_expert, kernels):
        rows = as_rows(x)
        coeffs = coeff_table(weight, bias)
        sets = row_sets(tokens_per_expert, coeffs.shape[0], rows.shape[0], x.device)
        n_total = rows.shape[1] * group_size(group)
        y, inv_rms = normalised_forward(kernels, rows, coeffs, sets, eps, n_total, group)
        ctx.save_for_backward(rows, inv_rms, coeffs, sets, weight, bias)
        ctx.group, ctx.kernels, ctx.n_total = group, kernels, n_total
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        rows, inv_rms, coeffs, sets, weight, bias = ctx.saved_tensors
        group, kernels, n_total = ctx.group, ctx.kernels, ctx.n_total
        dx, grad_weight, grad_bias = normalised_backward(
            kernels, rows, as_rows(grad_out), inv_rms, coeffs, sets, n_total, group, weight, bias
        )
        return dx.view(grad_out.shape), grad_weight, grad_bias, None, None, None, None


def polynorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    *,
    group: Optional[dist.ProcessGroup] = None,
    tokens_per_expert: TokensPerExpert = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """PolyNorm over the last dimension of ``x`` (any leading shape), output in x's dtype.

    weight: ``[r]`` with ``weight[i]`` multiplying the (r-i)-th power, bias: ``[1]``;
    or ``[E, r]`` / ``[E, 1]`` with ``tokens_per_expert`` for per-expert coefficients.
    group: the process group over which the last dimension is sharded (TP), or None.
    kernel: "auto", "torch", "compile" or "triton" (see ``polycom_megatron.config``).
    """
    kernels = dispatch.kernels_for("polynorm", kernel, x.device)
    return PolyNormFunction.apply(x, weight, bias, eps, group, tokens_per_expert, kernels)
