"""FLOP counts for MFU: what a GPT training step computes, written out term by term.

Conventions (printed by the benchmark and stored in its JSON):

- A multiply-add is 2 FLOPs; a GEMM [m, k] x [k, n] is 2*m*k*n.
- Counted GEMMs, per token and layer: QKV projection, attention output projection, the MLP's
  fc1 (doubled when gated, since SwiGLU's fc1 produces value and gate) and fc2; for an MoE
  layer the router (hidden -> experts) and the top-k experts' fc1/fc2 instead of the MLP;
  the LM head (hidden -> vocab) once per token. The embedding lookup is not a GEMM.
- Attention scores: QK^T and AV each cost 2 * S_keys * kv_channels * heads per query token.
  With causal masking a query sees on average S/2 keys (S^2/2 score entries per sequence,
  FlashAttention's convention, the work a causal kernel does); ``causal=False`` counts the
  full S x S, which is what Megatron's local (unfused) attention multiplies before masking.
- The activation's elementwise FLOPs, per element of its output (width f), with r = order:
    SwiGLU   5     exp, add, divide (the sigmoid), times a (SiLU), times the gate
    GELU     5     scale by 1/sqrt2, erf, add 1, times x, times 1/2 (exact erf form, F.gelu)
    PolyReLU 2r+1  relu, then Horner's rule: r multiplies and r adds       (7 for r = 3)
    PolyNorm 5r-1  r-1 multiplies for the powers; per power a square and an add for its
                   mean of squares, a multiply by (a_p / rms_p) and an accumulate   (14 for r = 3)
    PolyReLU-GLU, PolyNorm-GLU: the activation of the gate, plus 1 for times the up half
                   (8 and 15 for r = 3); gated like SwiGLU (fc1 doubled)
  Per-row work (PolyNorm's r square roots per token) is negligible and not counted.
- Not counted: norms, softmax, rotary embeddings, residual adds, dropout, the loss, the MoE
  permutation and the probability weighting. These are small next to the GEMMs.
- Training = 3 x forward: backward computes two GEMMs (input and weight gradient) per
  forward GEMM; the same factor is applied to the elementwise part as a convention.
  Recomputation (activation checkpointing) is not counted: this is model FLOPs, so MFU
  stays comparable between runs with and without recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from polycom_megatron.variants import GATED, NAMES as ACTIVATIONS  # noqa: F401 (this module's interface)

TRAINING_MULTIPLIER = 3  # forward + backward (2 x forward)


def activation_flops_per_element(activation: str, order: int = 3) -> int:
    """Forward FLOPs per output element of the activation (see the module docstring)."""
    if activation in ("swiglu", "gelu"):
        return 5
    if activation in ("polyrelu-glu", "polynorm-glu"):
        return activation_flops_per_element(activation[: -len("-glu")], order) + 1
    if activation == "polyrelu":
        return 2 * order + 1
    if activation == "polynorm":
        return 5 * order - 1
    raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per token, by term. Add two with ``+``, scale with ``*``."""

    qkv_proj: float = 0.0  # QKV and attention output projections
    attention: float = 0.0  # QK^T and AV
    mlp: float = 0.0  # dense fc1 + fc2, or the top-k experts' fc1 + fc2
    router: float = 0.0
    activation: float = 0.0  # elementwise
    lm_head: float = 0.0

    def __add__(self, other: "Flops") -> "Flops":
        names = [f.name for f in fields(self)]
        return Flops(**{n: getattr(self, n) + getattr(other, n) for n in names})

    def __mul__(self, k: float) -> "Flops":
        return Flops(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    __rmul__ = __mul__

    @property
    def gemm(self) -> float:
        """Everything done by matrix multiplies (what torch's FlopCounterMode sees)."""
        return self.qkv_proj + self.attention + self.mlp + self.router + self.lm_head

    @property
    def total(self) -> float:
        return self.gemm + self.activation

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(gemm=self.gemm, total=self.total)
        return out


def mlp_flops(hidden: int, ffn: int, activation: str, order: int = 3) -> Flops:
    """One dense MLP, forward, per token: fc1 (x2 if gated), activation, fc2."""
    fc1_out = 2 * ffn if activation in GATED else ffn
    return Flops(
        mlp=2.0 * hidden * fc1_out + 2.0 * ffn * hidden,
        activation=float(ffn * activation_flops_per_element(activation, order)),
    )


def moe_flops(
    hidden: int, num_experts: int, top_k: int, expert_ffn: int, activation: str, order: int = 3
) -> Flops:
    """One MoE layer, forward, per token: the router plus ``top_k`` expert MLPs."""
    experts = mlp_flops(hidden, expert_ffn, activation, order) * top_k
    return experts + Flops(router=2.0 * hidden * num_experts)


def attention_flops(
    hidden: int,
    heads: int,
    seq_length: int,
    query_groups: Optional[int] = None,
    kv_channels: Optional[int] = None,
    causal: bool = True,
) -> Flops:
    """Self-attention, forward, per token (projections and scores)."""
    query_groups = query_groups or heads
    kv_channels = kv_channels or hidden // heads
    q_width = heads * kv_channels
    qkv_width = q_width + 2 * query_groups * kv_channels
    keys = seq_length / 2 if causal else seq_length
    return Flops(
        qkv_proj=2.0 * hidden * qkv_width + 2.0 * q_width * hidden,
        attention=2 * (2.0 * keys * kv_channels * heads),
    )


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count of a GPT needs. ``ffn_hidden_size`` / ``moe_ffn_hidden_size``
    are the widths this activation actually uses (already matched to SwiGLU's budget)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    activation: str
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    num_experts: Optional[int] = None
    moe_router_topk: int = 0
    moe_ffn_hidden_size: Optional[int] = None
    order: int = 3

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)


def ffn_flops(shape: ModelShape) -> Flops:
    """The FFN part of one layer (dense MLP or MoE), forward, per token."""
    if shape.is_moe:
        return moe_flops(
            shape.hidden_size,
            shape.num_experts,
            shape.moe_router_topk,
            shape.moe_ffn_hidden_size or shape.ffn_hidden_size,
            shape.activation,
            shape.order,
        )
    return mlp_flops(shape.hidden_size, shape.ffn_hidden_size, shape.activation, shape.order)


def model_flops(shape: ModelShape, causal: bool = True) -> Flops:
    """A whole GPT (every layer of the same kind, as in both paper configs), forward, per token."""
    layer = ffn_flops(shape) + attention_flops(
        shape.hidden_size,
        shape.num_attention_heads,
        shape.seq_length,
        shape.num_query_groups,
        shape.kv_channels,
        causal,
    )
    return layer * shape.num_layers + Flops(lm_head=2.0 * shape.hidden_size * shape.vocab_size)


def training_flops(forward: Flops) -> Flops:
    """Forward + backward under the 3x convention."""
    return forward * TRAINING_MULTIPLIER


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured peak."""
    return tokens_per_s * flops_per_token / peak_flops_per_s
