"""Memory of one benchmark configuration: what it holds and how far a step rises above.

On CUDA from the caching allocator's counters; on CPU from the process RSS and its
resettable high-water mark (``RssMemory``), or, where that cannot be reset, the lifetime
peak (``MaxRssMemory``).
"""

from __future__ import annotations

import gc
import os
import resource

import torch


class CudaMemory:
    method = "CUDA memory_allocated / max_memory_allocated (bytes held by tensors)"

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def _malloc_trim() -> None:
    """Hand glibc's free pages back to the OS, so that RSS tracks live tensors; without it
    freed blocks are reused silently and a step's growth hides inside old pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssMemory:
    """Process RSS; the kernel's high-water mark can be reset by writing 5 to clear_refs."""

    method = ("CPU: process RSS (VmRSS in /proc/self/status) after glibc malloc_trim; peak = "
              "VmHWM after resetting it via /proc/self/clear_refs; approximate (page-granular, "
              "includes allocator slack)")

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    @classmethod
    def usable(cls) -> bool:
        try:
            cls._read("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def current(self) -> int:
        _malloc_trim()
        return self._read("VmRSS")

    def reset_peak(self) -> None:
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return self._read("VmHWM")


class MaxRssMemory:
    method = ("resource.getrusage ru_maxrss: the process-lifetime peak, which cannot be reset, "
              "so a step's peak shows only when it exceeds every earlier one")

    def current(self) -> int:
        return RssMemory._read("VmRSS") if os.path.exists("/proc/self/status") else self.peak()

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_probe(device: torch.device):
    if device.type == "cuda":
        return CudaMemory(device)
    return RssMemory() if RssMemory.usable() else MaxRssMemory()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
