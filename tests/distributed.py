"""Launching a test function on several CPU processes (gloo), with a timeout.

Every multi-process test goes through ``run_distributed``: each worker calls
``fn(rank, world_size, *args)``; whatever rank 0 returns comes back to the test.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, out_path, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from polycom_megatron import cpu

    import torch.distributed as dist

    cpu.init_process_group(timeout_s=120)
    # On failure the exception propagates at once (a barrier would hide it behind a
    # timeout on the other ranks); spawn then terminates the rest.
    result = fn(rank, world_size, *args)
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0):
    """Run ``fn`` on ``world_size`` gloo ranks; return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, _free_port(), out_path, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed test {fn.__name__} exceeded {timeout_s}s")
        return torch.load(out_path, weights_only=False)
