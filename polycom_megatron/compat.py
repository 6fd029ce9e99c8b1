"""Every megatron-core version difference we depend on, and nowhere else.

Supported: megatron-core 0.15 up to (not including) 0.20. Code elsewhere calls the
helpers below instead of testing versions itself.
"""

from __future__ import annotations

import functools

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


# --- MLP specs -------------------------------------------------------------------------
# Up to 0.17 a TransformerLayer's dense MLP is ``ModuleSpec(module=MLP, submodules=...)``,
# built with build_module. From 0.18 it is ``functools.partial(MLP.as_mlp_submodule,
# submodules=...)`` that TransformerLayer calls with (config, pg_collection, ...).


def _classmethod_owner(func, method_name: str):
    """The class of a bound classmethod ``cls.<method_name>``, or None."""
    if getattr(func, "__name__", None) == method_name and isinstance(
        getattr(func, "__self__", None), type
    ):
        return func.__self__
    return None


def mlp_spec_parts(node):
    """``(module class, submodules, params)`` of a dense-MLP spec in either form, or None."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    parts = builder_parts(node)
    if parts is None:
        return None
    if isinstance(node, ModuleSpec):
        return parts if isinstance(parts[0], type) else None
    owner = _classmethod_owner(parts[0], "as_mlp_submodule")
    return None if owner is None else (owner, *parts[1:])


def make_mlp_spec(module_cls, submodules, params):
    """A dense-MLP spec for ``module_cls`` (an MLP subclass) in this version's form."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(module_cls.as_mlp_submodule, submodules=submodules, **params)
    return ModuleSpec(module=module_cls, params=params, submodules=submodules)


def build_submodule(spec_or_builder, **kwargs):
    """Build from a ModuleSpec (any version) or call a builder (the 0.17+ style)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(spec_or_builder, ModuleSpec):
        return build_module(spec_or_builder, **kwargs)
    return spec_or_builder(**kwargs)


def build_layer_ffn(spec_or_builder, config):
    """A decoder layer's FFN (MLP or MoE layer) on its own, built as TransformerLayer builds
    it: a ModuleSpec (up to 0.17) with ``config``; a builder (0.18+) also with the default
    process groups and ``is_mtp_layer``, which MLP.as_mlp_submodule and MoELayer need."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec_or_builder, ModuleSpec):
        return build_submodule(spec_or_builder, config=config)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return spec_or_builder(config=config, pg_collection=get_default_pg_collection(),
                           is_mtp_layer=False)


# --- MoE specs ---------------------------------------------------------------------------
# Up to 0.16 the MoE layer, its experts and its shared experts are ModuleSpecs. From 0.17
# the experts and shared experts are builders, ``functools.partial(cls, submodules=...)``,
# which MoELayer calls with (num_local_experts, config, pg_collection=...) or (config=,
# pg_collection=, gate=); from 0.18 the MoE layer itself is ``partial(MoELayer, ...)`` and
# every builder also gets ``name=``. 0.19 builds shared experts through a function,
# ``moe_module_specs._build_shared_experts``, that picks SharedExpertMLP or, with
# ``use_grouped_gemm_for_shared_expert``, FusedSharedExpertMLP.


def builder_parts(node):
    """``(module, submodules, params)`` of ``ModuleSpec(module=...)`` or of
    ``partial(module, submodules=..., **params)``; None for anything else."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, ModuleSpec):
        return node.module, node.submodules, dict(node.params or {})
    if isinstance(node, functools.partial) and not node.args:
        params = dict(node.keywords)
        return node.func, params.pop("submodules", None), params
    return None


def builder_like(node, module, submodules, params):
    """A spec for ``module`` in the same form as ``node`` (ModuleSpec or partial)."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, ModuleSpec):
        return dataclasses.replace(node, module=module, submodules=submodules, params=params)
    if submodules is None:
        return functools.partial(module, **params)
    return functools.partial(module, submodules=submodules, **params)


def shared_expert_builders() -> tuple:
    """What a stock spec names for "a shared expert MLP": the class, and from 0.19 the
    builder function that picks between it and FusedSharedExpertMLP."""
    from megatron.core.models.gpt import moe_module_specs
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    chooser = getattr(moe_module_specs, "_build_shared_experts", None)
    return (SharedExpertMLP,) if chooser is None else (SharedExpertMLP, chooser)


def name_kwarg(name) -> dict:
    """``name=`` for Megatron module constructors, which take it from 0.18 (it is only
    ever passed there), so that older releases never see the keyword."""
    return {} if name is None else {"name": name}


# --- MoE experts -------------------------------------------------------------------------
# megatron-core 0.17 removed the legacy GroupedMLP and its grouped_gemm wrapper module.


def legacy_grouped_mlp():
    """megatron-core's legacy ``GroupedMLP`` class (<= 0.16), or None."""
    from megatron.core.transformer.moe import experts

    return getattr(experts, "GroupedMLP", None)


def legacy_grouped_gemm():
    """The ``grouped_gemm_util`` module the legacy GroupedMLP computes with (<= 0.16)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    return grouped_gemm_util


# --- FP8 / FP4 expert padding ----------------------------------------------------------
# TEGroupedMLP.__init__ builds Transformer Engine's Fp8Padding / Fp8Unpadding under FP8 or
# FP4. megatron-core 0.15 stores them as ``fp8_padding`` / ``fp8_unpadding``; 0.16 renamed
# them ``quantization_padding`` / ``quantization_unpadding``. From 0.18 upstream skips its
# own padding when the router (``moe_router_padding_for_quantization``) or the flex
# dispatcher's backend has already padded each expert's rows.

QUANTIZATION_PADDING_ATTRS = (
    ("quantization_padding", "quantization_unpadding")
    if MCORE_VERSION >= (0, 16)
    else ("fp8_padding", "fp8_unpadding")
)


def quantization_padders(experts):
    """``(pad, unpad)``: the Fp8Padding / Fp8Unpadding modules TEGroupedMLP built."""
    pad, unpad = QUANTIZATION_PADDING_ATTRS
    return getattr(experts, pad), getattr(experts, unpad)


def skip_routed_expert_padding(config) -> bool:
    """Whether the experts must not pad their rows for FP8/FP4 (already padded upstream)."""
    from megatron.core.transformer.moe import moe_utils

    skip = getattr(moe_utils, "skip_routed_expert_padding", None)
    return False if skip is None else bool(skip(config))
