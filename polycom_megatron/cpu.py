"""Run megatron-core models on a machine without a GPU (CPU tensors, gloo).

Megatron-Core assumes CUDA in a handful of places: it allocates on
``torch.cuda.current_device()``, seeds and forks the CUDA RNG, and creates CUDA streams
and events in a few helpers. ``enable()`` redirects exactly those to the CPU so real
megatron-core layers, GPTModel, DDP, the optimizer and distributed checkpointing run
under ``torch.distributed`` with the gloo backend. It is how our tests run, and it is
meant for users too: debug a configuration on a laptop before spending GPU hours.

It changes process-wide state, so it refuses to run where CUDA is available: never call
it in a real training process. Everything it changes is listed in this file.

Known limits on CPU: use the ``allgather`` MoE token dispatcher. The alltoall dispatcher
synchronises on CUDA events and passes split sizes as CPU tensors, which gloo's
``all_to_all_single`` rejects; with expert-TP > 1 it also all-gathers uneven row counts,
which gloo cannot do at all (NCCL can).
Transformer Engine and apex are absent, so use the local spec (``use_te=False``).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal to torch (as from torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites the remaining CUDA placements in torch calls: literal ``device="cuda"``,
    ``.cuda()`` and ``.to("cuda")`` (forward-time code such as the pipeline schedules)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers check param.type() == 'torch.cuda.FloatTensor' etc.
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _NoStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def enable() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU. Idempotent."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "polycom_megatron.cpu.enable() is for machines without a GPU; CUDA is available "
            "here, so run megatron-core normally instead."
        )

    # Most allocation sites say device=torch.cuda.current_device(). Answering with the CPU
    # device covers them everywhere, including inside autograd backward, where a torch
    # function mode is not in force while its own handler (Tensor.backward) runs.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0

    # RNG: Megatron keeps named CUDA generator states (model-parallel, expert-parallel,
    # data-parallel) and forks between them; on CPU the default generator plays that role.
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    # torch.manual_seed() already seeds the CPU generator and then calls this.
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = (
        lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    )

    # megatron-core names te_general_gemm in the router even without Transformer Engine
    # (a NameError on TE-less installs); None means "not available" to its own checks.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _CudaToCpu().__enter__()
    _enabled = True


def enable_megatron_training() -> None:
    """``enable()``, and let Megatron-LM's own training loop (``megatron.training``) start
    on the CPU: ``polycom-megatron pretrain --cpu``. Call after ``init_process_group()``:
    Megatron then keeps the gloo group instead of creating its own.

    On top of ``enable()``, for Megatron-LM's start-up (0.15 to 0.19), which
    * asserts CUDA in ``initialize_megatron`` unless called with ``allow_no_cuda=True``;
    * sets up model parallelism there only if ``torch.cuda.device_count() > 0`` (answered
      with 1 during that call alone: torch itself must still see no GPU);
    * reads the GPU generation while validating arguments (``get_device_arch_version``):
      the CPU answers as a Hopper (9), so no Blackwell-only path is taken;
    * compiles its legacy fused CUDA kernels (0.15-0.18), which a CPU run never calls.
    """
    enable()
    from megatron.training import arguments, training

    if getattr(training.initialize_megatron, "_polycom_cpu", False):
        return
    initialize_megatron = training.initialize_megatron

    def initialize_on_cpu(*args, **kwargs):
        real_device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return initialize_megatron(*args, **{**kwargs, "allow_no_cuda": True})
        finally:
            torch.cuda.device_count = real_device_count

    initialize_on_cpu._polycom_cpu = True
    training.initialize_megatron = initialize_on_cpu
    arguments.get_device_arch_version = lambda: 9
    try:
        from megatron.legacy import fused_kernels
    except ImportError:  # 0.19 dropped them
        pass
    else:
        fused_kernels.load = lambda args: None
    # Megatron asks for it with tensor/context parallelism before Blackwell.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def init_process_group(timeout_s: float = 300.0) -> None:
    """Initialise gloo from torchrun-style environment variables (RANK, WORLD_SIZE, ...)."""
    enable()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
