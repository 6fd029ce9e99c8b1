"""Triton PolyReLU-GLU kernels against the PyTorch kernel set and the reference formula.

Runs under Triton's interpreter without CUDA (see conftest.py), so shapes stay small.
Launch configurations as in test_polyrelu_triton.py.
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
    within_one_ulp,
)

from polycom_megatron.ops import polynorm_triton as pt  # noqa: E402
from polycom_megatron.ops.polyrelu_glu import (  # noqa: E402
    TorchPolyReLUGLUKernels,
    polyrelu_glu,
    polyrelu_glu_reference,
)
from polycom_megatron.ops.polyrelu_glu_triton import TritonPolyReLUGLUKernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K, T = TritonPolyReLUGLUKernels, TorchPolyReLUGLUKernels
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
ALL_PATHS = ["default", "two_pass", "split"]

if DEVICE.type == "cpu" and not pt.interpreted():
    pytest.fail(
        "Triton kernels were defined before TRITON_INTERPRET=1 was set (tests/conftest.py "
        "sets it); they would try to compile for a GPU", pytrace=False
    )


def check_pieces(rows, n, order, dtype, experts=None, seed=0):
    x, _, coeffs, sets = make_inputs(rows, 2 * n, order, dtype, DEVICE, experts, seed)
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    check_polyrelu_pieces(K, T, x, dy, coeffs, sets)


@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 33])
def test_pieces_match_torch(n, order, dtype):
    check_pieces(6, n, order, dtype, seed=n + order)


@pytest.mark.parametrize("path", ["two_pass", "split"])
@pytest.mark.parametrize("order", [1, 3])
def test_pieces_match_torch_multi_block(monkeypatch, path, order):
    use_path(monkeypatch, path)
    check_pieces(2, 70, order, FP32, seed=order)


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
def test_pieces_per_expert_sets(monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    check_pieces(7, 45, 3, dtype, experts=[0, 3, 0, 4, 0], seed=1)


def test_pieces_row_wider_than_a_block():
    check_pieces(1, 4500, 2, BF16, experts=[0, 1], seed=4500)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@DTYPES
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_polyrelu_glu_matches_reference(order, dtype, with_bias):
    gen = torch.Generator().manual_seed(order)
    x = torch.randn(2, 3, 2 * 35, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(2, 3, 35, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(order, generator=gen).to(DEVICE) * 0.5
    bias = torch.randn(1, generator=gen).to(DEVICE) if with_bias else None
    check_against(
        lambda x, w, b: polyrelu_glu(x, w, b, kernel="triton"), polyrelu_glu_reference,
        x, weight, bias, dy,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_low_precision_within_one_ulp_of_fp32(order, dtype):
    x = torch.randn(8, 2 * 65, generator=torch.Generator().manual_seed(order)).to(DEVICE, dtype)
    weight = torch.randn(order, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.tensor([0.1], device=DEVICE)
    got = polyrelu_glu(x, weight, bias, kernel="triton")
    want = polyrelu_glu(x.float(), weight, bias, kernel="triton")  # the same kernels on the same values in fp32
    close(want, polyrelu_glu_reference(x.float(), weight, bias), 1e-5, "fp32 result")
    worst = within_one_ulp(got, want)
    print(f"triton polyrelu_glu r={order} {dtype}: worst error {worst:.2f} ulp")


@pytest.mark.parametrize("path", ALL_PATHS)
@DTYPES
@pytest.mark.parametrize("tokens_per_expert", [[3, 0, 2, 1], [0, 0, 0]], ids=str)
def test_grouped_per_expert_coefficients(monkeypatch, path, tokens_per_expert, dtype):
    use_path(monkeypatch, path)
    check_grouped(polyrelu_glu, polyrelu_glu_reference, tokens_per_expert, dtype, DEVICE, gated=True)


def test_zero_rows():
    x = torch.zeros(0, 48, device=DEVICE, dtype=BF16, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, requires_grad=True)
    bias = torch.tensor([0.1], device=DEVICE, requires_grad=True)
    y = polyrelu_glu(x, weight, bias, kernel="triton")
    assert y.shape == (0, 24) and y.dtype == BF16
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), torch.zeros_like(y))
    assert gx.shape == x.shape and not gw.any() and not gb.any()


def test_nan_propagates_like_torch():
    x = torch.tensor([[float("nan"), -1.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    coeffs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], device=DEVICE)
    y = K.forward(x, coeffs, None)
    torch.testing.assert_close(y, T.forward(x, coeffs, None), equal_nan=True)
    assert torch.isnan(y[0, 0]) and not torch.isnan(y[0, 1:]).any()
