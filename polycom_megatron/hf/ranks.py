"""Running a function on a few local gloo ranks (spawned processes), with a deadline.

The export and import build Megatron models; that needs ``torch.distributed`` and the CPU
redirections of ``polycom_megatron.cpu``, which change process-wide state. Running them in
child processes keeps the calling process (a CLI, a notebook, ``train-cpu``'s launcher)
untouched. Rank 0's return value comes back through a file.
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
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch.distributed as dist

    from polycom_megatron import cpu

    cpu.init_process_group(timeout_s=300)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 900.0):
    """``fn(*args)`` on ``world_size`` gloo ranks; rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        ctx = mp.start_processes(
            _worker, args=(fn, world_size, _free_port(), out_path, args),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=2.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks exceeded {timeout_s:.0f} s")
        return torch.load(out_path, weights_only=False)
