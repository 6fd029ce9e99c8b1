"""The gated ops (PolyNorm-GLU, PolyReLU-GLU) against direct transcriptions of the formulas."""

import pytest
import torch
from kernel_checks import close, saved_storages, within_one_ulp

from polycom_megatron.ops import (
    polynorm_glu,
    polynorm_glu_reference,
    polyrelu_glu,
    polyrelu_glu_reference,
)

OPS = [(polynorm_glu, polynorm_glu_reference), (polyrelu_glu, polyrelu_glu_reference)]
OP_IDS = ["polynorm_glu", "polyrelu_glu"]
# Leading shape and gate width n (the input is [..., 2n]): width 1, odd and even widths.
SHAPES = [((7,), 33), ((2, 5), 64), ((3, 1, 4), 17), ((1,), 1), ((5,), 1)]
BIAS = pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])


def _coeffs(order, dtype=torch.float32, seed=0, sets=None, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    lead = () if sets is None else (sets,)
    weight = torch.randn(*lead, order, generator=g, dtype=dtype)
    bias = torch.randn(*lead, 1, generator=g, dtype=dtype)
    return weight, (bias if with_bias else None)


def _transcribed(op, x, weight, bias, eps=1e-6):
    """The gated formula exactly as written, power by power, in float64."""
    x = x.double()
    n = x.shape[-1] // 2
    g, u = x[..., :n], x[..., n:]
    r = weight.shape[0]
    out = torch.zeros_like(g) if bias is None else bias.double().expand_as(g)
    for i in range(r):
        if op is polynorm_glu:
            v = g ** (r - i)
            term = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)
        else:
            term = torch.relu(g) ** (r - i)
        out = out + weight[i].double() * term
    return out * u


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@BIAS
@pytest.mark.parametrize("lead,n", SHAPES, ids=str)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_matches_transcription_fp32(op, order, lead, n, with_bias):
    x = torch.randn(*lead, 2 * n, generator=torch.Generator().manual_seed(order + n))
    weight, bias = _coeffs(order, with_bias=with_bias)
    got = op(x, weight, bias)
    want = _transcribed(op, x, weight, bias)
    assert got.shape == (*lead, n) and got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item()
    )
    print(f"{op.__name__} r={order} {lead}x{2 * n}: max rel err {_rel_err(got, want):.2e}")


@BIAS
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_gradcheck_float64(op, order, with_bias):
    x = torch.randn(4, 3, 2 * 9, dtype=torch.float64, requires_grad=True)
    weight, bias = _coeffs(order, torch.float64, with_bias=with_bias)
    inputs = (x, weight.requires_grad_(), bias if bias is None else bias.requires_grad_())
    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_gradcheck_width_one(op):
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = (t.requires_grad_() for t in _coeffs(2, torch.float64))
    assert torch.autograd.gradcheck(op, (x, weight, bias))


@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_gradcheck_per_expert_sets_with_empty_expert(op):
    x = torch.randn(10, 2 * 8, dtype=torch.float64, requires_grad=True)
    weight, bias = (t.requires_grad_() for t in _coeffs(3, torch.float64, sets=4))
    split = [3, 0, 5, 2]
    assert torch.autograd.gradcheck(lambda *a: op(*a, tokens_per_expert=split), (x, weight, bias))


@BIAS
@pytest.mark.parametrize("op,reference", OPS, ids=OP_IDS)
def test_per_expert_sets_equal_each_expert_alone(op, reference, with_bias):
    x = torch.randn(9, 2 * 16, requires_grad=True)
    weight, bias = _coeffs(3, sets=3, with_bias=with_bias)
    weight.requires_grad_()
    split = [4, 0, 5]
    dy = torch.randn(9, 16)
    got = op(x, weight, bias, tokens_per_expert=torch.tensor(split))
    (gx, gw) = torch.autograd.grad(got, (x, weight), dy)

    def expert(e, rows):
        return reference(x[rows], weight[e], None if bias is None else bias[e])

    want = torch.cat([expert(0, slice(0, 4)), expert(2, slice(4, 9))])
    wx, ww = torch.autograd.grad(want, (x, weight), dy)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-4)
    assert not gw[1].any()  # the empty expert gets a zero gradient


