"""The FFN variants that benchmarks and experiments put side by side, by name.

One place says what "swiglu", "gelu", "polynorm", "polyrelu", "polynorm-glu" and
"polyrelu-glu" mean: whether fc1 is a gated linear unit, which PolyCom settings (if any)
they use, the FFN width that gives each the parameter budget of a SwiGLU FFN of width f,
and the ``train-cpu`` / Megatron-LM flags that select them.
"""

from __future__ import annotations

from typing import List, Optional

from polycom_megatron.config import PolyComConfig, matched_ffn_hidden_size

BASELINES = ("swiglu", "gelu")
POLYCOM = ("polyrelu", "polynorm", "polyrelu-glu", "polynorm-glu")
NAMES = BASELINES + POLYCOM
# fc1 computes [gate, up] (twice the FFN width) for these.
GATED = ("swiglu", "polyrelu-glu", "polynorm-glu")


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(NAMES)}")
    return name


def polycom_config(name: str, **settings) -> Optional[PolyComConfig]:
    """The PolyCom settings of a variant (``settings``: kernel, order, ...), None for a baseline."""
    if check_name(name) in BASELINES:
        return None
    base, _, glu = name.partition("-")
    return PolyComConfig(activation=base, gated=glu == "glu", **settings)


def ffn_width(name: str, swiglu_width: int, multiple_of: int = 1) -> int:
    """The FFN width of ``name`` with the parameters of a SwiGLU FFN of ``swiglu_width``:
    gated variants keep the width (three matrices), the others take 1.5x (two matrices)."""
    if check_name(name) == "swiglu":
        return matched_ffn_hidden_size(swiglu_width, multiple_of, gated=True)
    return matched_ffn_hidden_size(swiglu_width, multiple_of, gated=name in GATED)


def activation_flags(name: str) -> List[str]:
    """The command-line flags (train-cpu's, which follow Megatron-LM's) that select ``name``."""
    if check_name(name) == "swiglu":
        return ["--polycom-activation", "none", "--swiglu"]
    if name == "gelu":
        return ["--polycom-activation", "none"]
    base, _, glu = name.partition("-")
    return ["--polycom-activation", base] + (["--polycom-gated"] if glu else [])
