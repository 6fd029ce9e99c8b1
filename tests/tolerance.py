"""Comparing kernel outputs with a tolerance relative to the reference's scale."""


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
