"""PolyReLU's pieces as Triton kernels (``TritonPolyReLUKernels``).

Same interface and semantics as ``TorchPolyReLUKernels`` (see polyrelu.py), float32
arithmetic for fp16/bf16/fp32 I/O; float64 and orders above ``MAX_ORDER`` go to the
PyTorch kernels. Launch planning and the per-lane accumulators are shared with
``polynorm_triton``.

* ``_pr_fwd`` -- elementwise: y = a_0 + q (a_1 + q (a_2 + ...)), q = relu(x), Horner's rule.
  With one coefficient set the tensor is treated as one long row (no per-row work at all);
  with per-expert sets each ``[BM, BN]`` tile gathers its rows' coefficients.
* ``_pr_bwd`` -- reads x and dy once, writes dx and the per-row partial coefficient
  gradients ``[sum g, sum g q, ..., sum g q^r]`` (float32, no atomics). Rows are looped over
  in column blocks with per-lane float32 sums; when there are too few rows to fill the GPU a
  row is split over several programs and the partial rows are added afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_megatron.ops import polynorm_triton as pt
from polycom_megatron.ops.polynorm_triton import (
    _accum,
    _coef_table,
    _split_coords,
    _tile_coords,
    _to_table,
)
from polycom_megatron.ops.polyrelu import TorchPolyReLUKernels


@triton.jit
def _pr_fwd(x_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks, R: tl.constexpr,
            HAS_SETS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.where(x < 0.0, 0.0, x)  # relu that lets NaN through, as torch.relu does
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    k = tl.arange(0, KP)[None, :]
    y = tl.sum(tl.where(k == R, c, 0.0), axis=1)[:, None]
    for i in tl.static_range(R):
        y = y * q + tl.sum(tl.where(k == R - 1 - i, c, 0.0), axis=1)[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pr_bwd(x_ptr, g_ptr, coeffs_ptr, sets_ptr, dx_ptr, part_ptr, rows, n, cols_per_split,
            row_blocks, R: tl.constexpr, HAS_SETS: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, KP: tl.constexpr):
    pid_s, r_idx, rmask, base, c_lo, c_hi = _split_coords(rows, n, cols_per_split, row_blocks, BM)
    cols0 = tl.arange(0, BN)[None, :]
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    k = tl.arange(0, KP)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.where(x < 0.0, 0.0, x)
        # slope = sum_p p a_p q^(p-1), Horner's rule from the top power down.
        slope = tl.sum(tl.where(k == R, c * R, 0.0), axis=1)[:, None]
        for i in tl.static_range(R - 1):
            p = R - 1 - i
            slope = slope * q + tl.sum(tl.where(k == p, c * p, 0.0), axis=1)[:, None]
        dx = tl.where(x > 0.0, g * slope, 0.0)
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, q, g, R, True)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    row_off = (pid_s.to(tl.int64) * rows + r_idx) * (R + 1)
    tl.store(part_ptr + row_off[:, None] + k, t, mask=rmask[:, None] & (k <= R))


class TritonPolyReLUKernels:
    """Triton kernel set for PolyReLU; see the module docstring."""

    name = "triton"

    @staticmethod
    def forward(x, coeffs, sets):
        order = coeffs.shape[1] - 1
        if not pt.usable(x, order):
            return TorchPolyReLUKernels.forward(x, coeffs, sets)
        x = x.contiguous()
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        rows, n = x.shape
        if not has_sets:
            rows, n = 1, x.numel()  # one set: elementwise over the flat tensor
        y = torch.empty_like(x)
        bm, bn, col_blocks = pt.tile_plan(rows, n)
        _pr_fwd[(-(-rows // bm) * col_blocks,)](
            x, coeffs, sets_ptr, y, rows, n, col_blocks, R=order, HAS_SETS=has_sets,
            BM=bm, BN=bn, KP=pt.kp(order), num_warps=pt.warps(bm * bn),
        )
        return y

    @staticmethod
    def backward(x, dy, coeffs, sets):
        """-> (dx, per-row ``[sum g, sum g*q, ..., sum g*q^r]`` float32 ``[rows, r+1]``)."""
        order = coeffs.shape[1] - 1
        if not pt.usable(x, order):
            return TorchPolyReLUKernels.backward(x, dy, coeffs, sets)
        x, dy = x.contiguous(), dy.contiguous()
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        rows, n = x.shape
        bm, bn, nsplit, per_split = pt.reduce_plan(rows, n, x.device)
        row_blocks = -(-rows // bm)
        dx = torch.empty_like(x)
        part = torch.empty(nsplit, rows, order + 1, device=x.device, dtype=torch.float32)
        _pr_bwd[(row_blocks * nsplit,)](
            x, dy, coeffs, sets_ptr, dx, part, rows, n, per_split, row_blocks,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=pt.kp(order),
            num_warps=pt.warps(bm * bn),
        )
        return dx, (part[0] if nsplit == 1 else part.sum(dim=0))
