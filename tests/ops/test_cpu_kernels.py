"""The fused CPU kernel sets (what "auto" runs on CPU) against the plain PyTorch sets, eager
and compiled, and how "auto" resolves on CPU with and without a C++ compiler.

The ops' own tests (test_polycom_ops, test_glu_ops, test_tensor_parallel_ops) run through
"auto" as well, so they check the compiled CPU sets against the references end to end.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from kernel_checks import check_polynorm_pieces, check_polyrelu_pieces, make_inputs

from polycom_megatron.ops import dispatch
from polycom_megatron.ops.polynorm import TorchPolyNormKernels
from polycom_megatron.ops.polynorm_cpu import CpuPolyNormGLUKernels, CpuPolyNormKernels
from polycom_megatron.ops.polynorm_glu import TorchPolyNormGLUKernels
from polycom_megatron.ops.polyrelu import TorchPolyReLUKernels
from polycom_megatron.ops.polyrelu_cpu import CpuPolyReLUGLUKernels, CpuPolyReLUKernels
from polycom_megatron.ops.polyrelu_glu import TorchPolyReLUGLUKernels

CPU = torch.device("cpu")
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
EXPERTS = pytest.mark.parametrize("experts", [None, [3, 0, 4]], ids=["one_set", "per_expert"])
# op name -> (fused CPU set, plain PyTorch set, gated)
NORM_SETS = {
    "polynorm": (CpuPolyNormKernels, TorchPolyNormKernels, False),
    "polynorm_glu": (CpuPolyNormGLUKernels, TorchPolyNormGLUKernels, True),
}
RELU_SETS = {
    "polyrelu": (CpuPolyReLUKernels, TorchPolyReLUKernels, False),
    "polyrelu_glu": (CpuPolyReLUGLUKernels, TorchPolyReLUGLUKernels, True),
}
needs_compiler = pytest.mark.skipif(
    not dispatch.cpu_compiler_available(), reason="Inductor finds no C++ compiler here"
)


def _inputs(gated, order, dtype, experts, rows=7, n=37):
    x, _, coeffs, sets = make_inputs(rows, 2 * n if gated else n, order, dtype, CPU,
                                     experts, seed=order)
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    return x, dy, coeffs, sets


@EXPERTS
@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op", sorted(NORM_SETS))
def test_polynorm_pieces_match_torch(op, order, dtype, experts):
    """Every piece, the tensor-parallel ones (moments, dx for n_total = 2n) included."""
    K, T, gated = NORM_SETS[op]
    x, dy, coeffs, sets = _inputs(gated, order, dtype, experts)
    check_polynorm_pieces(K, T, x, dy, coeffs, sets, order)


@EXPERTS
@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op", sorted(RELU_SETS))
def test_polyrelu_pieces_match_torch(op, order, dtype, experts):
    K, T, gated = RELU_SETS[op]
    check_polyrelu_pieces(K, T, *_inputs(gated, order, dtype, experts))


@needs_compiler
@DTYPES
@pytest.mark.parametrize("op", sorted(NORM_SETS) + sorted(RELU_SETS))
def test_compiled_pieces_match_torch(op, dtype):
    """What "auto" hands the Functions on CPU: the same pieces through torch.compile."""
    K = dispatch.kernels_for(op, "auto", CPU)
    assert K.name == "cpu"
    _, T, gated = {**NORM_SETS, **RELU_SETS}[op]
    x, dy, coeffs, sets = _inputs(gated, 3, dtype, [3, 0, 4])
    if op in NORM_SETS:
        check_polynorm_pieces(K, T, x, dy, coeffs, sets, 3)
    else:
        check_polyrelu_pieces(K, T, x, dy, coeffs, sets)


def test_auto_on_cpu_is_the_compiled_cpu_set_when_a_compiler_is_found(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_compiler_available", lambda: True)
    assert dispatch.resolve("auto", CPU) == "cpu"
    monkeypatch.setattr(dispatch, "cpu_compiler_available", lambda: False)
    assert dispatch.resolve("auto", CPU) == "torch"
    # Asked for by name, the plain reference stays what it was.
    assert dispatch.resolve("torch", CPU) == "torch"
    assert dispatch.kernels_for("polynorm", "torch", CPU) is TorchPolyNormKernels


def test_auto_without_a_compiler_runs_the_plain_kernels():
    """CXX naming no compiler: Inductor cannot build, so "auto" is "torch", and works."""
    code = (
        "import torch\n"
        "from polycom_megatron.ops import dispatch, polynorm, polynorm_reference\n"
        "assert not dispatch.cpu_compiler_available()\n"
        "assert dispatch.resolve('auto', torch.device('cpu')) == 'torch'\n"
        "x = torch.randn(4, 16)\n"
        "w, b = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.1])\n"
        "torch.testing.assert_close(polynorm(x, w, b), polynorm_reference(x, w, b))\n"
        "print('ok')\n"
    )
    env = {"CXX": "/nonexistent/g++", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def _compile_failure():
    return torch._dynamo.exc.BackendCompilerFailed(
        lambda gm, inputs: gm, RuntimeError("InvalidCxxCompiler: No working C++ compiler"), None
    )


def test_a_failed_compile_warns_once_and_runs_eagerly():
    calls = []

    def compiled(t):
        calls.append(t)
        raise _compile_failure()

    piece = dispatch._falling_back(compiled, lambda t: t + 1, "CpuPolyNormKernels")
    with pytest.warns(RuntimeWarning, match="could not build CpuPolyNormKernels.*running it"):
        assert piece(torch.ones(2)).tolist() == [2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert piece(torch.zeros(1)).tolist() == [1.0]
    assert len(calls) == 1  # not retried


def test_errors_of_the_piece_itself_are_not_swallowed():
    def compiled(t):
        raise ValueError("bad input")

    piece = dispatch._falling_back(compiled, lambda t: t, "CpuPolyNormKernels")
    with pytest.raises(ValueError, match="bad input"):
        piece(torch.ones(1))
