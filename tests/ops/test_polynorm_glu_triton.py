"""Triton PolyNorm-GLU kernels against the PyTorch kernel set and the reference formula.

Runs under Triton's interpreter without CUDA (TRITON_INTERPRET=1, set in conftest.py), so
shapes stay small. Launch configurations as in test_polynorm_triton.py: the defaults,
tiny blocks (two passes over a row) and tiny blocks with rows split over programs.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import (  # noqa: E402
    check_against,
    check_grouped,
    check_polynorm_pieces,
    close,
    make_inputs as _make_inputs,
    use_path,
    within_one_ulp,
)

from polycom_megatron.ops import polynorm_triton as pt  # noqa: E402
from polycom_megatron.ops.polynorm_glu import (  # noqa: E402
    PolyNormGLUFunction,
    TorchPolyNormGLUKernels,
    polynorm_glu,
    polynorm_glu_reference,
)
from polycom_megatron.ops.polynorm_glu_triton import TritonPolyNormGLUKernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K, T = TritonPolyNormGLUKernels, TorchPolyNormGLUKernels
EPS = 1e-6
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
SMALL_PATHS = ["two_pass", "split"]
ALL_PATHS = ["default"] + SMALL_PATHS
# Multi-block configurations are slow under the interpreter: all orders in fp32, one in bf16.
SMALL_CASES = [(o, FP32) for o in (1, 2, 3, 4)] + [(3, BF16)]
SMALL_IDS = [f"r{o}-{'fp32' if d is FP32 else 'bf16'}" for o, d in SMALL_CASES]

if DEVICE.type == "cpu" and not pt.interpreted():
    pytest.fail(
        "Triton kernels were defined before TRITON_INTERPRET=1 was set (tests/conftest.py "
        "sets it); they would try to compile for a GPU", pytrace=False
    )


def make_inputs(rows, n, order, dtype, experts=None, seed=0):
    """x ``[rows, 2n]`` (gate, up), dy ``[rows, n]``, the coefficient table, the sets."""
    x, _, coeffs, sets = _make_inputs(rows, 2 * n, order, dtype, DEVICE, experts, seed)
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed + 1))
    return x, dy.to(DEVICE, dtype), coeffs, sets


def check_pieces(x, dy, coeffs, sets, order):
    check_polynorm_pieces(K, T, x, dy, coeffs, sets, order, EPS)


@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 33])
def test_pieces_match_torch(n, order, dtype):
    x, dy, coeffs, _ = make_inputs(6, n, order, dtype, seed=n * 10 + order)
    check_pieces(x, dy, coeffs, None, order)


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("order,dtype", SMALL_CASES, ids=SMALL_IDS)
def test_pieces_match_torch_multi_block(monkeypatch, path, order, dtype):
    use_path(monkeypatch, path)
    x, dy, coeffs, _ = make_inputs(2, 70, order, dtype, seed=order)
    check_pieces(x, dy, coeffs, None, order)


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
def test_pieces_per_expert_sets(monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    x, dy, coeffs, sets = make_inputs(7, 45, 3, dtype, experts=[0, 3, 0, 4, 0], seed=3)
    check_pieces(x, dy, coeffs, sets, 3)


@pytest.mark.parametrize("rows,n,order", [(2, 4200, 3), (1, 4500, 2)])
def test_pieces_rows_wider_than_a_block(rows, n, order):
    # Default blocks: a gate wider than WHOLE_ROW_MAX takes two passes; a single row is split.
    x, dy, coeffs, sets = make_inputs(rows, n, order, BF16, experts=[rows - 1, 0, 1], seed=n)
    check_pieces(x, dy, coeffs, sets, order)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(2, 3, 66), (4, 2)], ids=str)
def test_polynorm_glu_matches_reference(shape, order, dtype, with_bias):
    gen = torch.Generator().manual_seed(order)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(order, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE) if with_bias else None
    check_against(
        lambda x, w, b: polynorm_glu(x, w, b, EPS, kernel="triton"),
        lambda x, w, b: polynorm_glu_reference(x, w, b, EPS),
        x, weight, bias, dy,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_low_precision_within_one_ulp_of_fp32(order, dtype):
    x = torch.randn(8, 2 * 65, generator=torch.Generator().manual_seed(order)).to(DEVICE, dtype)
    weight = torch.randn(order, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.tensor([0.1], device=DEVICE)
    got = polynorm_glu(x, weight, bias, EPS, kernel="triton")
    want = polynorm_glu(x.float(), weight, bias, EPS, kernel="triton")  # the same kernels on the same values in fp32
    close(want, polynorm_glu_reference(x.float(), weight, bias, EPS), 1e-5, "fp32 result")
    worst = within_one_ulp(got, want)
    print(f"triton polynorm_glu r={order} {dtype}: worst error {worst:.2f} ulp")


class _TritonTensorParallelPieces:
    """The Triton set without its fused entry points: the Function's TP code path."""

    name = "triton-split"
    moments = staticmethod(K.moments)
    forward = staticmethod(K.forward)
    backward_dots = staticmethod(K.backward_dots)
    backward_dx = staticmethod(K.backward_dx)


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
def test_function_tensor_parallel_path_matches_reference(monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2 * 70, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(3, 70, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(3, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE)
    check_against(
        lambda x, w, b: PolyNormGLUFunction.apply(
            x, w, b, EPS, None, None, _TritonTensorParallelPieces
        ),
        lambda x, w, b: polynorm_glu_reference(x, w, b, EPS),
        x, weight, bias, dy,
    )


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
@pytest.mark.parametrize("tokens_per_expert", [[3, 0, 2, 1], [0, 0, 0]], ids=str)
def test_grouped_per_expert_coefficients(monkeypatch, path, tokens_per_expert, dtype):
    use_path(monkeypatch, path)
    check_grouped(polynorm_glu, polynorm_glu_reference, tokens_per_expert, dtype, DEVICE, gated=True)


def test_zero_rows():
    x = torch.zeros(0, 48, device=DEVICE, dtype=BF16, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, requires_grad=True)
    y = polynorm_glu(x, weight, None, kernel="triton")
    assert y.shape == (0, 24) and y.dtype == BF16
    gx, gw = torch.autograd.grad(y, (x, weight), torch.zeros_like(y))
    assert gx.shape == x.shape and not gw.any()


def test_float64_falls_back_to_torch():
    x, dy, coeffs, _ = make_inputs(3, 10, 3, torch.float64)
    y, inv = K.forward_fused(x, coeffs.double(), None, EPS)
    assert y.dtype == torch.float64 and inv.dtype == torch.float64 and y.shape == (3, 10)
    close(y, T.forward(x, inv, coeffs.double(), None), 1e-12, "float64")
