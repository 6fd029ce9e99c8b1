"""PolyNorm's heavy pieces as Triton kernels (``TritonPolyNormKernels``).

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

The tunables below are module attributes read at call time (tests shrink them so the
multi-block paths run on small shapes under the interpreter).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from polycom_megatron.ops.polynorm import TorchPolyNormKernels

# Highest order with Triton kernels (one per-lane accumulator per power is spelled out).
MAX_ORDER = 8


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# Launch tunables. Defaults chosen from register counts on sm_90 (several programs per SM,
# about 8 elements per thread); POLYCOM_TRITON_* environment variables override them so a
# GPU sweep (python -m polycom_megatron.bench.kernels) needs no code change.
#
# Fused kernels keep whole rows in registers up to this many (power-of-two padded) columns;
# wider rows take two passes over column blocks.
WHOLE_ROW_MAX = _env_int("POLYCOM_TRITON_WHOLE_ROW_MAX", 4096)
# Column blocks for loops over wide rows: the largest that wastes <= 1/8 of its lanes.
CHUNK_SIZES = tuple(
    int(v) for v in os.environ.get("POLYCOM_TRITON_CHUNKS", "2048,1024").split(",")
)
# Target elements per program for narrow rows (several rows share a program).
TILE = _env_int("POLYCOM_TRITON_TILE", 2048)
MAX_ROWS_PER_PROGRAM = 64
# Elements per thread: sets num_warps = elements of a block / (32 * this).
ELEMS_PER_THREAD = _env_int("POLYCOM_TRITON_ELEMS_PER_THREAD", 8)
# Split rows across programs when there are fewer row programs than this many per SM.
PROGRAMS_PER_SM = 4


# --------------------------------------------------------------------------------------
# Shared device helpers (also used by polyrelu_triton)
# --------------------------------------------------------------------------------------


@triton.jit
def _accum(a0, a1, a2, a3, a4, a5, a6, a7, a8, v, g, R: tl.constexpr, HAS0: tl.constexpr):
    """Per-lane sums a_p += g * v^p for p = 1..R, and a_0 += g when HAS0.

    Sums of squares x^(2p) are this with v = x*x and g = 1.0 (the multiply folds away).
    """
    if HAS0:
        a0 += g
    pw = v
    a1 += g * pw
    if R >= 2:
        pw = pw * v
        a2 += g * pw
    if R >= 3:
        pw = pw * v
        a3 += g * pw
    if R >= 4:
        pw = pw * v
        a4 += g * pw
    if R >= 5:
        pw = pw * v
        a5 += g * pw
    if R >= 6:
        pw = pw * v
        a6 += g * pw
    if R >= 7:
        pw = pw * v
        a7 += g * pw
    if R >= 8:
        pw = pw * v
        a8 += g * pw
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@triton.jit
def _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R: tl.constexpr, HAS0: tl.constexpr,
              BM: tl.constexpr, KP: tl.constexpr):
    """Row sums of the accumulators as a ``[BM, KP]`` table, column p = sum of a_p."""
    k = tl.arange(0, KP)[None, :]
    t = tl.zeros([BM, KP], dtype=tl.float32)
    if HAS0:
        t = tl.where(k == 0, tl.sum(a0, axis=1)[:, None], t)
    t = tl.where(k == 1, tl.sum(a1, axis=1)[:, None], t)
    if R >= 2:
        t = tl.where(k == 2, tl.sum(a2, axis=1)[:, None], t)
    if R >= 3:
        t = tl.where(k == 3, tl.sum(a3, axis=1)[:, None], t)
    if R >= 4:
        t = tl.where(k == 4, tl.sum(a4, axis=1)[:, None], t)
    if R >= 5:
        t = tl.where(k == 5, tl.sum(a5, axis=1)[:, None], t)
    if R >= 6:
        t = tl.where(k == 6, tl.sum(a6, axis=1)[:, None], t)
    if R >= 7:
        t = tl.where(k == 7, tl.sum(a7, axis=1)[:, None], t)
    if R >= 8:
        t = tl.where(k == 8, tl.sum(a8, axis=1)[:, None], t)
    return t


@triton.jit
def _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R: tl.constexpr, HAS_SETS: tl.constexpr,
                KP: tl.constexpr):
    """``[BM, KP]`` coefficients of each row's set (column p multiplies power p)."""
    if HAS_SETS:
        cset = tl.load(sets_ptr + r_idx, mask=rmask, other=0)
    else:
        cset = r_idx * 0
    k = tl.arange(0, KP)[None, :]
    return tl.load(coeffs_ptr + cset[:, None] * (R + 1) + k, mask=k <= R, other=0.0)


