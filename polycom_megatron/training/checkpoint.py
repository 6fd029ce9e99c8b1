"""Training checkpoints through megatron-core's ``dist_checkpointing``, for loops that run
without ``megatron.training`` (the CPU loop).

A checkpoint holds everything an exact resume needs: the model and optimizer state
(sharded: each rank writes its shards once, replicas skipped), the learning-rate
scheduler, the iteration, free-form training state, and every rank's RNG states.
Directory layout follows Megatron-LM's, so its tools recognise it::

    ROOT/latest_checkpointed_iteration.txt     the newest complete checkpoint
    ROOT/iter_0000100/                         one dist_checkpointing directory per save
    ROOT/iter_0000100/polycom_manifest.json    fingerprint and per-file checksums

The manifest is written after every rank has finished and before the tracker moves, so
the tracker only ever names a checkpoint whose files are all recorded
(``checkpoint_integrity``). Loading trusts the caller to have checked it
(``cpu_resume.choose_checkpoint`` does, before any rank starts).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject

from polycom_megatron.training import checkpoint_integrity as integrity
from polycom_megatron.training.checkpoint_integrity import TRACKER_FILE, iteration_dir


@dataclass
class LoadedState:
    """What ``load_checkpoint`` restored besides the model/optimizer/scheduler in place."""

    iteration: int
    train_state: dict
    path: Path
    rng_restored: bool


def latest_iteration(root) -> Optional[int]:
    """The iteration of the newest complete checkpoint under ``root``, or None."""
    iteration, problem = integrity.read_tracker(root)
    if problem:
        raise integrity.CheckpointError(problem)
    return iteration


def save_checkpoint(
    root, iteration: int, model, optimizer, scheduler, train_state: dict, fingerprint: dict
) -> Path:
    """Save on all ranks (collective). ``model`` is the unwrapped GPTModel (``ddp.module``).
    ``train_state`` is a small picklable dict, identical on every rank (e.g. the layout);
    ``fingerprint`` is what the manifest records about the model and layout."""
    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        if path.exists():
            # Newer than the tracker (the caller resumed from an older checkpoint), so it
            # is what an interrupted save left: never a checkpoint a resume would pick.
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state = _state_to_save(model, optimizer, scheduler, iteration, train_state, with_rng=True)
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    # The manifest and then the tracker are written only once every rank has finished,
    # so a crash mid-save leaves the previous checkpoint as the one a resume picks up.
    if dist.get_rank() == 0:
        integrity.write_manifest(path, iteration, fingerprint)
        integrity.write_tracker(root, iteration)
    dist.barrier()
    return path


def load_checkpoint(root, model, optimizer, scheduler, iteration: Optional[int] = None):
    """Load the newest (or the given) checkpoint into model, optimizer and scheduler.
    Check it first (``checkpoint_integrity.problems``): this only loads.

    RNG states are per rank; they are restored when the world size matches the saved one,
    otherwise training continues with the current RNG (model and optimizer state still
    load: dist_checkpointing reshards them to the current parallel layout, within the
    limits ``cpu_reshard`` states and checks before loading).
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
        set_rng_state(loaded["rng_state"])
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
        state["rng_state"] = ShardedObject("rng_state", get_rng_state(), (world,), (rank,))
    return state


def get_rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
