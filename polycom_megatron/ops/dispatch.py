"""Which kernel set computes an op.

The autograd Functions own the math and the tensor-parallel reductions; a kernel set
only supplies the heavy per-row pieces. This module maps a choice from
``config.KERNELS`` to a kernel set:

- "torch":   plain PyTorch, any device (the reference implementation);
- "compile": the same pieces through ``torch.compile``;
- "triton":  fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests);
- "auto":    Triton on CUDA when Triton imports, PyTorch otherwise.

Layers never know which one ran.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from polycom_megatron.config import KERNELS

# op name -> (module holding the PyTorch set, its class name, Triton module, class name)
_SETS = {
    "polynorm": (
        "polycom_megatron.ops.polynorm",
        "TorchPolyNormKernels",
        "polycom_megatron.ops.polynorm_triton",
        "TritonPolyNormKernels",
    ),
    "polyrelu": (
        "polycom_megatron.ops.polyrelu",
        "TorchPolyReLUKernels",
        "polycom_megatron.ops.polyrelu_triton",
        "TritonPolyReLUKernels",
    ),
    "polynorm_glu": (
        "polycom_megatron.ops.polynorm_glu",
        "TorchPolyNormGLUKernels",
        "polycom_megatron.ops.polynorm_glu_triton",
        "TritonPolyNormGLUKernels",
    ),
    "polyrelu_glu": (
        "polycom_megatron.ops.polyrelu_glu",
        "TorchPolyReLUGLUKernels",
        "polycom_megatron.ops.polyrelu_glu_triton",
        "TritonPolyReLUGLUKernels",
    ),
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(choice: str, device: torch.device) -> str:
    """The concrete kernel name ("torch", "compile" or "triton") for a choice and device."""
    if choice not in KERNELS:
        raise ValueError(f"Unknown PolyCom kernel {choice!r}; choose one of {', '.join(KERNELS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError(
            "PolyCom kernel 'triton' was requested but Triton is not installed; "
            "pip install 'polycom-megatron[triton]' or set --polycom-kernel torch"
        )
    return choice


def kernels_for(op: str, choice: str, device: torch.device):
    return _kernel_set(op, resolve(choice, torch.device(device)))


@functools.lru_cache(maxsize=None)
def _kernel_set(op: str, name: str):
    torch_module, torch_class, triton_module, triton_class = _SETS[op]
    if name == "triton":
        return getattr(importlib.import_module(triton_module), triton_class)
    torch_set = getattr(importlib.import_module(torch_module), torch_class)
    if name == "torch":
        return torch_set
    return _compiled(torch_set)


def _compiled(kernel_set):
    """A kernel set whose pieces go through torch.compile (one graph per piece)."""
    members = {"name": "compile"}
    for attr, value in vars(kernel_set).items():
        if isinstance(value, staticmethod):
            members[attr] = staticmethod(torch.compile(value.__func__, dynamic=True))
    return type("Compiled" + kernel_set.__name__, (), members)
