"""GPU check: every Triton kernel against the PyTorch reference, on the device's own code.

On CUDA each op (PolyNorm, PolyReLU and their gated forms) runs through the compiled
Triton kernels and is compared with the reference formula and with the PyTorch kernel
set, forward and backward, in bf16, fp16 and fp32: at the paper's FFN widths, on rows
wider than one block (16384, 24576: the two-pass and split-row paths at their real
sizes), with per-expert coefficients over 64 uneven experts (empty ones too, the row
counts on the device as Megatron's dispatcher passes them), and piece by piece for the
PolyNorm kernel sets.

Without CUDA these tests skip in the ordinary suite (tests/ops covers the kernels under
Triton's interpreter). The GPU check's CPU rehearsal (``tests/bench/test_gpu_check.py``)
sets POLYCOM_GPU_CHECK_STAND_IN=1 and runs this same file under the interpreter at
stand-in sizes, so it cannot rot between GPU runs.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import check_against, check_polynorm_pieces, make_inputs  # noqa: E402

from polycom_megatron import ops  # noqa: E402
from polycom_megatron.ops.polynorm import TorchPolyNormKernels  # noqa: E402
from polycom_megatron.ops.polynorm_glu import TorchPolyNormGLUKernels  # noqa: E402
from polycom_megatron.ops.polynorm_glu_triton import TritonPolyNormGLUKernels  # noqa: E402
from polycom_megatron.ops.polynorm_triton import TritonPolyNormKernels  # noqa: E402

STAND_IN_VARIABLE = "POLYCOM_GPU_CHECK_STAND_IN"
CUDA = torch.cuda.is_available()
STAND_IN = not CUDA and os.environ.get(STAND_IN_VARIABLE, "") not in ("", "0")
pytestmark = pytest.mark.skipif(
    not (CUDA or STAND_IN),
    reason=f"needs a CUDA GPU (CPU CI runs it at stand-in sizes with {STAND_IN_VARIABLE}=1, "
    "through tests/bench/test_gpu_check.py)",
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
ORDER = 3
OPS = ("polynorm", "polyrelu", "polynorm_glu", "polyrelu_glu")
GATED = ("polynorm_glu", "polyrelu_glu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (rows, width) per op; width is the FFN hidden size n (a gated op's input is 2n wide).
# The paper's widths: dense SwiGLU 5504 and PolyCom 8256, MoE experts 1024 and 1536;
# Liger's published 8192; 16384 and 24576 are wider than one block.
if CUDA:
    SHAPES = [(4096, 1536), (256, 8256), (128, 24576), (1, 24576)]
    BF16_SHAPES = [(2048, 8192), (512, 5504), (64, 16384)]  # bf16 only: the training dtype
    EXPERT_ROWS = [0, 5, 130, 0, 1, 64, 0, 300] * 8  # 64 experts, 2000 rows
    EXPERT_WIDTH = {"polynorm": 1536, "polyrelu": 1536, "polynorm_glu": 1024,
                    "polyrelu_glu": 1024}
    PIECE_SHAPES = [(64, 8256), (3, 24576)]
else:  # the interpreter: small stand-ins that keep every code path
    SHAPES = [(3, 40)]
    BF16_SHAPES = [(2, 70)]
    EXPERT_ROWS = [3, 0, 2, 1]
    EXPERT_WIDTH = dict.fromkeys(OPS, 24)
    PIECE_SHAPES = [(2, 33)]


def _op(name):
    """(our op as fn(x, w, b, kernel, tokens_per_expert), the reference as fn(x, w, b))."""
    ours, ref = getattr(ops, name), getattr(ops, f"{name}_reference")
    if name.startswith("polynorm"):
        return ((lambda x, w, b, kernel, tpe=None: ours(x, w, b, EPS, kernel=kernel,
                                                        tokens_per_expert=tpe)),
                (lambda x, w, b: ref(x, w, b, EPS)))
    return (lambda x, w, b, kernel, tpe=None: ours(x, w, b, kernel=kernel,
                                                   tokens_per_expert=tpe)), ref


def _inputs(name, rows, n, dtype, experts=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2 * n if name in GATED else n, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(rows, n, generator=gen).to(DEVICE, dtype)
    shape = (experts, ORDER) if experts > 1 else (ORDER,)
    weight = (torch.randn(shape, generator=gen) * 0.5).to(DEVICE)
    bias = torch.randn(shape[:-1] + (1,), generator=gen).to(DEVICE)
    return x, dy, weight, bias


CASES = [(op, d, rows, n) for op in OPS for d in DTYPES for rows, n in SHAPES]
CASES += [(op, "bf16", rows, n) for op in OPS for rows, n in BF16_SHAPES]


@pytest.mark.parametrize("op,dtype,rows,n", CASES, ids=[f"{o}-{d}-{r}x{n}" for o, d, r, n in CASES])
def test_triton_matches_reference_and_torch_kernels(op, dtype, rows, n):
    ours, ref = _op(op)
    x, dy, weight, bias = _inputs(op, rows, n, DTYPES[dtype], seed=rows + n)
    triton = lambda x, w, b: ours(x, w, b, "triton")  # noqa: E731
    check_against(triton, ref, x, weight, bias, dy)
    check_against(triton, lambda x, w, b: ours(x, w, b, "torch"), x, weight, bias, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_grouped_per_expert_coefficients(op, dtype):
    """64 experts' coefficient sets over expert-major rows equal the loop over experts."""
    ours, ref = _op(op)
    counts = EXPERT_ROWS
    x, dy, weight, bias = _inputs(op, sum(counts), EXPERT_WIDTH[op], DTYPES[dtype],
                                  experts=len(counts), seed=len(counts))
    on_device = torch.tensor(counts, device=DEVICE)  # as Megatron's dispatcher hands it over

    def per_expert_loop(x, w, b):
        return torch.cat([ref(part, w[e], b[e]) for e, part in enumerate(x.split(counts))])

    triton = lambda x, w, b: ours(x, w, b, "triton", on_device)  # noqa: E731
    check_against(triton, per_expert_loop, x, weight, bias, dy)
    check_against(triton, lambda x, w, b: ours(x, w, b, "torch", counts), x, weight, bias, dy)


PIECE_SETS = {"polynorm": (TritonPolyNormKernels, TorchPolyNormKernels),
              "polynorm_glu": (TritonPolyNormGLUKernels, TorchPolyNormGLUKernels)}


@pytest.mark.parametrize("rows,n", PIECE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", PIECE_SETS)
def test_polynorm_kernel_pieces(op, dtype, rows, n):
    """moments, forward, backward dots and dx (also the TP form), the fused passes."""
    K, T = PIECE_SETS[op]
    gated = op in GATED
    x, _, coeffs, sets = make_inputs(rows, 2 * n if gated else n, ORDER, DTYPES[dtype], DEVICE,
                                     experts=[rows], seed=n)
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + 1))
    check_polynorm_pieces(K, T, x, dy.to(DEVICE, DTYPES[dtype]), coeffs, sets, ORDER, EPS)
