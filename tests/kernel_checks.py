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


def ulp(want_fp32, dtype):
    """The spacing of ``dtype`` at each |value| (the unit in the last place of a result
    in that dtype), subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(want_fp32.abs())  # |v| in [2^(e-1), 2^e)
    spacing = torch.ldexp(torch.full_like(want_fp32, info.eps), exponent - 1)
    return spacing.clamp_min(info.smallest_normal * info.eps)


def within_one_ulp(got, want_fp32):
    """Every element of a low-precision result within one of its ulps of the fp32 result
    (computed in fp32 and rounded once; summation order differs between kernels, so a tie
    may round either way). Returns the largest error in ulps."""
    units = (got.float() - want_fp32).abs() / ulp(want_fp32, got.dtype)
    assert (units <= 1).all(), f"{got.dtype}: {(units > 1).sum().item()} elements beyond one ulp"
    return units.max().item() if units.numel() else 0.0


# Output tolerance (relative to the largest reference value) of the Triton kernels per I/O
# dtype (fp16 has more mantissa than bf16; one tolerance covers both).
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def use_path(monkeypatch, path):
    """Launch configuration of the Triton kernels: "default", or tiny blocks that send
    widths > 32 through the multi-block code, with rows in one program per row block
    ("two_pass") or split over several programs ("split")."""
    from polycom_megatron.ops import triton_common as tc

    if path != "default":
        monkeypatch.setattr(tc, "WHOLE_ROW_MAX", 32)
        monkeypatch.setattr(tc, "CHUNK_SIZES", (32,))
        monkeypatch.setattr(tc, "TILE", 64)
        programs = 1 if path == "two_pass" else 1024
        monkeypatch.setattr(tc, "target_programs", lambda device: programs)


def grads(fn, x, weight, bias, dy):
    """(y, dx, dweight, dbias) of ``fn(x, weight, bias)`` for the output gradient dy; bias
    may be None (then dbias is None)."""
    leaves = [t if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    got = list(torch.autograd.grad(y, wanted, dy))
    return (y, *got) if bias is not None else (y, *got, None)


def check_against(fn, ref, x, weight, bias, dy, coeff_tol=1e-4):
    """Output and gradients of ``fn`` equal those of ``ref`` (OUT_TOL for y and dx)."""
    tol = OUT_TOL[x.dtype]
    got, want = grads(fn, x, weight, bias, dy), grads(ref, x, weight, bias, dy)
    names, tols = ("y", "dx", "dweight", "dbias"), (tol, tol, coeff_tol, coeff_tol)
    for name, a, b, t in zip(names, got, want, tols):
        if b is None:
            assert a is None, name
        else:
            close(a, b, t, name)


def saved_storages(run):
    """{storage address: bytes} of every tensor autograd saves for backward in ``run()``."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


def check_polynorm_pieces(K, T, x, dy, coeffs, sets, order, eps=1e-6):
    """Every method of the PolyNorm kernel set K against T on the same inputs; plain or
    gated (x ``[rows, 2n]``): n, the width normalised over, is dy's."""
    n = dy.shape[1]
    tol = OUT_TOL[x.dtype]
    moments = T.moments(x, order)
    close(K.moments(x, order), moments, 1e-5, "moments")
    inv_rms = torch.rsqrt(moments / n + eps)
    close(K.forward(x, inv_rms, coeffs, sets), T.forward(x, inv_rms, coeffs, sets), tol, "y")
    dots = T.backward_dots(x, dy, order)
    close(K.backward_dots(x, dy, order), dots, 1e-5, "backward_dots")
    for n_total in (n, 2 * n):  # 2n: the TP form, as if another rank held the other half
        close(
            K.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total),
            T.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total),
            tol, f"backward_dx (n_total {n_total})",
        )
    if not hasattr(K, "forward_fused"):  # a set without the single-device pair
        return
    y_f, inv_f = K.forward_fused(x, coeffs, sets, eps)
    close(inv_f, inv_rms, 1e-5, "forward_fused inv_rms")
    close(y_f, T.forward(x, inv_rms, coeffs, sets), tol, "forward_fused y")
    dx_f, dots_f = K.backward_fused(x, dy, inv_rms, coeffs, sets, n)
    close(dots_f, dots, 1e-5, "backward_fused dots")
    close(dx_f, T.backward_dx(x, dy, inv_rms, dots, coeffs, sets, n), tol, "backward_fused dx")


def check_polyrelu_pieces(K, T, x, dy, coeffs, sets):
    """Both methods of the PolyReLU kernel set K (plain or gated) against T."""
    tol = OUT_TOL[x.dtype]
    close(K.forward(x, coeffs, sets), T.forward(x, coeffs, sets), tol, "forward")
    dx, row_grads = K.backward(x, dy, coeffs, sets)
    dx_ref, row_grads_ref = T.backward(x, dy, coeffs, sets)
    close(dx, dx_ref, tol, "dx")
    close(row_grads, row_grads_ref, 1e-5, "row grads")


def check_grouped(op, reference, tokens_per_expert, dtype, device, gated=False, order=3, n=40):
    """``op`` with per-expert coefficients through the Triton kernels equals the loop of
    ``reference`` over the experts, and ``op`` through the PyTorch kernels."""
    experts, rows = len(tokens_per_expert), sum(tokens_per_expert)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * n if gated else n, generator=gen).to(device, dtype)
    dy = torch.randn(rows, n, generator=gen).to(device, dtype)
    weight = torch.randn(experts, order, generator=gen).to(device) * 0.5
    bias = torch.randn(experts, 1, generator=gen).to(device)

    def per_expert_loop(x, w, b):
        parts = x.split(tokens_per_expert)
        return torch.cat([reference(p, w[e], b[e]) for e, p in enumerate(parts)])

    def ours(kernel):
        return lambda x, w, b: op(x, w, b, tokens_per_expert=tokens_per_expert, kernel=kernel)

    check_against(ours("triton"), per_expert_loop, x, weight, bias, dy)
    check_against(ours("triton"), ours("torch"), x, weight, bias, dy)
