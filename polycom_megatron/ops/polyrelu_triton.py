"""PolyReLU's pieces as Triton kernels (``TritonPolyReLUKernels``), for the plain and, with
``GATED=True``, the gated form (PolyReLU-GLU, ``TritonPolyReLUGLUKernels``).

Same interface and semantics as ``TorchPolyReLUKernels`` (see polyrelu.py), float32
arithmetic for fp16/bf16/fp32 I/O; float64 and orders above ``MAX_ORDER`` go to the
PyTorch kernels. Launch planning and the per-lane accumulators are in ``triton_common``.

* ``_pr_fwd`` -- elementwise: y = a_0 + q (a_1 + q (a_2 + ...)), q = relu(x), Horner's rule.
  With one coefficient set the plain tensor is treated as one long row (no per-row work at
  all); with per-expert sets, or gated, each ``[BM, BN]`` tile gathers its rows'
  coefficients.
* ``_pr_bwd`` -- reads x and dy once, writes dx and the per-row partial coefficient
  gradients ``[sum h, sum h q, ..., sum h q^r]`` (float32, no atomics), h = dy. Rows are
  looped over in column blocks with per-lane float32 sums; when there are too few rows to
  fill the GPU a row is split over several programs and the partial rows are added
  afterwards.

Gated (PolyReLU-GLU): x is fc1's ``[rows, 2n]`` (gate g, then up u), y = PolyReLU(g) * u
is ``[rows, n]``; backward takes h = dy * u and also writes du = dy * PolyReLU(g) beside
dg in dx ``[rows, 2n]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_megatron.ops import triton_common as tc
from polycom_megatron.ops.polyrelu import TorchPolyReLUKernels
from polycom_megatron.ops.triton_common import (
    _accum,
    _coef_table,
    _split_coords,
    _tile_coords,
    _to_table,
)


@triton.jit
def _horner(q, c, R: tl.constexpr, KP: tl.constexpr, SLOPE: tl.constexpr):
    """sum_p c_p q^p (SLOPE=0), or its derivative sum_p p c_p q^(p-1) (SLOPE=1)."""
    k = tl.arange(0, KP)[None, :]
    w = c
    if SLOPE:
        w = c * k
    out = tl.sum(tl.where(k == R, w, 0.0), axis=1)[:, None]
    for i in tl.static_range(R - SLOPE):
        out = out * q + tl.sum(tl.where(k == R - 1 - i, w, 0.0), axis=1)[:, None]
    return out


@triton.jit
def _pr_fwd(x_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks, R: tl.constexpr,
            HAS_SETS: tl.constexpr, GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    xoffs = offs
    if GATED:
        xoffs = offs + r_idx.to(tl.int64)[:, None] * n  # row * 2n + column
    x = tl.load(x_ptr + xoffs, mask=mask, other=0.0).to(tl.float32)
    q = tl.where(x < 0.0, 0.0, x)  # relu that lets NaN through, as torch.relu does
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    y = _horner(q, c, R, KP, 0)
    if GATED:
        y = y * tl.load(x_ptr + xoffs + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pr_bwd(x_ptr, g_ptr, coeffs_ptr, sets_ptr, dx_ptr, part_ptr, rows, n, cols_per_split,
            row_blocks, R: tl.constexpr, HAS_SETS: tl.constexpr, GATED: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    pid_s, r_idx, rmask, base, c_lo, c_hi = _split_coords(rows, n, cols_per_split, row_blocks, BM)
    xbase = base * (1 + GATED)
    cols0 = tl.arange(0, BN)[None, :]
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    k = tl.arange(0, KP)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        x = tl.load(x_ptr + xbase + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.where(x < 0.0, 0.0, x)
        h = g
        if GATED:
            h = g * tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0).to(tl.float32)
            du = g * _horner(q, c, R, KP, 0)
            tl.store(dx_ptr + xbase + n + cols, du.to(dx_ptr.dtype.element_ty), mask=m)
        dx = tl.where(x > 0.0, h * _horner(q, c, R, KP, 1), 0.0)
        tl.store(dx_ptr + xbase + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, q, h, R, True)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    row_off = (pid_s.to(tl.int64) * rows + r_idx) * (R + 1)
    tl.store(part_ptr + row_off[:, None] + k, t, mask=rmask[:, None] & (k <= R))


class TritonPolyReLUKernels:
    """Triton kernel set for PolyReLU; see the module docstring."""

    name = "triton"
    gated = False  # True in the PolyReLU-GLU subclass: x is fc1's [rows, 2n]
    fallback = TorchPolyReLUKernels  # float64, orders above MAX_ORDER, empty inputs

    @classmethod
    def forward(cls, x, coeffs, sets):
        order = coeffs.shape[1] - 1
        if not tc.usable(x, order):
            return cls.fallback.forward(x, coeffs, sets)
        x = x.contiguous()
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        rows, n = x.shape[0], x.shape[1] // 2 if cls.gated else x.shape[1]
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        if not has_sets and not cls.gated:
            rows, n = 1, x.numel()  # one set: elementwise over the flat tensor
        bm, bn, col_blocks = tc.tile_plan(rows, n)
        _pr_fwd[(-(-rows // bm) * col_blocks,)](
            x, coeffs, sets_ptr, y, rows, n, col_blocks, R=order, HAS_SETS=has_sets,
            GATED=int(cls.gated), BM=bm, BN=bn, KP=tc.kp(order), num_warps=tc.warps(bm * bn),
        )
        return y

    @classmethod
    def backward(cls, x, dy, coeffs, sets):
        """-> (dx, per-row ``[sum h, sum h*q, ..., sum h*q^r]`` float32 ``[rows, r+1]``)."""
        order = coeffs.shape[1] - 1
        if not tc.usable(x, order):
            return cls.fallback.backward(x, dy, coeffs, sets)
        x, dy = x.contiguous(), dy.contiguous()
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        rows, n = dy.shape
        bm, bn, nsplit, per_split = tc.reduce_plan(rows, n, x.device)
        row_blocks = -(-rows // bm)
        dx = torch.empty_like(x)
        part = torch.empty(nsplit, rows, order + 1, device=x.device, dtype=torch.float32)
        _pr_bwd[(row_blocks * nsplit,)](
            x, dy, coeffs, sets_ptr, dx, part, rows, n, per_split, row_blocks,
            R=order, HAS_SETS=has_sets, GATED=int(cls.gated), BM=bm, BN=bn, KP=tc.kp(order),
            num_warps=tc.warps(bm * bn),
        )
        return dx, (part[0] if nsplit == 1 else part.sum(dim=0))
