"""Triton PolyNorm kernels against the PyTorch kernel set and the reference formula.

On a machine without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set
in tests/conftest.py before the kernels are defined), so shapes stay small. Three
launch configurations are covered: the defaults (whole rows in registers, two passes
for a row wider than one block), tiny blocks (every width > 32 takes the two-pass and
multi-block paths) and tiny blocks with rows split over several programs (the 2-D grid
whose partial sums are added afterwards).
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
)

from polycom_megatron.ops import polynorm_triton as pt  # noqa: E402
from polycom_megatron.ops import triton_common as tc  # noqa: E402
from polycom_megatron.ops.common import coeff_table  # noqa: E402
from polycom_megatron.ops.polynorm import (  # noqa: E402
    PolyNormFunction,
    TorchPolyNormKernels,
    polynorm,
    polynorm_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K, T = pt.TritonPolyNormKernels, TorchPolyNormKernels
EPS = 1e-6

if DEVICE.type == "cpu" and not pt.interpreted():
    pytest.fail(
        "Triton kernels were defined before TRITON_INTERPRET=1 was set (tests/conftest.py "
        "sets it); they would try to compile for a GPU", pytrace=False
    )


SMALL_PATHS = ["two_pass", "split"]
ALL_PATHS = ["default"] + SMALL_PATHS


def make_inputs(rows, n, order, dtype, experts=None, seed=0):
    return _make_inputs(rows, n, order, dtype, DEVICE, experts, seed)


def check_pieces(x, dy, coeffs, sets, order):
    check_polynorm_pieces(K, T, x, dy, coeffs, sets, order, EPS)


FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
# Multi-block configurations are slow under the interpreter: all orders in fp32, one in bf16.
SMALL_CASES = [(o, FP32) for o in (1, 2, 3, 4)] + [(3, BF16)]
SMALL_IDS = [f"r{o}-{'fp32' if d is FP32 else 'bf16'}" for o, d in SMALL_CASES]


@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 33, 100])
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
    order = 3
    # Expert-major rows with empty experts, first and in the middle.
    x, dy, coeffs, sets = make_inputs(7, 45, order, dtype, experts=[0, 3, 0, 4, 0], seed=order)
    check_pieces(x, dy, coeffs, sets, order)


@DTYPES
@pytest.mark.parametrize("rows,n,order", [(2, 8300, 3), (3, 4500, 1), (1, 9000, 4)])
def test_pieces_rows_wider_than_a_block(rows, n, order, dtype):
    # Default blocks: one row does not fit a block (two passes); a single row is split.
    x, dy, coeffs, sets = make_inputs(rows, n, order, dtype, experts=[rows - 1, 0, 1], seed=n)
    check_pieces(x, dy, coeffs, sets, order)


@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(2, 3, 33), (5, 100), (4, 1)], ids=str)
def test_polynorm_matches_reference(shape, order, dtype):
    check_polynorm(shape, order, dtype)


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("order,dtype", SMALL_CASES, ids=SMALL_IDS)
def test_polynorm_matches_reference_multi_block(monkeypatch, path, order, dtype):
    use_path(monkeypatch, path)
    check_polynorm((2, 70), order, dtype)


def check_polynorm(shape, order, dtype):
    gen = torch.Generator().manual_seed(order)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(order, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE)
    check_against(
        lambda x, w, b: polynorm(x, w, b, EPS, kernel="triton"),
        lambda x, w, b: polynorm_reference(x, w, b, EPS),
        x, weight, bias, dy,
    )


class _TritonTensorParallelPieces:
    """The Triton set without its fused entry points: the Function's TP code path."""

    name = "triton-split"
    moments = staticmethod(K.moments)
    forward = staticmethod(K.forward)
    backward_dots = staticmethod(K.backward_dots)
    backward_dx = staticmethod(K.backward_dx)


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
@pytest.mark.parametrize("order", [1, 3])
def test_function_tensor_parallel_path_matches_reference(monkeypatch, path, order, dtype):
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 70, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(3, 70, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(order, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE)
    check_against(
        lambda x, w, b: PolyNormFunction.apply(
            x, w, b, EPS, None, None, _TritonTensorParallelPieces
        ),
        lambda x, w, b: polynorm_reference(x, w, b, EPS),
        x, weight, bias, dy,
    )


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
@pytest.mark.parametrize("tokens_per_expert", [[3, 0, 2, 1], [0, 0, 4, 0], [0, 0, 0, 0]], ids=str)
def test_grouped_polynorm_per_expert_coefficients(monkeypatch, path, tokens_per_expert, dtype):
    use_path(monkeypatch, path)
    check_grouped(polynorm, polynorm_reference, tokens_per_expert, dtype, DEVICE)


def test_zero_rows():
    x = torch.zeros(0, 48, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, requires_grad=True)
    bias = torch.tensor([0.1], device=DEVICE, requires_grad=True)
    y = polynorm(x, weight, bias, kernel="triton")
    assert y.shape == (0, 48) and y.dtype == torch.bfloat16
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), torch.zeros_like(y))
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    coeffs = coeff_table(weight.detach(), bias.detach())
    y, inv = K.forward_fused(x.detach(), coeffs, None, EPS)
    assert y.shape == (0, 48) and inv.shape == (0, 3) and inv.dtype == torch.float32
    assert K.moments(x.detach(), 3).shape == (0, 3)
    assert K.backward_dots(x.detach(), x.detach(), 3).shape == (0, 4)


def test_float64_and_high_orders_fall_back_to_torch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, generator=gen, dtype=torch.float64).to(DEVICE)
    coeffs = torch.randn(1, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    y, inv = K.forward_fused(x, coeffs, None, EPS)
    assert y.dtype == torch.float64 and inv.dtype == torch.float64
    close(y, T.forward(x, inv, coeffs, None), 1e-12, "float64")
    order = tc.MAX_ORDER + 1
    x32 = x.float()
    close(K.moments(x32, order), T.moments(x32, order), 1e-6, "order above MAX_ORDER")


def test_plans_are_sane():
    # Whole rows up to WHOLE_ROW_MAX; wider rows loop over blocks that waste <= 1/8.
    bm, bn, single = tc.row_tile(8192, 1536, tc.WHOLE_ROW_MAX)
    assert single and bn == 2048 and bm * bn <= max(tc.TILE, bn)
    bm, bn, single = tc.row_tile(8192, 8256, tc.WHOLE_ROW_MAX)
    assert not single and bm == 1 and (-(-8256 // bn) * bn - 8256) <= 8256 // 8
    assert tc.kp(3) == 4 and tc.kp(4) == 8
    assert 1 <= tc.warps(64) and tc.warps(1 << 20) <= 32
