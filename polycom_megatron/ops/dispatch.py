"""Which kernel set computes an op.

The autograd Functions own the math and the tensor-parallel reductions; a kernel set
only supplies the heavy per-row pieces. This module maps a choice from
``config.KERNELS`` to a kernel set:

- "torch":   plain PyTorch, any device (the reference implementation);
- "compile": the same pieces through ``torch.compile``;
- "triton":  fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests);
- "auto":    Triton on CUDA when Triton imports; on CPU "cpu" below when Inductor finds a
  C++ compiler, else "torch".

"auto" may also resolve to "cpu": the fused pieces of ``*_cpu.py`` (a forward and a
backward that Inductor turns into one reduction and one elementwise loop each) through
``torch.compile``. Compiling takes seconds the first time a shape family (dtype, order,
gated, per-expert sets) is met, and much less once Inductor's on-disk cache holds it; a
compile that fails anyway (no usable compiler after all) warns once and runs the same
pieces eagerly, so "auto" never fails where "torch" runs.

Layers never know which one ran.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch

from polycom_megatron.config import KERNELS

# op name -> (module holding the PyTorch set, its class name, Triton module, class name)
# ... and the fused CPU set's module and class name in _CPU_SETS.
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


_CPU_SETS = {
    "polynorm": ("polycom_megatron.ops.polynorm_cpu", "CpuPolyNormKernels"),
    "polyrelu": ("polycom_megatron.ops.polyrelu_cpu", "CpuPolyReLUKernels"),
    "polynorm_glu": ("polycom_megatron.ops.polynorm_cpu", "CpuPolyNormGLUKernels"),
    "polyrelu_glu": ("polycom_megatron.ops.polyrelu_cpu", "CpuPolyReLUGLUKernels"),
}


@functools.lru_cache(maxsize=None)
def cpu_compiler_available() -> bool:
    """Whether Inductor finds the C++ compiler it builds CPU kernels with (``CXX`` or g++)."""
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(choice: str, device: torch.device) -> str:
    """The concrete kernel name ("torch", "compile", "triton" or "cpu") for a choice and device."""
    if choice not in KERNELS:
        raise ValueError(f"Unknown PolyCom kernel {choice!r}; choose one of {', '.join(KERNELS)}")
    if choice == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu" if device.type == "cpu" and cpu_compiler_available() else "torch"
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
    if name == "cpu":
        return _compiled(getattr(importlib.import_module(_CPU_SETS[op][0]), _CPU_SETS[op][1]),
                         "cpu", eager_fallback=True)
    if name == "triton":
        return getattr(importlib.import_module(triton_module), triton_class)
    torch_set = getattr(importlib.import_module(torch_module), torch_class)
    if name == "torch":
        return torch_set
    return _compiled(torch_set, "compile")


def _compiled(kernel_set, name, eager_fallback=False):
    """A kernel set whose pieces go through torch.compile (one graph per piece).

    With ``eager_fallback`` a piece whose compilation fails (Inductor's compiler missing
    or broken) warns once and runs eagerly from then on; errors of the piece itself
    (bad input) come out as they would eagerly.
    """
    members = {"name": name}
    for attr, value in vars(kernel_set).items():
        if isinstance(value, staticmethod):
            eager = value.__func__
            compiled = _compile(eager)
            if eager_fallback:
                compiled = _falling_back(compiled, eager, kernel_set.__name__)
            members[attr] = staticmethod(compiled)
    return type("Compiled" + kernel_set.__name__, (), members)


def _compile(fn):
    # A partial (the CPU sets bind ``gated``) is compiled through its function: torch.compile
    # would wrap it in a helper whose one code object, and so one recompile budget, every
    # compiled partial shares.
    if isinstance(fn, functools.partial):
        return functools.partial(_compile(fn.func), *fn.args, **fn.keywords)
    return torch.compile(fn, dynamic=True)


def _falling_back(compiled, eager, set_name):
    state = {"compiled": True}

    @functools.wraps(eager)
    def piece(*args, **kwargs):
        if state["compiled"]:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                state["compiled"] = False
                reason = str(exc).strip().splitlines()[-1][:300]
                warnings.warn(
                    f"PolyCom kernel 'auto': torch.compile could not build {set_name} "
                    f"({reason}); running it eagerly (slower). Install a C++ compiler "
                    "(g++, or set CXX) for the compiled CPU kernels, or pass "
                    "--polycom-kernel torch to silence this",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return eager(*args, **kwargs)

    return piece
