"""Training checkpoints through megatron-core's ``dist_checkpointing``, for loops that run
without ``megatron.training`` (the CPU loop).

A checkpoint holds everything an exact resume needs: the model and optimizer state
(sharded: each rank writes its shards once, replicas skipped), the learning-rate
scheduler, the iteration, free-form training state, and every rank's RNG states.
Directory layout follows Megatron-LM's, so its tools recognise it::

    ROOT/latest_checkpointed_iteration.txt     the newest complete checkpoint
    ROOT/iter_0000100/                         one dist_checkpointing directory per save
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject

TRACKER_FILE = "latest_checkpointed_iteration.txt"


@dataclass
class LoadedState:
    """What ``load_checkpoint`` restored besides the model/optimizer/scheduler in place."""

    iteration: int
    train_state: dict
    path: Path
    rng_restored: bool


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> Optional[int]:
    """The iteration of the newest complete checkpoint under ``root``, or None."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(
            f"{tracker} should hold an iteration number, not {text!r}; delete it or point "
            "--output-dir at a clean directory"
        )
    return int(text)


def save_checkpoint(root, iteration: int, model, optimizer, scheduler, train_state: dict) -> Path:
    """Save on all ranks (collective). ``model`` is the unwrapped GPTModel (``ddp.module``).
    ``train_state`` is a small picklable dict, identical on every rank (e.g. the layout)."""
    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = _state_to_save(model, optimizer, scheduler, iteration, train_state, with_rng=True)
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    # The tracker moves only once every rank has finished writing, so a crash mid-save
    # leaves the previous checkpoint as the one a resume picks up.
    if dist.get_rank() == 0:
        tmp = Path(root) / (TRACKER_FILE + ".tmp")
        tmp.write_text(f"{iteration}\n")
        tmp.replace(Path(root) / TRACKER_FILE)
    dist.barrier()
    return path


def load_checkpoint(root, model, optimizer, scheduler, iteration: Optional[int] = None):
    """Load the newest (or the given) checkpoint into model, optimizer and scheduler.

    RNG states are per rank; they are restored when the world size matches the saved one,
    otherwise training continues with the current RNG (model and optimizer state still
    load: dist_checkpointing reshards them to the current parallel layout).
    """
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(
                f"no checkpoint to resume from under {root} (no {TRACKER_FILE}); run without "
                "--resume first, or point --output-dir at the run to continue"
            )
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing although {TRACKER_FILE} names it")
    common = dist_checkpointing.load_common_state_dict(str(path))
    with_rng = common.get("world_size") == dist.get_world_size()
    request = _state_to_save(
        model, optimizer, scheduler, iteration, {}, with_rng=with_rng, is_loading=True
    )
    loaded = dist_checkpointing.load(request, str(path))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return LoadedState(
        iteration=int(loaded["iteration"]),
        train_state=dict(loaded.get("train_state", {})),
        path=path,
        rng_restored=with_rng,
    )


def size_on_disk(path) -> int:
    """Bytes in all files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _state_to_save(model, optimizer, scheduler, iteration, train_state, with_rng, is_loading=False):
    model_state = model.sharded_state_dict()
    state = {
        "model": model_state,
        # is_loading creates the optimizer's state tensors (Adam moments) before the first
        # step, so there is something to load into.
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "world_size": dist.get_world_size(),
        "train_state": train_state,
    }
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        # One entry per rank: ranks that replicate the same weights still differ in RNG
        # (e.g. the expert-parallel generator is seeded per expert rank).
        state["rng_state"] = ShardedObject("rng_state", _get_rng_state(), (world,), (rank,))
    return state


def _get_rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
