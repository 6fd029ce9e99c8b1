"""PolyCom settings: the dataclass and its command-line flags.

This file is the only place where flag names and defaults are written. Everything
else (spec builders, the launcher, the patches for Megatron-LM) reads them from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

ACTIVATIONS = ("polynorm", "polyrelu")
# Which implementation computes the op: "auto" picks the fused Triton kernels on CUDA and
# the fused CPU kernels through torch.compile on CPU (the plain PyTorch reference where
# Inductor finds no C++ compiler); the other values force one (see ops/dispatch.py).
KERNELS = ("auto", "torch", "compile", "triton")
# "layer": one set of coefficients per MoE layer, shared by its experts (the paper's
# setting). "expert": one set per expert, living with that expert under expert parallelism.
COEFF_MODES = ("layer", "expert")

# The paper's matched-parameter rule: a SwiGLU FFN of width f has 3*h*f weights, a
# non-gated FFN of width w has 2*h*w, so the same budget gives w = 1.5 f. The gated form
# (PolyNorm-GLU, ``PolyComConfig.gated``) has SwiGLU's three matrices: the same width.
SWIGLU_TO_POLYCOM_WIDTH = 1.5
SWIGLU_TO_GATED_POLYCOM_WIDTH = 1.0


@dataclass(frozen=True)
class PolyComConfig:
    """What a PolyCom activation computes and how.

    activation: "polynorm" or "polyrelu".
    order: r, the highest power (the paper uses 3).
    eps: added to the mean of squares inside PolyNorm's normalisation.
    kernel: implementation choice, see ``KERNELS``.
    coeff_mode: MoE only, see ``COEFF_MODES``.
    gated: the gated form, ``PolyCom(g) * u`` with ``[g, u] = fc1(x)`` (PolyNorm-GLU as
        Motif trains it); it turns on Megatron's gated linear unit (fc1 twice as wide).
    bias: learn the constant term a0 (the paper's form); off, as ``--pnglu`` trains it.
    """

    activation: str = "polynorm"
    order: int = 3
    eps: float = 1e-6
    kernel: str = "auto"
    coeff_mode: str = "layer"
    gated: bool = False
    bias: bool = True

    def __post_init__(self):
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("coeff_mode", self.coeff_mode, COEFF_MODES)
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(
                f"PolyCom order must be an integer >= 1, got {self.order!r}; "
                "set --polycom-order to 1 or more (the paper uses 3)."
            )
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(
                f"PolyCom eps must be a positive finite number, got {self.eps!r}; "
                "set --polycom-eps (the paper uses 1e-6)."
            )
        for name, flag in (("gated", "--polycom-gated"), ("bias", "--polycom-no-bias")):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PolyCom {name} must be True or False ({flag}), got "
                                 f"{getattr(self, name)!r}")

    @property
    def name(self) -> str:
        """What a log calls this activation: "polynorm", "polyrelu-glu", ..."""
        return self.activation + ("-glu" if self.gated else "")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["PolyComConfig"]:
        """The config named by parsed ``--polycom-*`` flags, or None when PolyCom is off."""
        # getattr: argument namespaces written before these flags existed lack them.
        gated = getattr(args, "polycom_gated", False)
        bias = getattr(args, "polycom_bias", True)
        if getattr(args, "polycom_activation", None) in (None, "none"):
            if gated or not bias:
                flag = "--polycom-gated" if gated else "--polycom-no-bias"
                raise ValueError(
                    f"{flag} needs a PolyCom activation: add --polycom-activation polynorm "
                    "(or polyrelu)."
                )
            return None
        return cls(
            activation=args.polycom_activation,
            order=args.polycom_order,
            eps=args.polycom_eps,
            kernel=args.polycom_kernel,
            coeff_mode=args.polycom_coeff_mode,
            gated=gated,
            bias=bias,
        )

    def replace(self, **changes) -> "PolyComConfig":
        return dataclasses.replace(self, **changes)


def set_transformer_config(config, polycom: PolyComConfig) -> None:
    """Set what a PolyCom activation needs in a Megatron ``TransformerConfig`` built from
    Megatron-LM's flags: no bias-activation fusion (it only fuses Megatron's GELU/SwiGLU),
    and the gated linear unit (fc1 as ``[gate, up]``) on exactly for the gated form."""
    config.bias_activation_fusion = False
    config.gated_linear_unit = polycom.gated


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        flag = "--polycom-" + name.replace("_", "-")
        raise ValueError(
            f"Unknown PolyCom {name} {value!r}; set {flag} to one of {', '.join(choices)}."
        )


def matched_ffn_hidden_size(
    swiglu_ffn_hidden_size: int, multiple_of: int = 1, gated: bool = False
) -> int:
    """PolyCom FFN width with the parameter count of a SwiGLU FFN of the given width:
    1.5x for the paper's non-gated form, the same width for the gated form (``gated``).

    ``multiple_of`` rounds up, e.g. to the tensor-parallel size times 8 for tidy GEMMs.
    """
    if swiglu_ffn_hidden_size < 1 or multiple_of < 1:
        raise ValueError("ffn hidden size and multiple_of must be positive integers")
    ratio = SWIGLU_TO_GATED_POLYCOM_WIDTH if gated else SWIGLU_TO_POLYCOM_WIDTH
    width = math.ceil(swiglu_ffn_hidden_size * ratio)
    return -(-width // multiple_of) * multiple_of


def gated_unit_conflict(
    flag: str, activation: str, ffn_hidden_size: Optional[int] = None, gated: bool = False
) -> str:
    """The error for a gated-unit flag (--swiglu, --quick-geglu) combined with PolyCom."""
    if gated:
        return gated_form_conflict(flag, activation)
    width = (
        f"--ffn-hidden-size {matched_ffn_hidden_size(ffn_hidden_size)} (1.5x {ffn_hidden_size})"
        if ffn_hidden_size
        else "a 1.5x --ffn-hidden-size (e.g. SwiGLU 5504 -> PolyCom 8256)"
    )
    return (
        f"{flag} cannot be combined with --polycom-activation {activation}: PolyCom replaces "
        f"the gated linear unit. Drop {flag} and use {width} for the same parameter count "
        f"(or add --polycom-gated for the gated form at {flag}'s width)."
    )


def gated_form_conflict(flag: str, activation: str) -> str:
    """The error for a gated-unit flag combined with the gated PolyCom form."""
    return (
        f"{flag} cannot be combined with --polycom-activation {activation} --polycom-gated: "
        f"both choose the gate's activation. Drop {flag}; --polycom-gated sets Megatron's "
        "gated linear unit itself, at SwiGLU's --ffn-hidden-size."
    )


# Megatron-LM flags (every release 0.15-0.19) that choose or shape Megatron's own MLP
# activation, which a PolyCom activation replaces: (flag, argparse dest, value when off,
# type of its value, or None for a switch). Given with --polycom-activation, each would be
# ignored or would fight PolyCom, so activation_flag_conflicts refuses it, for the launcher
# (before Megatron starts) and for the patched Megatron-LM alike.
MEGATRON_ACTIVATION_FLAGS = (
    ("--swiglu", "swiglu", False, None),
    ("--quick-geglu", "quick_geglu", False, None),
    ("--squared-relu", "squared_relu", False, None),
    ("--openai-gelu", "openai_gelu", False, None),
    ("--use-fused-weighted-squared-relu", "use_fused_weighted_squared_relu", False, None),
    ("--use-te-activation-func", "use_te_activation_func", False, None),
    ("--glu-linear-offset", "glu_linear_offset", 0.0, float),
    ("--activation-func-clamp-value", "activation_func_clamp_value", None, float),
    ("--moe-mlp-glu-interleave-size", "moe_mlp_glu_interleave_size", None, int),  # 0.18+
    ("--moe-shared-expert-glu-interleave-size", "moe_shared_expert_glu_interleave_size",
     None, int),  # 0.19+
)
# The ones that turn the MLP into a gated linear unit: their error says how to match widths.
GATED_UNIT_FLAGS = ("--swiglu", "--quick-geglu")


def add_megatron_activation_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``MEGATRON_ACTIVATION_FLAGS`` on a parser, so that a launcher can read them from a
    command line before Megatron parses it (``parse_known_args``)."""
    for flag, dest, off, kind in MEGATRON_ACTIVATION_FLAGS:
        if kind is None:
            parser.add_argument(flag, dest=dest, action="store_true")
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=off)
    return parser


