"""PolyNorm's fused pieces (``CpuPolyNormKernels``), for the plain and the gated form
(PolyNorm-GLU, ``CpuPolyNormGLUKernels``): what ``--polycom-kernel auto`` runs on CPU,
through ``torch.compile`` (see ``dispatch``).

Same interface and semantics as ``TorchPolyNormKernels`` (see polynorm.py). Written for
Inductor to turn each fused piece into one row reduction and one elementwise loop (a read of x, or of x and dy, then the write), where
the plain set walks the tensor once per operation, some 45 times a step for r = 3:

* forward: the r sums of squares and, given s_p, Horner's rule in x with the per-row
  coefficients a_p * s_p folded in;
* backward: the r + 1 dots ``sum g x^p``, then the input gradient regrouped as two
  polynomials, ``g * A(x) - x * B(x^2)`` (``_dx``), so nothing of size n is kept.

Arithmetic is float32 (float64 for float64 inputs) whatever the I/O dtype; outputs are
rounded once. Gated (``gated=True``): x is fc1's ``[rows, 2n]`` (gate columns first); the
statistics run over the gate, y = PolyNorm(g) * u, and dx holds dg and du = dy *
PolyNorm(g) side by side.
"""

from __future__ import annotations

import torch

from polycom_megatron.ops.common import (
    coeffs_per_row,
    cpu_kernel_set,
    halves,
    horner,
    power_sums,
    upstream,
)


def _out(x, c, inv_rms):
    """a_0 + sum_p (a_p s_p) x^p, per row."""
    k = torch.cat([c[:, :1].expand(inv_rms.shape[0], 1), c[:, 1:] * inv_rms], dim=1)
    return horner(k, x)


def _dx(x, g, c, inv_rms, dots, n_total):
    """sum_p p x^(p-1) a_p s_p (g - x^p D_p s_p^2 / n), regrouped as g * A(x) - x * B(x^2)
    with A's and B's power-k coefficients (k+1) a s and (k+1) a s D s^2 / n of power k+1."""
    steps = torch.arange(1, inv_rms.shape[1] + 1, dtype=inv_rms.dtype, device=x.device)
    a = c[:, 1:] * inv_rms * steps
    b = a * dots[:, 1:] * inv_rms * inv_rms / n_total
    return g * horner(a, x) - x * horner(b, x * x)


def moments(x, order, gated=False):
    return power_sums(halves(x, gated)[0], None, order)


def forward(x, inv_rms, coeffs, sets, gated=False):
    g, u = halves(x, gated)
    y = _out(g, coeffs_per_row(coeffs, sets), inv_rms)
    return (y if u is None else y * u).to(x.dtype)


def backward_dots(x, dy, order, gated=False):
    g, h, _, _ = upstream(x, dy, gated)
    return torch.cat([h.sum(dim=-1, keepdim=True), power_sums(g, h, order)], dim=-1)


def backward_dx(x, dy, inv_rms, dots, coeffs, sets, n_total, gated=False):
    g, h, u, dyf = upstream(x, dy, gated)
    c = coeffs_per_row(coeffs, sets)
    dg = _dx(g, h, c, inv_rms, dots, n_total)
    if u is None:
        return dg.to(x.dtype)
    return torch.cat([dg, dyf * _out(g, c, inv_rms)], dim=-1).to(x.dtype)


# No forward_fused / backward_fused: one device and tensor parallelism then run the same
# compiled pieces, so a TP layout rounds exactly as TP=1 does (only the all-reduce differs).
_PIECES = (moments, forward, backward_dots, backward_dx)
_DOC = "PolyNorm's fused pieces; see polycom_megatron.ops.polynorm_cpu."
CpuPolyNormKernels = cpu_kernel_set("CpuPolyNormKernels", _DOC, False, _PIECES)
CpuPolyNormGLUKernels = cpu_kernel_set("CpuPolyNormGLUKernels", _DOC, True, _PIECES)
