"""Shared by the kernel tests: random inputs for a kernel set, and comparison with a
tolerance relative to the reference's scale."""

import torch

from polycom_megatron.ops.common import row_sets


def make_inputs(rows, n, order, dtype, device, experts=None, seed=0):
    """x, dy, a ``[sets, order + 1]`` coefficient table and the per-row set index."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen).to(device, dtype)
    dy = torch.randn(rows, n, generator=gen).to(device, dtype)
    sets_count = 1 if experts is None else len(experts)
    coeffs = (torch.randn(sets_count, order + 1, generator=gen) * 0.5).to(device)
    sets = None if experts is None else row_sets(experts, sets_count, rows, device)
    return x, dy, coeffs, sets


def close(actual, expected, tol, what=""):
    """Same shape and dtype, and max |actual - expected| <= tol * max(1, max |expected|)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item()
    scale = max(1.0, e.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def within_one_ulp(got, want_fp32):
    """Every element of a low-precision result within one of its ulps of the fp32 result
    (computed in fp32 and rounded once; summation order differs between kernels, so a tie
    may round either way). Returns the largest error in units of eps * |want|."""
    eps = torch.finfo(got.dtype).eps
    ulp = eps * want_fp32.abs().clamp_min(torch.finfo(got.dtype).tiny)
    err = (got.float() - want_fp32).abs()
    assert (err <= ulp).all(), f"{got.dtype}: {(err > ulp).sum().item()} elements beyond one ulp"
    return (err / ulp).max().item() if err.numel() else 0.0
