"""The device's peak FLOP/s, the denominator of MFU.

Measured here, with timed square matmuls on the same device and dtype as the benchmark,
not taken from a datasheet. One measurement under load (other tenants, clocks still low)
under-states the peak, and MFU then comes out too high, even above 100%. So the peak is
sampled at the start, between every round of every section (interleaved with the runs,
as the runs are with each other) and at the end, and the best sample is kept: contention
only ever slows a sample down. An MFU that still comes out above 1 is not reported as a
number (see ``mfu_or_none``): the peak was under-measured, and the report says so.
"""

from __future__ import annotations

import statistics
import time
from typing import List, Optional

import torch

SEED = 1234


class PeakMeter:
    """Collects timed matmuls over a run; ``result()`` is the best FLOP/s seen."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int):
        self.device, self.dtype, self.size = device, dtype, size
        self.cuda = device.type == "cuda"
        self.samples: List[float] = []  # FLOP/s of each timed sample, in order
        self.measurements: List[dict] = []  # one per call of measure()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _matmul_operands(self):
        n = self.size
        g = torch.Generator(device=self.device).manual_seed(SEED)
        a = torch.randn(n, n, device=self.device, dtype=self.dtype, generator=g)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype, generator=g)
        for _ in range(3):  # warm up the library's kernel choice
            a @ b
        self._sync()
        return a, b

    def measure(self, samples: int, when: str) -> float:
        """Time ``samples`` matmuls now; returns the best FLOP/s of them. The operands
        are made afresh each time and freed after: the models need the memory more."""
        a, b = self._matmul_operands()
        reps = 10 if self.cuda else 1
        work = 2.0 * self.size**3
        got = []
        for _ in range(samples):
            self._sync()
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            self._sync()
            got.append(work * reps / (time.perf_counter() - start))
        self.samples += got
        self.measurements.append(dict(when=when, best_flops_per_s=max(got), samples=len(got)))
        return max(got)

    @property
    def best(self) -> float:
        return max(self.samples)

    def result(self) -> dict:
        return dict(
            flops_per_s=self.best,
            median_flops_per_s=statistics.median(self.samples),
            matmul=f"[{self.size}x{self.size}] @ [{self.size}x{self.size}]",
            dtype=str(self.dtype).replace("torch.", ""),
            samples=len(self.samples),
            measurements=list(self.measurements),
            threads=torch.get_num_threads(),
        )


def mfu_or_none(mfu: float) -> Optional[float]:
    """``mfu`` when it is a possible value (at most 1), else None: achieved FLOP/s above
    the measured peak means the peak was under-measured, not that MFU exceeds 100%."""
    return mfu if mfu <= 1.0 else None
