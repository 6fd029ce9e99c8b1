"""PolyNorm-GLU: PolyNorm as the gate of a gated linear unit, and its autograd Function.

    PolyNorm-GLU([g, u]) = PolyNorm(g) * u        (elementwise)

The input is fc1's output ``[..., 2n]`` laid out as Megatron's gated linear unit lays it
out: on every tensor-parallel shard the first half of a row is that shard's slice of the
gate g, the second half its slice of the up projection u. PolyNorm's mean runs over the
whole gate width of a token, so under TP the per-row sums of g^(2p) are all-reduced
exactly as for the non-gated op (``polynorm.normalised_forward``), and so are the dot
products of backward; the coefficient gradients come out complete on every rank.

Backward, per row, with P = PolyNorm(g), dy = dL/dy and h = dy * u:

    dL/du = dy * P
    dL/dg = PolyNorm's input gradient for the upstream gradient h (see polynorm.py)
    dL/da_p = s_p * sum_j h_j g_j^p        dL/da_0 = sum_j h_j

Saved for backward: the input and ``r`` float32 statistics per row, nothing of size n.
``bias=None`` drops the a_0 term (the ``--pnglu`` form).
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
    group_size,
    row_sets,
    upcast,
)
from polycom_megatron.ops.polynorm import (
    TorchPolyNormKernels,
    normalised_backward,
    normalised_forward,
    polynorm_reference,
)


def polynorm_glu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-6
) -> torch.Tensor:
    """The formula written out directly (single device, one coefficient set)."""
    g, u = upcast(x).chunk(2, dim=-1)
    if bias is None:
        bias = weight.new_zeros(1)
    return (polynorm_reference(g, weight, bias, eps) * u).to(x.dtype)


class TorchPolyNormGLUKernels:
    """PolyNorm-GLU's pieces in plain PyTorch; the interface of ``TorchPolyNormKernels``
    with ``x`` being fc1's ``[rows, 2n]`` (statistics over the gate half) and y, dy
    ``[rows, n]``. float32 or wider inside; the gate is never rounded before the product.
    """

    name = "torch"

    @staticmethod
    def moments(x, order):
        return TorchPolyNormKernels.moments(gate_up(x)[0], order)

    @staticmethod
    def forward(x, inv_rms, coeffs, sets):
        g, u = gate_up(x)
        gate = TorchPolyNormKernels.forward(upcast(g), inv_rms, coeffs, sets)
        return (gate * upcast(u)).to(x.dtype)

    @staticmethod
    def backward_dots(x, dy, order):
        g, u = gate_up(x)
        return TorchPolyNormKernels.backward_dots(g, upcast(dy) * upcast(u), order)

    @staticmethod
    def backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total):
        g, u = gate_up(x)
        gf, dyf = upcast(g), upcast(dy)
        dg = TorchPolyNormKernels.backward_dx(
            gf, dyf * upcast(u), inv_rms, dots, coeffs, sets, n_total
        )
        du = dyf * TorchPolyNormKernels.forward(gf, inv_rms, coeffs, sets)
        return torch.cat([dg, du], dim=-1).to(x.dtype)


class PolyNormGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, tokens_per_expert, kernels):
        rows = glu_rows(x, "polynorm_glu")
        coeffs = coeff_table(weight, bias)
        sets = row_sets(tokens_per_expert, coeffs.shape[0], rows.shape[0], x.device)
        n = rows.shape[1] // 2
        n_total = n * group_size(group)
        y, inv_rms = normalised_forward(kernels, rows, coeffs, sets, eps, n_total, group)
        ctx.save_for_backward(rows, inv_rms, coeffs, sets, weight, bias)
        ctx.group, ctx.kernels, ctx.n_total, ctx.x_shape = group, kernels, n_total, x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_out):
        rows, inv_rms, coeffs, sets, weight, bias = ctx.saved_tensors
        dx, grad_weight, grad_bias = normalised_backward(
            ctx.kernels, rows, as_rows(grad_out), inv_rms, coeffs, sets, ctx.n_total,
            ctx.group, weight, bias,
        )
        return dx.view(ctx.x_shape), grad_weight, grad_bias, None, None, None, None


def polynorm_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    *,
    group: Optional[dist.ProcessGroup] = None,
    tokens_per_expert: TokensPerExpert = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """PolyNorm(g) * u for fc1's output ``x = [g, u]`` of shape ``[..., 2n]`` -> ``[..., n]``.

    Output in x's dtype, float32 inside. weight: ``[r]`` (``weight[i]`` multiplies power
    r-i) or ``[E, r]`` with ``tokens_per_expert``; bias: ``[1]`` / ``[E, 1]``, or None for
    no a_0 term. group: the process group sharding the FFN hidden dimension (TP), each
    rank holding ``[g_shard, u_shard]``; the mean runs over the whole gate width.
    kernel: "auto", "torch", "compile" or "triton" (see ``polycom_megatron.config``).
    """
    kernels = dispatch.kernels_for("polynorm_glu", kernel, x.device)
    return PolyNormGLUFunction.apply(x, weight, bias, eps, group, tokens_per_expert, kernels)
