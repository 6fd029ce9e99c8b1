import pytest
import torch

from polycom_megatron.ops import dispatch, polynorm, polynorm_reference, polyrelu


def test_auto_uses_the_compiled_cpu_kernels_on_cpu():
    want = "cpu" if dispatch.cpu_compiler_available() else "torch"
    assert dispatch.resolve("auto", torch.device("cpu")) == want


def test_auto_prefers_triton_on_cuda_when_installed():
    want = "triton" if dispatch.triton_available() else "torch"
    assert dispatch.resolve("auto", torch.device("cuda")) == want


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="Unknown PolyCom kernel 'cuda'"):
        dispatch.resolve("cuda", torch.device("cpu"))


def test_compiled_kernels_match_reference():
    x = torch.randn(8, 48, requires_grad=True)
    weight = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    bias = torch.tensor([0.1], requires_grad=True)
    out = polynorm(x, weight, bias, kernel="compile")
    torch.testing.assert_close(out, polynorm_reference(x, weight, bias))
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    ref = torch.autograd.grad(polynorm_reference(x, weight, bias).square().sum(), (x, weight, bias))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert polyrelu(x, weight, bias, kernel="compile").shape == x.shape
