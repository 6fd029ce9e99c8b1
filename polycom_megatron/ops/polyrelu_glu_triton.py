"""PolyReLU-GLU's pieces as Triton kernels (``TritonPolyReLUGLUKernels``).

Same interface and semantics as ``TorchPolyReLUGLUKernels`` (see polyrelu_glu.py): x is
fc1's contiguous ``[rows, 2n]`` (gate, then up), y and dy ``[rows, n]``. float32
arithmetic for fp16/bf16/fp32 I/O; float64 and orders above ``MAX_ORDER`` go to the
PyTorch kernels. Launch planning and accumulators are shared with ``polynorm_triton``.

* ``_prg_fwd`` -- elementwise, one ``[BM, BN]`` tile per program:
  y = (a_0 + q (a_1 + q (a_2 + ...))) * u with q = relu(g).
* ``_prg_bwd`` -- reads g, u and dy once, writes dg = h * PolyReLU'(g) (h = dy * u) and
  du = dy * PolyReLU(g), and the per-row partial coefficient gradients
  ``[sum h, sum h q, ..., sum h q^r]`` (float32, no atomics); a row may be split over
  several programs when there are too few rows to fill the GPU.
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
from polycom_megatron.ops.polyrelu_glu import TorchPolyReLUGLUKernels


@triton.jit
def _horner(q, c, R: tl.constexpr, KP: tl.constexpr, SLOPE: tl.constexpr):
    """sum_p c_p q^p (SLOPE=0), or its derivative sum_p p c_p q^(p-1) (SLOPE=1)."""
    k = tl.arange(0, KP)[None, :]
    w = c * k if SLOPE else c
    out = tl.sum(tl.where(k == R, w, 0.0), axis=1)[:, None]
    for i in tl.static_range(R - SLOPE):
        out = out * q + tl.sum(tl.where(k == R - 1 - i, w, 0.0), axis=1)[:, None]
    return out


@triton.jit
def _prg_fwd(x_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks, R: tl.constexpr,
             HAS_SETS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    goffs = offs + r_idx.to(tl.int64)[:, None] * n  # row * 2n + column
    g = tl.load(x_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + goffs + n, mask=mask, other=0.0).to(tl.float32)
    q = tl.where(g < 0.0, 0.0, g)  # relu that lets NaN through, as torch.relu does
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    y = _horner(q, c, R, KP, 0) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prg_bwd(x_ptr, dy_ptr, coeffs_ptr, sets_ptr, dx_ptr, part_ptr, rows, n, cols_per_split,
             row_blocks, R: tl.constexpr, HAS_SETS: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, KP: tl.constexpr):
    pid_s, r_idx, rmask, ybase, c_lo, c_hi = _split_coords(rows, n, cols_per_split,
                                                           row_blocks, BM)
    xbase = 2 * ybase
    cols0 = tl.arange(0, BN)[None, :]
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    k = tl.arange(0, KP)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        g = tl.load(x_ptr + xbase + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ybase + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.where(g < 0.0, 0.0, g)
        h = dy * u
        dg = tl.where(g > 0.0, h * _horner(q, c, R, KP, 1), 0.0)
        du = dy * _horner(q, c, R, KP, 0)
        tl.store(dx_ptr + xbase + cols, dg.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dx_ptr + xbase + n + cols, du.to(dx_ptr.dtype.element_ty), mask=m)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, q, h, R, True)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    row_off = (pid_s.to(tl.int64) * rows + r_idx) * (R + 1)
    tl.store(part_ptr + row_off[:, None] + k, t, mask=rmask[:, None] & (k <= R))


class TritonPolyReLUGLUKernels:
    """Triton kernel set for PolyReLU-GLU; see the module docstring."""

    name = "triton"

    @staticmethod
    def forward(x, coeffs, sets):
        order = coeffs.shape[1] - 1
        if not pt.usable(x, order):
            return TorchPolyReLUGLUKernels.forward(x, coeffs, sets)
        x = x.contiguous()
        rows, n = x.shape[0], x.shape[1] // 2
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        bm, bn, col_blocks = pt.tile_plan(rows, n)
        _prg_fwd[(-(-rows // bm) * col_blocks,)](
            x, coeffs, sets_ptr, y, rows, n, col_blocks, R=order, HAS_SETS=has_sets,
            BM=bm, BN=bn, KP=pt.kp(order), num_warps=pt.warps(bm * bn),
        )
        return y

    @staticmethod
    def backward(x, dy, coeffs, sets):
        """-> (dx ``[rows, 2n]``, per-row ``[sum h, sum h*q, ..., sum h*q^r]`` float32)."""
        order = coeffs.shape[1] - 1
        if not pt.usable(x, order):
            return TorchPolyReLUGLUKernels.backward(x, dy, coeffs, sets)
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = x.shape[0], x.shape[1] // 2
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        bm, bn, nsplit, per_split = pt.reduce_plan(rows, n, x.device)
        row_blocks = -(-rows // bm)
        dx = torch.empty_like(x)
        part = torch.empty(nsplit, rows, order + 1, device=x.device, dtype=torch.float32)
        _prg_bwd[(row_blocks * nsplit,)](
            x, dy, coeffs, sets_ptr, dx, part, rows, n, per_split, row_blocks,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=pt.kp(order),
            num_warps=pt.warps(bm * bn),
        )
        return dx, (part[0] if nsplit == 1 else part.sum(dim=0))
