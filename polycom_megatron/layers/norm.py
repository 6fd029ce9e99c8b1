"""A PyTorch LayerNorm/RMSNorm that works with sequence parallelism.

Megatron's TE-less fallback norm (``WrappedTorchNorm``) refuses sequence parallelism
because nobody marks its weights: under SP each tensor-parallel rank normalises a
different slice of the sequence, so the norm's weight gradients are partial sums that
must be added up across TP. Marking them ``sequence_parallel`` makes Megatron's
``finalize_model_grads`` do exactly that. Used by the local spec, i.e. without Transformer
Engine or apex (CPU runs, debugging).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class LocalNorm:
    """Builds ``torch.nn.LayerNorm`` or ``RMSNorm`` per ``config.normalization``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization not in _NORMS:
            raise ValueError(
                f"normalization {config.normalization!r} is not supported by the local norm; "
                f"use one of {', '.join(_NORMS)} or the Transformer Engine spec"
            )
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "--apply-layernorm-1p (zero-centred gamma) needs the Transformer Engine spec"
            )
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
