"""PolyReLU's fused pieces (``CpuPolyReLUKernels``), for the plain and the gated form
(PolyReLU-GLU, ``CpuPolyReLUGLUKernels``): what ``--polycom-kernel auto`` runs on CPU,
through ``torch.compile`` (see ``dispatch``).

Same interface and semantics as ``TorchPolyReLUKernels`` (see polyrelu.py). Written for
Inductor to fuse: forward is Horner's rule in q = relu(x), one elementwise loop; backward
one loop computing the slope ``sum_p p a_p q^(p-1)`` (Horner again) and dx, with the
r + 1 coefficient sums ``sum g q^p`` reduced alongside. Float32 inside (float64 for
float64 inputs), outputs rounded once. Gated: x is ``[rows, 2n]``, y = PolyReLU(g) * u,
dx = [dg, dy * PolyReLU(g)].
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


def forward(x, coeffs, sets, gated=False):
    g, u = halves(x, gated)
    y = horner(coeffs_per_row(coeffs, sets), torch.relu(g))
    return (y if u is None else y * u).to(x.dtype)


def backward(x, dy, coeffs, sets, gated=False):
    """-> (dx, per-row ``[sum h, sum h q, ..., sum h q^r]``), h the gradient reaching
    PolyReLU (dy, or dy * u when gated)."""
    g, h, u, dyf = upstream(x, dy, gated)
    q = torch.relu(g)
    c = coeffs_per_row(coeffs, sets)
    order = c.shape[1] - 1
    row_grads = torch.cat([h.sum(dim=-1, keepdim=True), power_sums(q, h, order)], dim=-1)
    steps = torch.arange(1, order + 1, dtype=c.dtype, device=c.device)
    dg = torch.where(g > 0, h * horner(c[:, 1:] * steps, q), 0.0)
    if u is not None:
        dg = torch.cat([dg, dyf * horner(c, q)], dim=-1)
    return dg.to(x.dtype), row_grads


_PIECES = (forward, backward)
_DOC = "PolyReLU's fused pieces; see polycom_megatron.ops.polyrelu_cpu."
CpuPolyReLUKernels = cpu_kernel_set("CpuPolyReLUKernels", _DOC, False, _PIECES)
CpuPolyReLUGLUKernels = cpu_kernel_set("CpuPolyReLUGLUKernels", _DOC, True, _PIECES)
