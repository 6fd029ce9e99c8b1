"""PolyNorm-GLU's pieces as Triton kernels (``TritonPolyNormGLUKernels``).

PolyNorm's kernels (polynorm_triton.py) with ``GATED=True``: x is fc1's ``[rows, 2n]``
(gate, then up), y and dy ``[rows, n]``, dx ``[rows, 2n]``; the interface and semantics
of ``TorchPolyNormGLUKernels`` (see polynorm_glu.py), which also takes what the Triton
kernels do not (float64, orders above ``MAX_ORDER``, empty inputs).
"""

from polycom_megatron.ops.polynorm_glu import TorchPolyNormGLUKernels
from polycom_megatron.ops.polynorm_triton import TritonPolyNormKernels


class TritonPolyNormGLUKernels(TritonPolyNormKernels):
    """Triton kernel set for PolyNorm-GLU."""

    gated = True
    fallback = TorchPolyNormGLUKernels