@BIAS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("op,reference", OPS, ids=OP_IDS)
def test_low_precision_within_one_ulp_of_fp32(op, reference, order, dtype, with_bias):
    x = torch.randn(16, 2 * 129, generator=torch.Generator().manual_seed(order)).to(dtype)
    weight, bias = _coeffs(order, with_bias=with_bias)
    got = op(x, weight, bias)
    assert got.dtype == dtype and got.shape == (16, 129)
    # "The fp32 result": the op on the same values in fp32, itself the formula to 1e-6
    # (against another fp32 transcription, cancellation near zero can differ by more than
    # a low-precision ulp there).
    want = op(x.float(), weight, bias)
    close(want, reference(x.float(), weight, bias), 1e-6, "fp32 result")
    worst = within_one_ulp(got, want)
    print(f"{op.__name__} r={order} {dtype}: worst error {worst:.2f} ulp")


@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_no_bias_equals_zero_bias_and_has_no_bias_gradient(op):
    x = torch.randn(3, 4, 2 * 10, requires_grad=True)
    weight = torch.tensor([0.2, -0.4, 0.7], requires_grad=True)
    y = op(x, weight, None)
    torch.testing.assert_close(y, op(x, weight, torch.zeros(1)))
    gx, gw = torch.autograd.grad(y.sum(), (x, weight))
    zero_bias = torch.zeros(1, requires_grad=True)
    rx, rw = torch.autograd.grad(op(x, weight, zero_bias).sum(), (x, weight))
    torch.testing.assert_close((gx, gw), (rx, rw))


def test_polynorm_glu_normalises_the_gate_only():
    """Scaling the gate half leaves the output unchanged; scaling the up half scales it."""
    x = torch.randn(4, 2 * 32)
    weight, bias = _coeffs(3)
    y = polynorm_glu(x, weight, bias)
    scale_gate = torch.cat([torch.full((32,), 3.0), torch.ones(32)])
    scale_up = torch.cat([torch.ones(32), torch.full((32,), 3.0)])
    torch.testing.assert_close(polynorm_glu(x * scale_gate, weight, bias), y)
    torch.testing.assert_close(polynorm_glu(x * scale_up, weight, bias), 3.0 * y)


@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_saves_only_input_and_row_statistics(op):
    """Memory-lean backward: saved activations are the input plus O(rows) statistics."""
    rows, n, order = 256, 512, 3
    x = torch.randn(rows, 2 * n, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.nn.Parameter(t) for t in _coeffs(order))
    saved = saved_storages(lambda: op(x, weight, bias).sum().backward())
    total = sum(saved.values())
    extra = total - x.untyped_storage().nbytes()
    print(f"{op.__name__}: {total / x.numel():.4f} bytes saved per input element "
          f"(input {x.element_size()}, extra {extra} bytes for {rows} rows)")
    assert x.untyped_storage().data_ptr() in saved
    assert extra <= rows * (order + 1) * 4 + 1024


@pytest.mark.parametrize("op", [o for o, _ in OPS], ids=OP_IDS)
def test_bad_inputs_are_refused(op):
    weight, bias = torch.ones(3), torch.zeros(1)
    with pytest.raises(ValueError, match=r"got shape \(4, 7\): its last dimension must be even"):
        op(torch.randn(4, 7), weight, bias)
    with pytest.raises(ValueError, match="last dimension must be even"):
        op(torch.randn(4, 0), weight, bias)
    with pytest.raises(ValueError, match="weight must be"):
        op(torch.randn(4, 8), weight, torch.zeros(2))
    with pytest.raises(ValueError, match="sums to 3 rows but the input has 4"):
        op(torch.randn(4, 8), torch.ones(2, 3), None, tokens_per_expert=[1, 2])


@pytest.mark.parametrize("op,reference", OPS, ids=OP_IDS)
def test_compiled_kernels_match_reference(op, reference):
    x = torch.randn(8, 2 * 24, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    bias = torch.tensor([0.1], requires_grad=True)
    out = op(x, weight, bias, kernel="compile")
    torch.testing.assert_close(out, reference(x, weight, bias))
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    ref = torch.autograd.grad(reference(x, weight, bias).square().sum(), (x, weight, bias))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
