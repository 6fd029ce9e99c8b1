"""PolyNorm-GLU's pieces as Triton kernels (``TritonPolyNormGLUKernels``).

Same interface and semantics as ``TorchPolyNormGLUKernels`` (see polynorm_glu.py): x is
fc1's contiguous ``[rows, 2n]`` (gate columns [0, n), up columns [n, 2n)), y and dy are
``[rows, n]``, dx is ``[rows, 2n]``. float32 arithmetic for fp16/bf16/fp32 I/O; the gate
PolyNorm(g) is never rounded before it multiplies u. float64 and orders above
``MAX_ORDER`` go to the PyTorch kernels. The shapes of work, the launch planning and the
per-lane accumulators are those of ``polynorm_triton`` (read its docstring first):

* ``_png_fwd_fused`` -- single device: the gate's r sums of squares, then
  y = PolyNorm(g) * u; a row that fits one block is read once (gate, then up).
* ``_png_bwd_fused`` -- single device: reads g, u and dy, reduces the r + 1 dot products
  ``sum h g^p`` with h = dy * u, then writes dg (PolyNorm's input gradient for h) and
  du = dy * PolyNorm(g) side by side.
* ``_png_stats`` -- the reductions alone, for tensor parallelism (the Function
  all-reduces them); a row may be split over several programs.
* ``_png_fwd_tile`` / ``_png_dx_tile`` -- the elementwise halves given the statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_megatron.ops import polynorm_triton as pt
from polycom_megatron.ops.polynorm_glu import TorchPolyNormGLUKernels
from polycom_megatron.ops.polynorm_triton import (
    _accum,
    _coef_table,
    _pn_dx,
    _pn_out,
    _split_coords,
    _tile_coords,
    _to_table,
)

# Rows of x are 2n wide: a row's gate starts at 2 * row * n, its up half n further on.


@triton.jit
def _png_fwd_fused(x_ptr, coeffs_ptr, sets_ptr, y_ptr, inv_ptr, rows, n, inv_n, eps,
                   R: tl.constexpr, HAS_SETS: tl.constexpr, SINGLE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    ybase = r_idx.to(tl.int64)[:, None] * n
    xbase = 2 * ybase
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        g = tl.load(x_ptr + xbase + cols0, mask=mask, other=0.0).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, g * g, 1.0, R, False)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            gc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, gc * gc, 1.0, R, False)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, False, BM, KP)
    k = tl.arange(0, KP)[None, :]
    s = 1.0 / tl.sqrt(t * inv_n + eps)
    tl.store(inv_ptr + r_idx[:, None] * R + (k - 1), s,
             mask=rmask[:, None] & (k >= 1) & (k <= R))
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    if SINGLE:
        u = tl.load(x_ptr + xbase + n + cols0, mask=mask, other=0.0).to(tl.float32)
        y = _pn_out(g, kk, R, KP) * u
        tl.store(y_ptr + ybase + cols0, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            gc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            uc = tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            y = _pn_out(gc, kk, R, KP) * uc
            tl.store(y_ptr + ybase + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _png_bwd_fused(x_ptr, dy_ptr, inv_ptr, coeffs_ptr, sets_ptr, dx_ptr, dots_ptr, rows, n,
                   inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr, SINGLE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    ybase = r_idx.to(tl.int64)[:, None] * n
    xbase = 2 * ybase
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        g = tl.load(x_ptr + xbase + cols0, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + xbase + n + cols0, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ybase + cols0, mask=mask, other=0.0).to(tl.float32)
        h = dy * u
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, g, h, R, True)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            gc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            uc = tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            dyc = tl.load(dy_ptr + ybase + cols, mask=m, other=0.0,
                          eviction_policy="evict_last").to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, gc, dyc * uc, R, True)
    dots = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    k = tl.arange(0, KP)[None, :]
    tl.store(dots_ptr + r_idx[:, None] * (R + 1) + k, dots, mask=rmask[:, None] & (k <= R))
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    corr = dots * s * s * inv_n_total
    if SINGLE:
        dg = _pn_dx(g, h, kk, corr, R, KP)
        du = dy * _pn_out(g, kk, R, KP)
        tl.store(dx_ptr + xbase + cols0, dg.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + xbase + n + cols0, du.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            gc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            uc = tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            dyc = tl.load(dy_ptr + ybase + cols, mask=m, other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
            dg = _pn_dx(gc, dyc * uc, kk, corr, R, KP)
            du = dyc * _pn_out(gc, kk, R, KP)
            tl.store(dx_ptr + xbase + cols, dg.to(dx_ptr.dtype.element_ty), mask=m)
            tl.store(dx_ptr + xbase + n + cols, du.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _png_stats(x_ptr, dy_ptr, out_ptr, rows, n, cols_per_split, row_blocks,
               R: tl.constexpr, DOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               KP: tl.constexpr):
    """Partial row sums over this program's gate columns -> out[split, row, :].

    DOTS=0: sums of g^(2p), p = 1..R. DOTS=1: sum h, sum h g^p with h = dy * u.
    """
    pid_s, r_idx, rmask, ybase, c_lo, c_hi = _split_coords(rows, n, cols_per_split,
                                                           row_blocks, BM)
    xbase = 2 * ybase
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        gc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0).to(tl.float32)
        if DOTS:
            uc = tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0).to(tl.float32)
            dyc = tl.load(dy_ptr + ybase + cols, mask=m, other=0.0).to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, gc, dyc * uc, R, True)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, gc * gc, 1.0, R, False)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, DOTS, BM, KP)
    k = tl.arange(0, KP)[None, :]
    width = R + DOTS
    shift = 1 - DOTS
    row_off = (pid_s.to(tl.int64) * rows + r_idx) * width
    tl.store(out_ptr + row_off[:, None] + (k - shift), t,
             mask=rmask[:, None] & (k >= shift) & (k <= R))


@triton.jit
def _png_fwd_tile(x_ptr, inv_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks,
                  R: tl.constexpr, HAS_SETS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    goffs = offs + r_idx.to(tl.int64)[:, None] * n  # row * 2n + column
    g = tl.load(x_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + goffs + n, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    y = _pn_out(g, tl.where(k == 0, c, c * s), R, KP) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _png_dx_tile(x_ptr, dy_ptr, inv_ptr, dots_ptr, coeffs_ptr, sets_ptr, dx_ptr, rows, n,
                 col_blocks, inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    goffs = offs + r_idx.to(tl.int64)[:, None] * n
    g = tl.load(x_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + goffs + n, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    dots = tl.load(dots_ptr + r_idx[:, None] * (R + 1) + k,
                   mask=rmask[:, None] & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    dg = _pn_dx(g, dy * u, kk, dots * s * s * inv_n_total, R, KP)
    du = dy * _pn_out(g, kk, R, KP)
    tl.store(dx_ptr + goffs, dg.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + goffs + n, du.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# The kernel set
# --------------------------------------------------------------------------------------


def _stats(x, dy, order, dots):
    rows, n = x.shape[0], x.shape[1] // 2
    bm, bn, nsplit, per_split = pt.reduce_plan(rows, n, x.device)
    row_blocks = -(-rows // bm)
    out = torch.empty(nsplit, rows, order + int(dots), device=x.device, dtype=torch.float32)
    _png_stats[(row_blocks * nsplit,)](
        x, dy if dy is not None else x, out, rows, n, per_split, row_blocks,
        R=order, DOTS=int(dots), BM=bm, BN=bn, KP=pt.kp(order), num_warps=pt.warps(bm * bn),
    )
    return out[0] if nsplit == 1 else out.sum(dim=0)


def _fused_plan(x):
    """(BM, BN, single, row programs), or None when few wide rows should be split instead."""
    rows, n = x.shape[0], x.shape[1] // 2
    bm, bn, single = pt.row_tile(rows, n, pt.WHOLE_ROW_MAX)
    row_programs = -(-rows // bm)
    if not single and pt.splits(row_programs, -(-n // bn), x.device) > 1:
        return None
    return bm, bn, single, row_programs


class TritonPolyNormGLUKernels:
    """Triton kernel set for PolyNorm-GLU; see the module docstring."""

    name = "triton"

    @staticmethod
    def moments(x, order):
        if not pt.usable(x, order):
            return TorchPolyNormGLUKernels.moments(x, order)
        return _stats(x.contiguous(), None, order, dots=False)

    @staticmethod
    def forward(x, inv_rms, coeffs, sets):
        order = inv_rms.shape[1]
        if not pt.usable(x, order):
            return TorchPolyNormGLUKernels.forward(x, inv_rms, coeffs, sets)
        x = x.contiguous()
        rows, n = x.shape[0], x.shape[1] // 2
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        bm, bn, col_blocks = pt.tile_plan(rows, n)
        _png_fwd_tile[(-(-rows // bm) * col_blocks,)](
            x, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, y, rows, n, col_blocks,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=pt.kp(order),
            num_warps=pt.warps(bm * bn),
        )
        return y

    @staticmethod
    def backward_dots(x, dy, order):
        if not pt.usable(x, order):
            return TorchPolyNormGLUKernels.backward_dots(x, dy, order)
        return _stats(x.contiguous(), dy.contiguous(), order, dots=True)

    @staticmethod
    def backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total):
        order = inv_rms.shape[1]
        if not pt.usable(x, order):
            return TorchPolyNormGLUKernels.backward_dx(
                x, dy, inv_rms, dots, coeffs, sets, n_total
            )
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = x.shape[0], x.shape[1] // 2
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        bm, bn, col_blocks = pt.tile_plan(rows, n)
        _png_dx_tile[(-(-rows // bm) * col_blocks,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), dots.to(torch.float32).contiguous(),
            coeffs, sets_ptr, dx, rows, n, col_blocks, 1.0 / n_total,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=pt.kp(order),
            num_warps=pt.warps(bm * bn),
        )
        return dx

    @staticmethod
    def forward_fused(x, coeffs, sets, eps):
        """Single device: -> (y ``[rows, n]``, inv_rms ``[rows, r]`` float32)."""
        order = coeffs.shape[1] - 1
        rows, n = x.shape[0], x.shape[1] // 2
        plan = _fused_plan(x) if pt.usable(x, order) else None
        if plan is None:  # the split pieces (float64, high orders or few wide rows)
            inv_rms = torch.rsqrt(TritonPolyNormGLUKernels.moments(x, order) / n + eps)
            return TritonPolyNormGLUKernels.forward(x, inv_rms, coeffs, sets), inv_rms
        bm, bn, single, row_programs = plan
        x = x.contiguous()
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        inv_rms = torch.empty(rows, order, device=x.device, dtype=torch.float32)
        _png_fwd_fused[(row_programs,)](
            x, coeffs, sets_ptr, y, inv_rms, rows, n, 1.0 / n, eps,
            R=order, HAS_SETS=has_sets, SINGLE=single, BM=bm, BN=bn, KP=pt.kp(order),
            num_warps=pt.warps(bm * bn),
        )
        return y, inv_rms

    @staticmethod
    def backward_fused(x, dy, inv_rms, coeffs, sets, n_total):
        """Single device: -> (dx ``[rows, 2n]``, dots ``[rows, r + 1]`` float32)."""
        order = inv_rms.shape[1]
        plan = _fused_plan(x) if pt.usable(x, order) else None
        if plan is None:
            dots = TritonPolyNormGLUKernels.backward_dots(x, dy, order)
            dx = TritonPolyNormGLUKernels.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total)
            return dx, dots
        bm, bn, single, row_programs = plan
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = x.shape[0], x.shape[1] // 2
        coeffs = pt.as_table(coeffs)
        sets_ptr, has_sets = pt.sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        dots = torch.empty(rows, order + 1, device=x.device, dtype=torch.float32)
        _png_bwd_fused[(row_programs,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, dx, dots, rows, n,
            1.0 / n_total, R=order, HAS_SETS=has_sets, SINGLE=single, BM=bm, BN=bn,
            KP=pt.kp(order), num_warps=pt.warps(bm * bn),
        )
        return dx, dots
