"""Transformer Engine stand-ins for CPU tests: TE's pieces that TEGroupedMLP uses, each
enforcing what TE documents and asserts (TE itself needs CUDA).

* ``GroupedLinearStandIn``: TE's GroupedLinear behind Megatron's wrapper signature
  (TEColumn/RowParallelGroupedLinear): one GEMM per expert over ``m_splits`` rows; under FP8
  every split and the inner dimension must be a multiple of 16 (32 for MXFP8), else TE's
  GEMM raises (here: ``TEContractError``).
* ``Fp8PaddingStandIn`` / ``Fp8UnpaddingStandIn``: TE's Fp8Padding / Fp8Unpadding, zero rows
  up to that multiple per expert, and back.

Nothing of megatron-core is stood in: ``te_standing_in`` only puts these where megatron-core
looks for TE's classes, and tells it which TE release they behave like.
"""

from __future__ import annotations

import contextlib
import math

import torch

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def align_for(recipe) -> int:
    """TE's row alignment for a quantized GEMM: 32 for MXFP8, 16 for the other recipes."""
    return 32 if str(recipe).endswith("mxfp8") else 16


# --- Transformer Engine stand-ins ------------------------------------------------------


class TEContractError(AssertionError):
    """What TE would raise on a GPU."""


class GroupedLinearStandIn(torch.nn.Module):
    """TE's GroupedLinear behind Megatron's wrapper signature: ``forward(x, m_splits)`` ->
    ``(out, bias)``; one weight ``[out, in]`` per expert, named ``weight{i}`` like TE's."""

    def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, **groups):
        super().__init__()
        self.num_gemms, self.in_features, self.out_features = num_gemms, input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.recipe = str(config.fp8_recipe) if config.fp8 else None
        self.seen_splits = []
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(output_size, input_size))
            init_method(weight)
            self.register_parameter(f"weight{i}", weight)
            if bias:
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(output_size)))
        self.use_bias = bias

    def forward(self, x, m_splits):
        m_splits = [int(m) for m in m_splits]
        self.seen_splits.append(m_splits)
        if len(m_splits) != self.num_gemms or sum(m_splits) != x.shape[0]:
            raise TEContractError(f"m_splits {m_splits} do not cover {x.shape[0]} rows")
        if x.shape[-1] != self.in_features:
            raise TEContractError(f"input width {x.shape[-1]} != in_features {self.in_features}")
        if self.recipe is not None:
            align = align_for(self.recipe)
            bad = [m for m in m_splits if m % align]
            if bad or self.in_features % align:
                raise TEContractError(
                    f"FP8 ({self.recipe}) GEMM needs every split and the inner dimension "
                    f"divisible by {align}: splits {m_splits}, in_features {self.in_features}"
                )
        blocks = x.split(m_splits)
        outs = [b @ getattr(self, f"weight{i}").t() for i, b in enumerate(blocks)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)] if self.use_bias else None
        if biases is not None and not self.skip_bias_add:
            outs = [o + b for o, b in zip(outs, biases)]
        out = torch.cat(outs) if outs else x.new_zeros(0, self.out_features)
        return out, (biases if self.skip_bias_add else None)

    def backward_dw(self):
        pass


class PaddingCounter:
    calls = 0


class Fp8PaddingStandIn(torch.nn.Module):
    """TE's Fp8Padding: ``forward(inp, m_splits)`` -> (rows padded per split, padded splits)."""

    def __init__(self, num_gemms, align_size=None):
        super().__init__()
        self.num_gemms, self.align_size = num_gemms, align_size

    def _align(self):
        return self.align_size or align_for(_active_recipe[0])

    def forward(self, inp, m_splits):
        PaddingCounter.calls += 1
        align = self._align()
        padded = [math.ceil(m / align) * align for m in m_splits]
        blocks = []
        for block, m, p in zip(inp.split(list(m_splits)), m_splits, padded):
            blocks += [block, inp.new_zeros(p - m, *inp.shape[1:])]
        return torch.cat(blocks), padded


class Fp8UnpaddingStandIn(Fp8PaddingStandIn):
    """TE's Fp8Unpadding: ``forward(inp, m_splits)`` -> the rows without their padding."""

    def forward(self, inp, m_splits):
        align = self._align()
        padded = [math.ceil(m / align) * align for m in m_splits]
        return torch.cat([b[:m] for b, m in zip(inp.split(padded), m_splits)])


# The TE release the stand-ins behave like.
TE_VERSION = "2.8.0"

# TE reads the recipe from its autocast state; Megatron enters it when config.fp8 is set.
_active_recipe = [None]


@contextlib.contextmanager
def te_standing_in(recipe):
    """Put the padders where megatron-core's experts module looks for TE's."""
    from megatron.core import utils
    from megatron.core.transformer.moe import experts
    from packaging.version import Version

    saved = {n: getattr(experts, n, None) for n in ("HAVE_TE", "Fp8Padding", "Fp8Unpadding")}
    saved_version = utils._te_version
    experts.HAVE_TE, experts.Fp8Padding, experts.Fp8Unpadding = (
        True, Fp8PaddingStandIn, Fp8UnpaddingStandIn)
    # TransformerConfig asks for TE's version under FP8 (MoE FP8 needs TE >= 1.11).
    utils._te_version = Version(TE_VERSION)
    _active_recipe[0] = recipe
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(experts, name, value)
        utils._te_version = saved_version
        _active_recipe[0] = None