def activation_flag_conflicts(args: argparse.Namespace, polycom: Optional["PolyComConfig"]) -> list:
    """One message per Megatron activation flag set in ``args`` (Megatron's parsed
    arguments, or ``add_megatron_activation_flags``') that contradicts ``polycom``; empty
    when there is none or PolyCom is off. A flag missing from ``args`` (an older release)
    counts as off."""
    if polycom is None:
        return []
    found = []
    for flag, dest, off, kind in MEGATRON_ACTIVATION_FLAGS:
        value = getattr(args, dest, off)
        if value == off or (kind is None and not value):
            continue
        if flag in GATED_UNIT_FLAGS:
            found.append(gated_unit_conflict(flag, polycom.activation,
                                             getattr(args, "ffn_hidden_size", None),
                                             gated=polycom.gated))
        elif kind is None:
            found.append(
                f"{flag} and --polycom-activation {polycom.activation} both choose the MLP "
                f"activation; drop {flag} (or --polycom-activation)."
            )
        else:
            found.append(
                f"{flag} {value} shapes Megatron's own activation, which --polycom-activation "
                f"{polycom.activation} replaces (it would be ignored); drop {flag}."
            )
    return found


def add_polycom_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--polycom-*`` flags to a Megatron-style argument parser.

    Usable as Megatron's ``extra_args_provider``: it returns the parser.
    """
    defaults = PolyComConfig()
    group = parser.add_argument_group(title="PolyCom activations")
    group.add_argument(
        "--polycom-activation",
        choices=("none",) + ACTIVATIONS,
        default="none",
        help="Replace the MLP activation with PolyNorm or PolyReLU (default 'none' keeps Megatron's). "
        "Turn off --swiglu and use a 1.5x --ffn-hidden-size for matched parameters, or add "
        "--polycom-gated for the gated form at SwiGLU's width.",
    )
    group.add_argument(
        "--polycom-order", type=int, default=defaults.order, help="Highest power r (default: %(default)s)."
    )
    group.add_argument(
        "--polycom-eps", type=float, default=defaults.eps, help="PolyNorm's epsilon (default: %(default)s)."
    )
    group.add_argument(
        "--polycom-kernel",
        choices=KERNELS,
        default=defaults.kernel,
        help="auto: Triton kernels on CUDA, PyTorch elsewhere; or force one (default: %(default)s).",
    )
    group.add_argument(
        "--polycom-coeff-mode",
        choices=COEFF_MODES,
        default=defaults.coeff_mode,
        help="MoE: one coefficient set per layer (shared by experts) or one per expert (default: %(default)s).",
    )
    group.add_argument(
        "--polycom-gated",
        action="store_true",
        default=defaults.gated,
        help="Gated form (PolyNorm-GLU): PolyCom(gate) * up, with Megatron's gated linear unit "
        "turned on by this flag (do not add --swiglu). Same parameters as SwiGLU at the same "
        "--ffn-hidden-size.",
    )
    group.add_argument(
        "--polycom-no-bias",
        dest="polycom_bias",
        action="store_false",
        default=defaults.bias,
        help="Drop the constant term a0 (kept by default, as in the paper).",
    )
    return parser
