"""Every megatron-core version difference we depend on, and nowhere else.

Supported: megatron-core 0.15 up to (not including) 0.20. Code elsewhere calls the
helpers below instead of testing versions itself.
"""

from __future__ import annotations

from megatron.core import package_info, parallel_state

MIN_VERSION = (0, 15)
MAX_VERSION_EXCLUSIVE = (0, 20)


def _parse(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


MCORE_VERSION = _parse(package_info.__version__)


def check_supported() -> None:
    if not MIN_VERSION <= MCORE_VERSION < MAX_VERSION_EXCLUSIVE:
        raise RuntimeError(
            f"polycom-megatron supports megatron-core >=0.15,<0.20; found "
            f"{package_info.__version__}. Install a supported release, e.g. "
            "pip install 'megatron-core>=0.15,<0.20'."
        )


def mlp_tp_group(mlp):
    """The process group an MLP's hidden dimension is sharded over (TP or expert-TP)."""
    group = getattr(mlp, "tp_group", None)
    if group is not None:
        return group
    is_expert = getattr(mlp, "is_expert", False)
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()
