"""The PolyNorm / PolyReLU ops against direct transcriptions of the formulas."""

import pytest
import torch
from kernel_checks import saved_storages, within_one_ulp

from polycom_megatron.ops import polynorm, polynorm_reference, polyrelu, polyrelu_reference

OPS = [(polynorm, polynorm_reference), (polyrelu, polyrelu_reference)]
SHAPES = [(7, 33), (2, 5, 64), (3, 1, 4, 17), (1, 1)]


def _coeffs(order, dtype=torch.float32, seed=0, sets=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if sets is None else (sets,)
    weight = torch.randn(*lead, order, generator=g, dtype=dtype)
    bias = torch.randn(*lead, 1, generator=g, dtype=dtype)
    return weight, bias


def _transcribed_polynorm(x, weight, bias, eps=1e-6):
    """PolyNorm exactly as the paper writes it, power by power, in float64."""
    x = x.double()
    r = weight.shape[0]
    out = bias.double()
    for i in range(r):
        v = x ** (r - i)
        out = out + weight[i].double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)
    return out


def _transcribed_polyrelu(x, weight, bias):
    x = x.double()
    r = weight.shape[0]
    return bias.double() + sum(weight[i].double() * torch.relu(x) ** (r - i) for i in range(r))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_transcription_fp32(shape, order):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(order))
    weight, bias = _coeffs(order)
    for op, transcribed in ((polynorm, _transcribed_polynorm), (polyrelu, _transcribed_polyrelu)):
        got = op(x, weight, bias).double()
        want = transcribed(x, weight, bias)
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op,_", OPS)
def test_gradcheck_float64(op, _, order):
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=True)
    weight, bias = (t.requires_grad_() for t in _coeffs(order, torch.float64))
    assert torch.autograd.gradcheck(op, (x, weight, bias))


@pytest.mark.parametrize("op,_", OPS)
def test_gradcheck_per_expert_sets_with_empty_expert(op, _):
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight, bias = (t.requires_grad_() for t in _coeffs(3, torch.float64, sets=4))
    split = [3, 0, 5, 2]
    assert torch.autograd.gradcheck(lambda *a: op(*a, tokens_per_expert=split), (x, weight, bias))


@pytest.mark.parametrize("op,reference", OPS)
def test_per_expert_sets_equal_each_expert_alone(op, reference):
    x = torch.randn(9, 16)
    weight, bias = _coeffs(3, sets=3)
    split = [4, 0, 5]
    got = op(x, weight, bias, tokens_per_expert=torch.tensor(split))
    want = torch.cat([reference(x[:4], weight[0], bias[0]), reference(x[4:], weight[2], bias[2])])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,reference", OPS)
def test_low_precision_input_computes_in_fp32(op, reference, dtype):
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    weight, bias = _coeffs(3)
    got = op(x, weight, bias)
    assert got.dtype == dtype
    # Computed in fp32 and rounded once at the end: within one output ulp of the fp32 result
    # (summation order differs between kernels, so a tie may round either way).
    within_one_ulp(got, reference(x.float(), weight, bias))


def test_weight_layout_is_highest_power_first():
    """weight = [a_r, ..., a_1] as in the authors' checkpoints; bias = [a_0]."""
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    weight, bias = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.25])
    torch.testing.assert_close(polyrelu(x, weight, bias), 0.25 + torch.relu(x) ** 3)
    cube = x**3
    want = 0.25 + cube / torch.sqrt(cube.pow(2).mean() + 1e-6)
    torch.testing.assert_close(polynorm(x, weight, bias), want)


def test_polynorm_is_scale_invariant():
    """A positive scale of the input cancels in every normalised power (why MoE routing
    probabilities must not be applied to PolyNorm's input)."""
    x = torch.randn(4, 64)
    weight, bias = _coeffs(3)
    torch.testing.assert_close(polynorm(3.7 * x, weight, bias), polynorm(x, weight, bias))


@pytest.mark.parametrize("op,_", OPS)
def test_saves_only_input_and_row_statistics(op, _):
    """Memory-lean backward: saved activations are the input plus O(rows) statistics."""
    rows, n, order = 256, 512, 3
    x = torch.randn(rows, n, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.nn.Parameter(t) for t in _coeffs(order))
    saved = saved_storages(lambda: op(x, weight, bias).sum().backward())
    total = sum(saved.values())
    extra = total - x.untyped_storage().nbytes()
    print(f"{op.__name__}: {total / x.numel():.3f} bytes saved per input element")
    assert x.untyped_storage().data_ptr() in saved
    assert extra <= rows * (order + 1) * 4 + 1024


@pytest.mark.parametrize("op,_", OPS)
def test_bad_coefficient_shapes_are_refused(op, _):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be"):
        op(x, torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="without tokens_per_expert"):
        op(x, torch.ones(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="sums to 3 rows but the input has 4"):
        op(x, torch.ones(2, 3), torch.zeros(2, 1), tokens_per_expert=[1, 2])
