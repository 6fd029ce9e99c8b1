"""Spec builders: Megatron GPT layer and block specs whose MLPs use PolyCom.

The central piece is ``with_polycom(spec, polycom)``: it takes any GPT layer or block spec
that Megatron built (local or Transformer Engine backend, dense or MoE) and returns a copy
in which each MLP's activation is PolyCom. Everything else in the spec (attention,
norms, linears, TE fusions) is left as the user chose it, so switching a run to PolyCom
changes nothing but the activation.

``get_gpt_layer_spec`` and ``get_gpt_block_spec`` are the two builders most users need.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron import compat
from polycom_megatron.config import PolyComConfig
from polycom_megatron.layers.activation import PolyComActivation
from polycom_megatron.layers.experts import polycom_moe_spec
from polycom_megatron.layers.mlp import PolyComMLP
from polycom_megatron.layers.norm import LocalNorm


def polycom_mlp_spec(mlp_spec, polycom: PolyComConfig):
    """A dense ``MLP`` spec (either form, see compat) -> the same linears around a PolyCom
    activation. The activation is a builder that PolyComMLP calls with its TP group."""
    _, submodules, params = compat.mlp_spec_parts(mlp_spec)
    activation = functools.partial(PolyComActivation, polycom=polycom)
    submodules = dataclasses.replace(submodules, activation_func=activation)
    return compat.make_mlp_spec(PolyComMLP, submodules, params)


def with_polycom(spec, polycom: PolyComConfig):
    """Copy of a GPT layer/block spec with every MLP (dense, expert, shared expert) on PolyCom."""

    def rewrite(node):
        builder = compat.builder_parts(node)
        if builder is not None and builder[0] is MoELayer:
            return polycom_moe_spec(node, polycom)
        parts = compat.mlp_spec_parts(node)
        if parts is None:
            return None
        module = parts[0]
        if module is MLP:
            return polycom_mlp_spec(node, polycom)
        if module.__name__.startswith("TEFusedMLP"):
            raise ValueError(
                "The Transformer Engine op-fuser MLP (--use-te-op-fuser) fuses only "
                "GELU/SiLU/ReLU; drop that flag to use PolyCom."
            )
        return None

    converted = _rewrite_spec(spec, rewrite)
    left = stock_mlps(converted)
    if left:
        # A spec shape this rewrite does not know would otherwise keep the stock
        # activation and train without a word.
        raise ValueError(
            f"these MLPs in the layer spec were not converted to PolyCom: {', '.join(left)}. "
            "polycom-megatron does not know how to rewrite them for this megatron-core "
            "release; please report the spec."
        )
    return converted


def stock_mlps(spec) -> list:
    """Names of Megatron's own MLP and expert classes still in a spec tree (ModuleSpecs,
    submodule dataclasses, lists, and the ``functools.partial`` builders of megatron-core
    0.17+). ``MoELayer`` may stay: its experts carry the activation."""
    classes = (MLP, SequentialMLP, TEGroupedMLP)  # SharedExpertMLP is an MLP
    legacy = compat.legacy_grouped_mlp()
    builders = (*compat.shared_expert_builders(), *((legacy,) if legacy is not None else ()))
    found, seen = [], set()

    def is_stock(node) -> bool:
        if any(node is builder for builder in builders):
            return True
        return (isinstance(node, type) and issubclass(node, classes)
                and not node.__module__.startswith("polycom_megatron"))

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        owner = getattr(node, "__self__", node)  # a bound classmethod such as as_mlp_submodule
        if is_stock(owner):
            found.append(owner.__name__)
        elif isinstance(node, functools.partial):
            for child in (node.func, *node.args, *node.keywords.values()):
                visit(child)
        elif isinstance(node, (list, tuple)):
            for child in node:
                visit(child)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                visit(getattr(node, field.name))

    visit(spec)
    return sorted(set(found))


def with_local_norms(spec):
    """Swap Megatron's TE-less fallback norm for ``LocalNorm``, which supports sequence
    parallelism. Only matters without Transformer Engine and apex (e.g. on CPU)."""

    def rewrite(node):
        return LocalNorm if node is WrappedTorchNorm else None

    return _rewrite_spec(spec, rewrite)


def get_gpt_layer_spec(
    polycom: PolyComConfig,
    use_te: bool = True,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """One GPT decoder layer with a PolyCom MLP (or PolyCom experts if ``num_experts``)."""
    if use_te:
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    else:
        base = with_local_norms(
            gpt_layer_specs.get_gpt_layer_local_spec(
                num_experts=num_experts,
                moe_grouped_gemm=moe_grouped_gemm,
                qk_layernorm=qk_layernorm,
                normalization=normalization,
            )
        )
    return with_polycom(base, polycom)


def get_gpt_block_spec(
    config: TransformerConfig,
    polycom: PolyComConfig,
    use_te: bool = True,
    normalization: Optional[str] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
):
    """The decoder block of ``config`` (dense, MoE, mixed per ``moe_layer_freq``) on PolyCom.

    Layers are sliced for the pipeline stage as Megatron does (``vp_stage``/``pp_rank``).
    """
    base = gpt_layer_specs.get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=normalization or config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if not use_te:
        base = with_local_norms(base)
    return with_polycom(base, polycom)


def _rewrite_spec(node, rewrite: Callable):
    """Rebuild a spec tree, replacing each node for which ``rewrite`` returns non-None.

    Specs are shared module-level objects in Megatron, so nothing is mutated.
    """
    replaced = rewrite(node)
    if replaced is not None:
        return replaced
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite_spec(item, rewrite) for item in node)
    if isinstance(node, functools.partial):
        # 0.17+ builders: partial(SomeModule, submodules=..., ...) nests specs in keywords.
        keywords = {k: _rewrite_spec(v, rewrite) for k, v in node.keywords.items()}
        if any(keywords[k] is not v for k, v in node.keywords.items()):
            return functools.partial(node.func, *node.args, **keywords)
        return node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for field in dataclasses.fields(node):
            if not field.init:
                continue
            value = getattr(node, field.name)
            new_value = _rewrite_spec(value, rewrite)
            if new_value is not value:
                changes[field.name] = new_value
        return dataclasses.replace(node, **changes) if changes else node
    return node
