"""What the Triton kernels of every PolyCom op share: the per-lane accumulators, the
coefficient gather, the program coordinates, and launch planning.

The op kernels live beside their ops (``polynorm_triton``, ``polyrelu_triton``; the gated
forms reuse those kernels with ``GATED=True``). Launch tunables are module attributes read
at call time (tests shrink them so the multi-block paths run on small shapes under the
interpreter); ``POLYCOM_TRITON_*`` environment variables set them for a GPU sweep.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

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
# Device helpers
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



# --------------------------------------------------------------------------------------
# Launch planning
# --------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether these kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(_accum).__name__ == "InterpretedFunction"


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

