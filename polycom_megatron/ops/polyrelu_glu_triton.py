"""PolyReLU-GLU's pieces as Triton kernels (``TritonPolyReLUGLUKernels``).

PolyReLU's kernels (polyrelu_triton.py) with ``GATED=True``: x is fc1's ``[rows, 2n]``
(gate, then up), y and dy ``[rows, n]``, dx ``[rows, 2n]``; the interface and semantics
of ``TorchPolyReLUGLUKernels`` (see polyrelu_glu.py), which also takes what the Triton
kernels do not (float64, orders above ``MAX_ORDER``, empty inputs).
"""

from polycom_megatron.ops.polyrelu_glu import TorchPolyReLUGLUKernels
from polycom_megatron.ops.polyrelu_triton import TritonPolyReLUKernels


class TritonPolyReLUGLUKernels(TritonPolyReLUKernels):
    """Triton kernel set for PolyReLU-GLU."""

    gated = True
    fallback = TorchPolyReLUGLUKernels
