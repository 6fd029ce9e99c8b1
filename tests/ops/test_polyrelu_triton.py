"""Triton PolyReLU kernels against the PyTorch kernel set and the reference formula.

Runs under Triton's interpreter without CUDA (see conftest.py), so shapes stay small.
Launch configurations as in test_polynorm_triton.py: defaults, tiny blocks (rows looped
over in several column blocks) and tiny blocks with rows split over several programs.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import (  # noqa: E402
    check_against,
    check_grouped,
    check_polyrelu_pieces,
    close,
    make_inputs,
    use_path,
)

from polycom_megatron.ops import polynorm_triton as pt  # noqa: E402
from polycom_megatron.ops.polyrelu import (  # noqa: E402
    TorchPolyReLUKernels,
    polyrelu,
    polyrelu_reference,
)
from polycom_megatron.ops.polyrelu_triton import TritonPolyReLUKernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K, T = TritonPolyReLUKernels, TorchPolyReLUKernels
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
SMALL_PATHS = ["two_pass", "split"]
ALL_PATHS = ["default"] + SMALL_PATHS

if DEVICE.type == "cpu" and not pt.interpreted():
    pytest.fail(
        "Triton kernels were defined before TRITON_INTERPRET=1 was set (tests/conftest.py "
        "sets it); they would try to compile for a GPU", pytrace=False
    )


def check_pieces(rows, n, order, dtype, experts=None, seed=0):
    x, dy, coeffs, sets = make_inputs(rows, n, order, dtype, DEVICE, experts, seed)
    check_polyrelu_pieces(K, T, x, dy, coeffs, sets)


@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 33, 100])
def test_pieces_match_torch(n, order, dtype):
    check_pieces(6, n, order, dtype, seed=n + order)


@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize(
    "order,dtype", [(1, FP32), (2, FP32), (3, FP32), (4, FP32), (3, BF16)], ids=str
)
def test_pieces_match_torch_multi_block(monkeypatch, path, order, dtype):
    use_path(monkeypatch, path)
    check_pieces(2, 70, order, dtype, seed=order)


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
def test_pieces_per_expert_sets(monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    check_pieces(7, 45, 3, dtype, experts=[0, 3, 0, 4, 0], seed=1)


@DTYPES
@pytest.mark.parametrize("rows,n,order,experts", [(2, 8300, 3, None), (1, 9000, 2, [0, 1])])
def test_pieces_rows_wider_than_a_block(rows, n, order, experts, dtype):
    check_pieces(rows, n, order, dtype, experts=experts, seed=n)


@pytest.mark.parametrize("path", ["default", "split"])
@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_polyrelu_matches_reference(monkeypatch, path, order, dtype):
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(order)
    x = torch.randn(2, 3, 70, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(2, 3, 70, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(order, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE)
    check_against(
        lambda x, w, b: polyrelu(x, w, b, kernel="triton"), polyrelu_reference,
        x, weight, bias, dy,
    )


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
@pytest.mark.parametrize("tokens_per_expert", [[3, 0, 2, 1], [0, 0, 4, 0], [0, 0, 0]], ids=str)
def test_grouped_polyrelu_per_expert_coefficients(monkeypatch, path, tokens_per_expert, dtype):
    use_path(monkeypatch, path)
    check_grouped(polyrelu, polyrelu_reference, tokens_per_expert, dtype, DEVICE)


def test_zero_rows():
    x = torch.zeros(0, 48, device=DEVICE, dtype=BF16, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, requires_grad=True)
    bias = torch.tensor([0.1], device=DEVICE, requires_grad=True)
    y = polyrelu(x, weight, bias, kernel="triton")
    assert y.shape == (0, 48) and y.dtype == BF16
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), torch.zeros_like(y))
    assert gx.shape == x.shape and not gw.any() and not gb.any()


def test_float64_falls_back_to_torch():
    x = torch.randn(3, 20, dtype=torch.float64, device=DEVICE)
    coeffs = torch.randn(1, 4, dtype=torch.float64, device=DEVICE)
    close(K.forward(x, coeffs, None), T.forward(x, coeffs, None), 1e-12, "float64")


def test_nan_propagates_like_torch():
    x = torch.tensor([[float("nan"), -1.0, 0.0, 2.0]], device=DEVICE)
    coeffs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=DEVICE)
    y = K.forward(x, coeffs, None)
    torch.testing.assert_close(y, T.forward(x, coeffs, None), equal_nan=True)
    assert torch.isnan(y[0, 0])