# --------------------------------------------------------------------------------------
# PolyNorm device code
# --------------------------------------------------------------------------------------


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
                  BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    base = r_idx.to(tl.int64)[:, None] * n
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        x = tl.load(x_ptr + base + cols0, mask=mask, other=0.0).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, x * x, 1.0, R, False)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            # Pass 1 asks L2 to keep the row for pass 2 (wide rows x many programs in flight).
            xc = tl.load(x_ptr + base + cols, mask=m, other=0.0,
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
        tl.store(y_ptr + base + cols0, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            y = _pn_out(xc, kk, R, KP)
            tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pn_bwd_fused(x_ptr, g_ptr, inv_ptr, coeffs_ptr, sets_ptr, dx_ptr, dots_ptr, rows, n,
                  inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr, SINGLE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    base = r_idx.to(tl.int64)[:, None] * n
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        mask = rmask[:, None] & (cols0 < n)
        x = tl.load(x_ptr + base + cols0, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + cols0, mask=mask, other=0.0).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, x, g, R, True)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            gc = tl.load(g_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc, gc, R, True)
    dots = _to_table(a0, a1, a2, a3, a4, a5, a6, a7, a8, R, True, BM, KP)
    k = tl.arange(0, KP)[None, :]
    tl.store(dots_ptr + r_idx[:, None] * (R + 1) + k, dots, mask=rmask[:, None] & (k <= R))
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    cs = c * s
    corr = dots * s * s * inv_n_total
    if SINGLE:
        dx = _pn_dx(x, g, cs, corr, R, KP)
        tl.store(dx_ptr + base + cols0, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n, BN):
            cols = start + cols0
            m = rmask[:, None] & (cols < n)
            xc = tl.load(x_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            gc = tl.load(g_ptr + base + cols, mask=m, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            dx = _pn_dx(xc, gc, cs, corr, R, KP)
            tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pn_stats(x_ptr, g_ptr, out_ptr, rows, n, cols_per_split, row_blocks,
              R: tl.constexpr, DOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              KP: tl.constexpr):
    """Partial row sums over this program's column range -> out[split, row, :].

    DOTS=0: sums of x^(2p), p = 1..R (R columns). DOTS=1: sum g, sum g x^p (R + 1 columns).
    """
    pid_s, r_idx, rmask, base, c_lo, c_hi = _split_coords(rows, n, cols_per_split, row_blocks, BM)
    cols0 = tl.arange(0, BN)[None, :]
    zero = tl.zeros([BM, BN], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for start in range(c_lo, c_hi, BN):
        cols = start + cols0
        m = rmask[:, None] & (cols < c_hi)
        xc = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
        if DOTS:
            gc = tl.load(g_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
            a0, a1, a2, a3, a4, a5, a6, a7, a8 = _accum(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, xc, gc, R, True)
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
def _split_coords(rows, n, cols_per_split, row_blocks, BM: tl.constexpr):
    """A program of the (row blocks x column splits) grid: its split index, its BM rows
    (index, mask, int64 row offsets) and its column range [c_lo, c_hi)."""
    pid = tl.program_id(0)
    pid_s = pid // row_blocks
    r_idx = (pid % row_blocks) * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    base = r_idx.to(tl.int64)[:, None] * n
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, n)
    return pid_s, r_idx, rmask, base, c_lo, c_hi


@triton.jit
def _tile_coords(rows, n, col_blocks, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // col_blocks
    pid_n = pid % col_blocks
    r_idx = pid_m * BM + tl.arange(0, BM)
    rmask = r_idx < rows
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    offs = r_idx.to(tl.int64)[:, None] * n + cols[None, :]
    mask = rmask[:, None] & (cols < n)[None, :]
    return r_idx, rmask, offs, mask


@triton.jit
def _pn_fwd_tile(x_ptr, inv_ptr, coeffs_ptr, sets_ptr, y_ptr, rows, n, col_blocks,
                 R: tl.constexpr, HAS_SETS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    kk = tl.where(k == 0, c, c * s)
    y = _pn_out(x, kk, R, KP)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pn_dx_tile(x_ptr, g_ptr, inv_ptr, dots_ptr, coeffs_ptr, sets_ptr, dx_ptr, rows, n,
                col_blocks, inv_n_total, R: tl.constexpr, HAS_SETS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    r_idx, rmask, offs, mask = _tile_coords(rows, n, col_blocks, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.arange(0, KP)[None, :]
    s = tl.load(inv_ptr + r_idx[:, None] * R + (k - 1),
                mask=rmask[:, None] & (k >= 1) & (k <= R), other=0.0)
    dots = tl.load(dots_ptr + r_idx[:, None] * (R + 1) + k,
                   mask=rmask[:, None] & (k <= R), other=0.0)
    c = _coef_table(coeffs_ptr, sets_ptr, r_idx, rmask, R, HAS_SETS, KP)
    dx = _pn_dx(x, g, c * s, dots * s * s * inv_n_total, R, KP)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launch planning (shared with polyrelu_triton)
# --------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether these kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(_pn_fwd_fused).__name__ == "InterpretedFunction"


def usable(x: torch.Tensor, order: int) -> bool:
    """Whether the Triton kernels take this input; False sends it to the PyTorch kernels."""
    if x.dtype not in _TRITON_DTYPES or order > MAX_ORDER:
        return False
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError(
            "The Triton PolyCom kernels got a CPU tensor; they need a GPU, or "
            "TRITON_INTERPRET=1 set before Triton is imported (tests on CPU). "
            "Use kernel='torch' on CPU."
        )
    return x.numel() > 0


def kp(order: int) -> int:
    """Width of the per-row tables: powers 0..order, padded to a power of two."""
    return triton.next_power_of_2(order + 1)


def chunk(n: int) -> int:
    """Column block for a loop over a row of n: the largest wasting <= 1/8 of the lanes."""
    best = None
    for b in sorted(CHUNK_SIZES, reverse=True):
        padded = -(-n // b) * b
        if padded - n <= n // 8:
            return b
        if best is None or padded < best[0]:
            best = (padded, b)
    return best[1]


def row_tile(rows: int, n: int, whole_row_max: int):
    """(BM, BN, single): rows per program, column block, whether one block holds a row."""
    full = max(16, triton.next_power_of_2(n))
    if full <= whole_row_max:
        bm = max(1, min(MAX_ROWS_PER_PROGRAM, TILE // full, triton.next_power_of_2(rows)))
        return bm, full, True
    return 1, chunk(n), False


def warps(elements: int) -> int:
    return max(1, min(32, elements // (32 * ELEMS_PER_THREAD)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device; fewer row programs than this -> split rows."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return 2  # interpreter: small, so tests reach the split path with few rows


def splits(row_programs: int, chunks: int, device: torch.device) -> int:
    """How many programs share one row's columns (2-D grid) for a row-wise reduction."""
    target = target_programs(device)
    if chunks <= 1 or row_programs >= target:
        return 1
    return min(chunks, -(-target // row_programs))


def reduce_plan(rows: int, n: int, device: torch.device):
    """(BM, BN, number of splits, columns per split) for a reduction over rows."""
    bm, bn, _ = row_tile(rows, n, max(CHUNK_SIZES))
    chunks = -(-n // bn)
    split = splits(-(-rows // bm), chunks, device)
    per_split = -(-chunks // split) * bn
    return bm, bn, -(-n // per_split), per_split


def tile_plan(rows: int, n: int):
    """(BM, BN, column blocks) for an elementwise pass, one tile per program."""
    bm, bn, _ = row_tile(rows, n, max(CHUNK_SIZES))
    return bm, bn, -(-n // bn)


def sets_arg(sets: Optional[torch.Tensor], coeffs: torch.Tensor):
    """(pointer argument, HAS_SETS) for the per-row set index."""
    if sets is None:
        return coeffs, False
    return sets.to(torch.int32).contiguous(), True


def as_table(coeffs: torch.Tensor) -> torch.Tensor:
    return coeffs.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------
# The kernel set
# --------------------------------------------------------------------------------------


def _stats(x, g, order, dots):
    rows, n = x.shape
    out_width = order + 1 if dots else order
    bm, bn, nsplit, per_split = reduce_plan(rows, n, x.device)
    row_blocks = -(-rows // bm)
    out = torch.empty(nsplit, rows, out_width, device=x.device, dtype=torch.float32)
    _pn_stats[(row_blocks * nsplit,)](
        x, g if g is not None else x, out, rows, n, per_split, row_blocks,
        R=order, DOTS=int(dots), BM=bm, BN=bn, KP=kp(order), num_warps=warps(bm * bn),
    )
    return out[0] if nsplit == 1 else out.sum(dim=0)


class TritonPolyNormKernels:
    """Triton kernel set for PolyNorm; see the module docstring."""

    name = "triton"

    @staticmethod
    def moments(x: torch.Tensor, order: int) -> torch.Tensor:
        if not usable(x, order):
            return TorchPolyNormKernels.moments(x, order)
        return _stats(x.contiguous(), None, order, dots=False)

    @staticmethod
    def forward(x, inv_rms, coeffs, sets):
        order = inv_rms.shape[1]
        if not usable(x, order):
            return TorchPolyNormKernels.forward(x, inv_rms, coeffs, sets)
        x = x.contiguous()
        rows, n = x.shape
        coeffs = as_table(coeffs)
        sets_ptr, has_sets = sets_arg(sets, coeffs)
        y = torch.empty_like(x)
        bm, bn, col_blocks = tile_plan(rows, n)
        _pn_fwd_tile[(-(-rows // bm) * col_blocks,)](
            x, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, y, rows, n, col_blocks,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=kp(order), num_warps=warps(bm * bn),
        )
        return y

    @staticmethod
    def backward_dots(x, dy, order):
        if not usable(x, order):
            return TorchPolyNormKernels.backward_dots(x, dy, order)
        return _stats(x.contiguous(), dy.contiguous(), order, dots=True)

    @staticmethod
    def backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total):
        order = inv_rms.shape[1]
        if not usable(x, order):
            return TorchPolyNormKernels.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total)
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = x.shape
        coeffs = as_table(coeffs)
        sets_ptr, has_sets = sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        bm, bn, col_blocks = tile_plan(rows, n)
        _pn_dx_tile[(-(-rows // bm) * col_blocks,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), dots.to(torch.float32).contiguous(),
            coeffs, sets_ptr, dx, rows, n, col_blocks, 1.0 / n_total,
            R=order, HAS_SETS=has_sets, BM=bm, BN=bn, KP=kp(order), num_warps=warps(bm * bn),
        )
        return dx

    @staticmethod
    def forward_fused(x, coeffs, sets, eps):
        """Single device: -> (y, inv_rms ``[rows, r]`` float32) in one pass over x."""
        order = coeffs.shape[1] - 1
        rows, n = x.shape
        if not usable(x, order):
            moments = TorchPolyNormKernels.moments(x, order)
            inv_rms = torch.rsqrt(moments / n + eps)
            return TorchPolyNormKernels.forward(x, inv_rms, coeffs, sets), inv_rms
        x = x.contiguous()
        bm, bn, single = row_tile(rows, n, WHOLE_ROW_MAX)
        row_programs = -(-rows // bm)
        if not single and splits(row_programs, -(-n // bn), x.device) > 1:
            # Few wide rows: split each row over several programs (stats, then output).
            moments = _stats(x, None, order, dots=False)
            inv_rms = torch.rsqrt(moments / n + eps)
            return TritonPolyNormKernels.forward(x, inv_rms, coeffs, sets), inv_rms
        coeffs = as_table(coeffs)
        sets_ptr, has_sets = sets_arg(sets, coeffs)
        y = torch.empty_like(x)
        inv_rms = torch.empty(rows, order, device=x.device, dtype=torch.float32)
        _pn_fwd_fused[(row_programs,)](
            x, coeffs, sets_ptr, y, inv_rms, rows, n, 1.0 / n, eps,
            R=order, HAS_SETS=has_sets, SINGLE=single, BM=bm, BN=bn, KP=kp(order),
            num_warps=warps(bm * bn),
        )
        return y, inv_rms

    @staticmethod
    def backward_fused(x, dy, inv_rms, coeffs, sets, n_total):
        """Single device: -> (dx, dots ``[rows, r + 1]`` float32) reading x and dy once."""
        order = inv_rms.shape[1]
        if not usable(x, order):
            dots = TorchPolyNormKernels.backward_dots(x, dy, order)
            dx = TorchPolyNormKernels.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total)
            return dx, dots
        x, dy = x.contiguous(), dy.contiguous()
        rows, n = x.shape
        bm, bn, single = row_tile(rows, n, WHOLE_ROW_MAX)
        row_programs = -(-rows // bm)
        if not single and splits(row_programs, -(-n // bn), x.device) > 1:
            dots = _stats(x, dy, order, dots=True)
            dx = TritonPolyNormKernels.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total)
            return dx, dots
        coeffs = as_table(coeffs)
        sets_ptr, has_sets = sets_arg(sets, coeffs)
        dx = torch.empty_like(x)
        dots = torch.empty(rows, order + 1, device=x.device, dtype=torch.float32)
        _pn_bwd_fused[(row_programs,)](
            x, dy, inv_rms.to(torch.float32).contiguous(), coeffs, sets_ptr, dx, dots, rows, n,
            1.0 / n_total, R=order, HAS_SETS=has_sets, SINGLE=single, BM=bm, BN=bn,
            KP=kp(order), num_warps=warps(bm * bn),
        )
        return dx, dots
