"""PolyNorm's heavy pieces as Triton kernels (``TritonPolyNormKernels``), for the plain
and, with ``GATED=True``, the gated form (PolyNorm-GLU, ``TritonPolyNormGLUKernels``).

Same interface and semantics as ``TorchPolyNormKernels`` (see polynorm.py): inputs are
contiguous ``[rows, n]``, ``coeffs`` is the ``[sets, r + 1]`` table indexed by power and
``sets`` the int32 coefficient set of every row (or None). Outputs come in x's dtype,
statistics in float32; all arithmetic is float32 whatever the I/O dtype (fp16, bf16,
fp32). float64 inputs, and orders above ``MAX_ORDER``, go to the PyTorch kernels.

Kernels (r, the order, is a compile-time constant; so are the block sizes):

* ``_pn_fwd_fused`` -- single-device forward. One program owns ``BM`` whole rows. When a
  row fits one block (power-of-two padded ``n <= WHOLE_ROW_MAX``, 4096 by default) it is
  read once, kept in registers, its r sums of squares reduced, and y written: one read of
  x, one write of y. Wider rows take two passes in the same program over column blocks of
  ``CHUNK_SIZES`` (sums of squares, then y); pass 1 loads with an L2 evict-last hint so
  that pass 2, which reads the row right after, is served by L2, not DRAM. When there are
  too few rows to fill the GPU, wide rows go through the split kernels below instead.
* ``_pn_bwd_fused`` -- single-device backward, same two shapes: reads x and dy, reduces
  the r + 1 dot products ``sum dy * x^p`` (stored: the Function turns them into the
  coefficient gradients), then writes dx. Powers are recomputed from x; only x and
  inv_rms ``[rows, r]`` are saved by the Function.
* ``_pn_stats`` -- the reductions alone (``moments`` and ``backward_dots``), used under
  tensor parallelism where the Function all-reduces them between the two halves. A row
  may be split over several programs (a 2-D grid, partial sums added afterwards) when
  there are too few rows to fill the GPU.
* ``_pn_fwd_tile`` / ``_pn_dx_tile`` -- the elementwise halves given the (all-reduced)
  statistics; one ``[BM, BN]`` tile per program.

Sums are kept per lane in float32 across column blocks and reduced across the block once
per row, so a wide row costs one block reduction per power, not one per block. Per-row
results (``[rows, r + 1]`` partials) are written without atomics; the Function reduces
them per coefficient set. With ``sets`` each program gathers ``coeffs[sets[row], p]``.

Gated (PolyNorm-GLU): x is fc1's ``[rows, 2n]``, gate columns [0, n) and up columns
[n, 2n); the statistics run over the gate, y = PolyNorm(g) * u is ``[rows, n]``, and
backward reduces ``sum h g^p`` with h = dy * u and writes dg and du = dy * PolyNorm(g)
side by side into dx ``[rows, 2n]``: the same kernels with one more load (and store) per
element, the gate never rounded before it multiplies u.

Launch planning and its tunables, and the device helpers shared with PolyReLU, are in
``triton_common``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_megatron.ops import triton_common as tc
from polycom_megatron.ops.polynorm import TorchPolyNormKernels
from polycom_megatron.ops.triton_common import (
    _accum,
    _coef_table,
    _split_coords,
    _tile_coords,
    _to_table,
)

# Callers (tests, the benchmark) ask the kernels' module whether it is interpreted.
interpreted = tc.interpreted

# Gated rows are 2n wide: a row's gate starts at 2 * row * n, its up half n further on, so
# x offsets are (1 + GATED) times the offsets of y and dy.


@triton.jit
def _pn_out(x, kk, R: tl.constexpr, KP: tl.constexpr):
    """y = k_0 + sum_p k_p x^p with kk[:, p] = a_p * inv_rms_p (kk[:, 0] = a_0)."""
    # Column p of a [BM, KP] table as [BM, 1] (loop-invariant; written out, not a helper
    # call, because nested calls are slow under the interpreter).
    k = tl.arange(0, KP)[None, :]
    y = tl.sum(tl.where(k == 0, kk, 0.0), axis=1)[:, None]
    y += tl.sum(tl.where(k == 1, kk, 0.0), axis=1)[:, None] * x
    pw = x
    for p in tl.static_range(2, R + 1):
        pw = pw * x
        y += tl.sum(tl.where(k == p, kk, 0.0), axis=1)[:, None] * pw
    return y


@triton.jit
def _pn_dx(x, g, cs, corr, R: tl.constexpr, KP: tl.constexpr):
    """dx = sum_p a_p s_p (g - x^p D_p s_p^2 / n) * p x^(p-1); cs = a s, corr = D s^2 / n."""
    k = tl.arange(0, KP)[None, :]
    cs_p = tl.sum(tl.where(k == 1, cs, 0.0), axis=1)[:, None]
    corr_p = tl.sum(tl.where(k == 1, corr, 0.0), axis=1)[:, None]
    dx = cs_p * (g - x * corr_p)
    pb = x
    for p in tl.static_range(2, R + 1):
        pw = pb * x
        cs_p = tl.sum(tl.where(k == p, cs, 0.0), axis=1)[:, None]
        corr_p = tl.sum(tl.where(k == p, corr, 0.0), axis=1)[:, None]
        dx += cs_p * (g - pw * corr_p) * (p * pb)
        pb = pw
    return dx



@triton.jit
def _pn_fwd_fused(x_ptr, coeffs_ptr, sets_ptr, y_ptr, inv_ptr, rows, n, inv_n, eps,
                  R: tl.constexpr, HAS_SETS: tl.constexpr, SINGLE: tl.constexpr,
                  GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    base = r_idx.to(tl.int64)[:, None] * n
    xbase = base * (1 + GATED)
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        x = tl.load(x_ptr + xbase + cols0, mask=mask, other=0.0).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, x * x, 1.0, R, False)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            # Pass 1 asks L2 to keep the row for pass 2 (wide rows x many programs in flight).
            xc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc * xc, 1.0, R, False)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, False, BM, KP)
    k = tl.arange(0, KP)[None, :]
    s = 1.0 / tl.sqrt(t * inv_n + eps)
    tl.store(inv_ptr + r_idx[:, None] * R + (k - 1), s,
             mask=rmask[:, None] & (k >= 1) & (k <= R))
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    if SINGLE:
        y = _pn_out(x, kk, R, KP)
        if GATED:
            y = y * tl.load(x_ptr + xbase + n + cols0, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + cols0, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            y = _pn_out(xc, kk, R, KP)
            if GATED:
                y = y * tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                                eviction_policy="evict_first").to(tl.float32)
            tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pn_bwd_fused(x_ptr, g_ptr, inv_ptr, coeffs_ptr, sets_ptr, dx_ptr, dots_ptr, rows, n,
                  inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr, SINGLE: tl.constexpr,
                  GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    # g = dL/dy; h = the gradient reaching PolyNorm's output (g, or g * u when gated).
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    base = r_idx.to(tl.int64)[:, None] * n
    xbase = base * (1 + GATED)
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        x = tl.load(x_ptr + xbase + cols0, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + cols0, mask=mask, other=0.0).to(tl.float32)
        h = g
        if GATED:
            h = g * tl.load(x_ptr + xbase + n + cols0, mask=mask, other=0.0).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, x, h, R, True)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            hc = tl.load(g_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            if GATED:
                hc = hc * tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                                  eviction_policy="evict_last").to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc, hc, R, True)
    dots = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    k = tl.arange(0, KP)[None, :]
    tl.store(dots_ptr + r_idx[:, None] * (R + 1) + k, dots, mask=rmask[:, None] & (k <= R))
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)  # columns 1..R: a_p s_p, what _pn_dx reads
    corr = dots * s * s * inv_n_total
    if SINGLE:
        dx = _pn_dx(x, h, kk, corr, R, KP)
        tl.store(dx_ptr + xbase + cols0, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if GATED:
            du = g * _pn_out(x, kk, R, KP)
            tl.store(dx_ptr + xbase + n + cols0, du.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            gc = tl.load(g_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            hc = gc
            if GATED:
                hc = gc * tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0,
                                  eviction_policy="evict_first").to(tl.float32)
                du = gc * _pn_out(xc, kk, R, KP)
                tl.store(dx_ptr + xbase + n + cols, du.to(dx_ptr.dtype.element_ty), mask=m)
            dx = _pn_dx(xc, hc, kk, corr, R, KP)
            tl.store(dx_ptr + xbase + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pn_stats(x_ptr, g_ptr, out_ptr, rows, n, cols_per_split, row_blocks,
              R: tl.constexpr, DOTS: tl.constexpr, GATED: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, KP: tl.constexpr):
    """Partial row sums over this program's column range -> out[split, row, :].

    DOTS=0: sums of x^(2p), p = 1..R (R columns). DOTS=1: sum h, sum h x^p (R + 1 columns),
    h = g (or g * u when gated).
    """
    pid_s, r_idx, rmask, base, c_lo, c_hi = _split_coords(rows, n, cols_per_split, row_blocks, BM)
    xbase = base * (1 + GATED)
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        xc = tl.load(x_ptr + xbase + cols, mask=m, other=0.0).to(tl.float32)
        if DOTS:
            hc = tl.load(g_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
            if GATED:
                hc = hc * tl.load(x_ptr + xbase + n + cols, mask=m, other=0.0).to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc, hc, R, True)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc * xc, 1.0, R, False)
    t = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, DOTS, BM, KP)
    k = tl.arange(0, KP)[None, :]
    width = R + DOTS
    shift = 1 - DOTS
    row_off = (pid_s.to(tl.int64) * rows + r_idx) * width
    tl.store(out_ptr + row_off[:, None] + (k - shift), t,
             mask=rmask[:, None] & (k >= shift) & (k <= R))


@triton.jit
def _pn_fwd_tile(x_ptr, inv_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks,
                 R: tl.constexpr, HAS_SETS: tl.constexpr, GATED: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    xoffs = offs
    if GATED:
        xoffs = offs + r_idx.to(tl.int64)[:, None] * n  # row * 2n + column
    x = tl.load(x_ptr + xoffs, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    y = _pn_out(x, kk, R, KP)
    if GATED:
        y = y * tl.load(x_ptr + xoffs + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pn_dx_tile(x_ptr, g_ptr, inv_ptr, dots_ptr, coeffs_ptr, sets_ptr, dx_ptr, rows, n,
                col_blocks, inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr,
                GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    xoffs = offs
    if GATED:
        xoffs = offs + r_idx.to(tl.int64)[:, None] * n  # row * 2n + column
    x = tl.load(x_ptr + xoffs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    dots = tl.load(dots_ptr + r_idx[:, None] * (R + 1) + k,
                   mask=rmask[:, None] & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    h = g
    if GATED:
        h = g * tl.load(x_ptr + xoffs + n, mask=mask, other=0.0).to(tl.float32)
        du = g * _pn_out(x, kk, R, KP)
        tl.store(dx_ptr + xoffs + n, du.to(dx_ptr.dtype.element_ty), mask=mask)
    dx = _pn_dx(x, h, kk, dots * s * s * inv_n_total, R, KP)
    tl.store(dx_ptr + xoffs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# The kernel sets
# --------------------------------------------------------------------------------------


def _launch_shape(x: torch.Tensor, gated: bool):
    """(rows, n): n is the width of y, and of the statistics (the gate's, when gated)."""
    return x.shape[0], x.shape[1] // 2 if gated else x.shape[1]


def _stats(x, g, order, dots, gated):
    rows, n = _launch_shape(x, gated)
    out_width = order + 1 if dots else order
    bm, bn, nsplit, per_split = tc.reduce_plan(rows, n, x.device)
    row_blocks = -(-rows // bm)
    out = torch.empty(nsplit, rows, out_width, device=x.device, dtype=torch.float32)
    _pn_stats[(row_blocks * nsplit,)](
        x, g if g is not None else x, out, rows, n, per_split, row_blocks,
        R=order, DOTS=int(dots), GATED=int(gated), BM=bm, BN=bn, KP=tc.kp(order),
        num_warps=tc.warps(bm * bn),
    )
    return out[0] if nsplit == 1 else out.sum(dim=0)


def _fused_plan(rows: int, n: int, device: torch.device):
    """(BM, BN, single, row programs) of a fused kernel, or None when there are too few
    wide rows to fill the device (they go through the split pieces instead)."""
    bm, bn, single = tc.row_tile(rows, n, tc.WHOLE_ROW_MAX)
    row_programs = -(-rows // bm)
    if not single and tc.splits(row_programs, -(-n // bn), device) > 1:
        return None
    return bm, bn, single, row_programs


class TritonPolyNormKernels:
    """Triton kernel set for PolyNorm; see the module docstring."""

    name = "triton"
    gated = False  # True in the PolyNorm-GLU subclass: x is fc1's [rows, 2n]
    fallback = TorchPolyNormKernels  # float64, orders above MAX_ORDER, empty inputs

    @classmethod
    def moments(cls, x: torch.Tensor, order: int) -> torch.Tensor:
        if not tc.usable(x, order):
            return cls.fallback.moments(x, order)
        return _stats(x.contiguous(), None, order, False, cls.gated)

    @classmethod
    def forward(cls, x, inv_rms, coeffs, sets):
        order = inv_rms.shape[1]
        if not tc.usable(x, order):
            return cls.fallback.forward(x, inv_rms, coeffs, sets)
        x = x.contiguous()
        rows, n = _launch_shape(x, cls.gated)
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        bm, bn, col_blocks = tc.tile_plan(rows, n)
        _pn_fwd_tile[(-(-rows // bm) * col_blocks,)](
            x, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, y, rows, n, col_blocks,
            R=order, HAS_SETS=has_sets, GATED=int(cls.gated), BM=bm, BN=bn, KP=tc.kp(order),
            num_warps=tc.warps(bm * bn),
        )
        return y

    @classmethod
    def backward_dots(cls, x, dy, order):
        if not tc.usable(x, order):
            return cls.fallback.backward_dots(x, dy, order)
        return _stats(x.contiguous(), dy.contiguous(), order, True, cls.gated)

    @classmethod
    def backward_dx(cls, x, dy, inv_rms, dots, coeffs, sets, n_total):
        order = inv_rms.shape[1]
        if not tc.usable(x, order):
            return cls.fallback.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total)
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = _launch_shape(x, cls.gated)
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        bm, bn, col_blocks = tc.tile_plan(rows, n)
        _pn_dx_tile[(-(-rows // bm) * col_blocks,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), dots.to(torch.float32).contiguous(),
            coeffs, sets_ptr, dx, rows, n, col_blocks, 1.0 / n_total,
            R=order, HAS_SETS=has_sets, GATED=int(cls.gated), BM=bm, BN=bn, KP=tc.kp(order),
            num_warps=tc.warps(bm * bn),
        )
        return dx

    @classmethod
    def forward_fused(cls, x, coeffs, sets, eps):
        """Single device: -> (y, inv_rms ``[rows, r]`` float32) in one pass over x."""
        order = coeffs.shape[1] - 1
        rows, n = _launch_shape(x, cls.gated)
        plan = _fused_plan(rows, n, x.device) if tc.usable(x, order) else None
        if plan is None:  # the pieces: PyTorch's (float64, ...) or few wide rows split
            inv_rms = torch.rsqrt(cls.moments(x, order) / n + eps)
            return cls.forward(x, inv_rms, coeffs, sets), inv_rms
        bm, bn, single, row_programs = plan
        x = x.contiguous()
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        inv_rms = torch.empty(rows, order, device=x.device, dtype=torch.float32)
        _pn_fwd_fused[(row_programs,)](
            x, coeffs, sets_ptr, y, inv_rms, rows, n, 1.0 / n, eps,
            R=order, HAS_SETS=has_sets, SINGLE=single, GATED=int(cls.gated), BM=bm, BN=bn,
            KP=tc.kp(order), num_warps=tc.warps(bm * bn),
        )
        return y, inv_rms

    @classmethod
    def backward_fused(cls, x, dy, inv_rms, coeffs, sets, n_total):
        """Single device: -> (dx, dots ``[rows, r + 1]`` float32) reading x and dy once."""
        order = inv_rms.shape[1]
        rows, n = _launch_shape(x, cls.gated)
        plan = _fused_plan(rows, n, x.device) if tc.usable(x, order) else None
        if plan is None:
            dots = cls.backward_dots(x, dy, order)
            return cls.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total), dots
        bm, bn, single, row_programs = plan
        x, dy = x.contiguous(), dy.contiguous()
        coeffs = tc.as_table(coeffs)
        sets_ptr, has_sets = tc.sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        dots = torch.empty(rows, order + 1, device=x.device, dtype=torch.float32)
        _pn_bwd_fused[(row_programs,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, dx, dots, rows, n,
            1.0 / n_total, R=order, HAS_SETS=has_sets, SINGLE=single, GATED=int(cls.gated),
            BM=bm, BN=bn, KP=tc.kp(order), num_warps=tc.warps(bm * bn),
        )
        return dx, dots
