"""Our grouped experts' forward against Transformer Engine's contract, on CPU.

TE needs CUDA, so its two pieces that ``TEGroupedMLP`` uses stand in (``te_standins.py``),
each enforcing what TE documents and asserts:

* ``GroupedLinear`` (Megatron wraps it as TEColumn/RowParallelGroupedLinear): one GEMM per
  expert over ``m_splits`` rows; under FP8 every split, and the inner dimension, must be a
  multiple of 16 (32 for MXFP8), else TE's GEMM raises.
* ``Fp8Padding`` / ``Fp8Unpadding``: pad each expert's rows with zeros up to that multiple,
  and drop them again.

Everything else is the megatron-core release on ``sys.path`` running for real: its
``TEGroupedMLP.__init__`` (which builds the padders under the attribute names of that
release), its padding policy (``forward`` of the stock class, run side by side with ours),
its ``TransformerConfig`` and its MoE layer's call into the experts.

Run as a script (one process per release, e.g. a Megatron-LM tree first on PYTHONPATH):
``python tests/te_contract.py`` prints one JSON object: for every check its name, "ok"
or the failure message, and how many cases it covered. ``tests/layers/test_te_contract.py``
runs it for the installed megatron-core and, when ``POLYCOM_MEGATRON_LM_TREES`` is set,
for every tree.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import traceback

import torch

from te_standins import (
    RECIPES,
    GroupedLinearStandIn,
    PaddingCounter,
    align_for,
    te_standing_in,
)


# --- building experts -----------------------------------------------------------------

# Widths TE accepts under every recipe (multiples of 32, MXFP8's alignment).
HIDDEN, FFN, EXPERTS = 32, 64, 4


def init_single_rank() -> None:
    from megatron.core import parallel_state

    import os
    import socket

    from polycom_megatron import cpu

    with socket.socket() as s:  # a free port: other test processes may hold the default
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    cpu.init_process_group(timeout_s=120)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def moe_config(recipe=None, **overrides):
    """A TransformerConfig for one MoE layer; FP8 with ``recipe`` (None: bf16-style)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN, num_moe_experts=EXPERTS, moe_router_topk=2,
        add_bias_linear=False, bias_activation_fusion=False, gated_linear_unit=False,
        use_cpu_initialization=True, params_dtype=torch.float32,
        activation_func=torch.nn.functional.gelu,
        # Router padding for quantization needs it (the experts never call the dispatcher).
        moe_token_dispatcher_type="alltoall",
    )
    if recipe is not None:
        fields.update(fp8="hybrid", fp8_recipe=recipe)
    fields.update(overrides)
    fields = {k: v for k, v in fields.items() if k in _config_fields()}
    return TransformerConfig(**fields)


def _config_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def _submodules():
    from megatron.core.transformer.moe import experts

    cls = getattr(experts, "GroupedMLPSubmodules", None)
    if cls is None:
        from megatron.core.transformer.mlp import MLPSubmodules as cls
    return cls(linear_fc1=GroupedLinearStandIn, linear_fc2=GroupedLinearStandIn)


def build_experts(config, polycom=None, stock=False):
    """``PolyComTEGroupedMLP`` (or the stock ``TEGroupedMLP``) on the stand-ins."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from polycom_megatron.config import PolyComConfig
    from polycom_megatron.layers.grouped_experts import PolyComTEGroupedMLP

    torch.manual_seed(0)
    pg = get_default_pg_collection()
    if stock:
        return TEGroupedMLP(EXPERTS, config, _submodules(), pg_collection=pg)
    polycom = polycom or PolyComConfig(activation="polyrelu", kernel="torch")
    return PolyComTEGroupedMLP(EXPERTS, config, _submodules(), pg_collection=pg, polycom=polycom)


def routed_rows(split, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(split), HIDDEN, generator=g)
    probs = torch.rand(sum(split), generator=g)
    return x, torch.tensor(split), probs


def reference_output(experts, x, split, probs):
    """Each expert's rows through its own fc1, PolyCom and fc2, in plain PyTorch."""
    from polycom_megatron.ops import polynorm_reference, polyrelu_reference

    act = experts.activation_func
    weight, bias = act.coefficients()
    outs = []
    for i, (rows, p) in enumerate(zip(x.split(split), probs.split(split))):
        h = rows @ experts.linear_fc1.__getattr__(f"weight{i}").t()
        w, b = (weight[i], bias[i]) if weight.dim() == 2 else (weight, bias)
        if act.polycom.activation == "polynorm":
            h = polynorm_reference(h, w, b, eps=act.polycom.eps)
        else:
            h = polyrelu_reference(h, w, b)
        outs.append((h * p.unsqueeze(-1)) @ experts.linear_fc2.__getattr__(f"weight{i}").t())
    return torch.cat(outs)


# --- the checks -----------------------------------------------------------------------

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def supported_recipes():
    from megatron.core.enums import Fp8Recipe

    return [r for r in RECIPES if r in {m.value for m in Fp8Recipe}]


@check
def grouped_forward_meets_te_contract():
    """Under every FP8 recipe of this release our forward pads each expert's rows to TE's
    alignment, computes what each expert alone computes, and unpads (values and grads)."""
    from polycom_megatron.config import PolyComConfig

    cases = 0
    split = [5, 0, 19, 3]
    for recipe in [None, *supported_recipes()]:
        for activation, mode in (("polyrelu", "layer"), ("polynorm", "expert")):
            polycom = PolyComConfig(activation=activation, coeff_mode=mode, kernel="torch")
            with te_standing_in(recipe):
                experts = build_experts(moe_config(recipe), polycom)
                x, tokens, probs = routed_rows(split)
                x.requires_grad_(True)
                out, bias = experts(x, tokens, probs)
                assert bias is None and out.shape == x.shape, (out.shape, bias)
                if recipe is not None:
                    align = align_for(recipe)
                    seen = experts.linear_fc1.seen_splits[-1]
                    assert all(m % align == 0 for m in seen), seen
                xr = x.detach().clone().requires_grad_(True)
                expected = reference_output(experts, xr, split, probs)
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
                out.square().sum().backward()
                expected.square().sum().backward()
                torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
            cases += 1
    return cases


@check
def grouped_forward_pads_like_upstream():
    """Padding calls (and the splits fc1 sees) match the stock TEGroupedMLP of this
    release, with the router padding for quantization on and off (0.18 skips it then)."""
    cases = 0
    for recipe in supported_recipes():
        for router_pads in (False, True):
            extra = {}
            if router_pads:
                name = ("moe_router_padding_for_quantization"
                        if "moe_router_padding_for_quantization" in _config_fields()
                        else "moe_router_padding_for_fp8")
                extra[name] = True
            align = align_for(recipe)
            split = [align, 0, 2 * align, align] if router_pads else [5, 0, 19, 3]
            seen = []
            for stock in (True, False):
                with te_standing_in(recipe):
                    config = moe_config(recipe, **extra)
                    experts = build_experts(config, stock=stock)
                    PaddingCounter.calls = 0
                    experts(*routed_rows(split))
                    seen.append((PaddingCounter.calls, experts.linear_fc1.seen_splits[-1]))
            assert seen[0] == seen[1], (
                f"{recipe}, router padding {router_pads}: stock TEGroupedMLP "
                f"(padding calls, fc1 splits) {seen[0]}, ours {seen[1]}")
            cases += 1
    return cases


def moe_layer_expert_kwargs():
    """Keyword names MoELayer passes when it calls its experts (``self.experts(...)``)."""
    from megatron.core.transformer.moe import moe_layer

    tree = ast.parse(textwrap.dedent(inspect.getsource(moe_layer)))
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        target = func.args[0] if isinstance(func, ast.Call) and func.args else func
        if not (isinstance(target, ast.Attribute) and target.attr == "experts"
                and isinstance(target.value, ast.Name) and target.value.id == "self"):
            continue
        for kw in node.keywords:
            if kw.arg is not None:
                names.add(kw.arg)
            elif isinstance(kw.value, ast.Name):  # **expert_kwargs: its literal keys
                for sub in ast.walk(tree):
                    if (isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name)
                            and sub.value.id == kw.value.id
                            and isinstance(sub.slice, ast.Constant)):
                        names.add(sub.slice.value)
    return names


@check
def grouped_forward_takes_what_moe_layer_passes():
    """Every keyword MoELayer hands the experts (``routing_map`` in inference CUDA-graph
    iterations from 0.17, ``output_buffer`` / ``grad_input_buffer`` from 0.19) and every
    optional parameter of the stock forward is accepted, left at None."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    stock = inspect.signature(TEGroupedMLP.forward).parameters
    optional = {n for n, p in stock.items() if p.default is not inspect.Parameter.empty}
    names = sorted(moe_layer_expert_kwargs() | optional)
    with te_standing_in(None):
        experts = build_experts(moe_config())
        out, _ = experts(*routed_rows([2, 1, 0, 3]), **{n: None for n in names})
    assert out.shape[0] == 6
    return len(names)


def _refuses(config_overrides, named, recipe=None, polycom=None):
    from polycom_megatron.config import PolyComConfig

    polycom = polycom or PolyComConfig(activation="polyrelu", kernel="torch")
    with te_standing_in(recipe):
        config = moe_config(recipe, **config_overrides)
        try:
            build_experts(config, polycom)
        except ValueError as error:
            assert named in str(error), f"error does not name {named}: {error}"
            return
        except Exception as error:  # the stock constructor's own failure: not ours
            raise AssertionError(f"{named}: {type(error).__name__} instead of our "
                                 f"ValueError: {error}") from error
    raise AssertionError(f"{config_overrides} was accepted")


@check
def refuses_te_op_fuser():
    """``use_transformer_engine_op_fuser`` (0.18+) would replace our forward: refused by name."""
    if "use_transformer_engine_op_fuser" not in _config_fields():
        return 0
    _refuses(dict(use_transformer_engine_op_fuser=True), "--use-transformer-engine-op-fuser")
    return 1


@check
def refuses_probs_on_input_with_top_k_above_one():
    """``moe_apply_probs_on_input`` is top-1 only (upstream asserts it in its forward)."""
    _refuses(dict(moe_apply_probs_on_input=True, moe_router_topk=2), "--moe-router-topk")
    return 1


@check
def refuses_moe_act_recompute_under_delayed_scaling():
    """TE's GroupedLinear raises when moe_act is recomputed under delayed scaling.

    Every release's TransformerConfig refuses the combination when it is built; a config
    changed afterwards (as launchers and our own patches do) reaches the experts, which
    refuse it themselves."""

    moe_act = dict(recompute_granularity="selective", recompute_modules=["moe_act"],
                   moe_grouped_gemm=True)
    with te_standing_in("delayed"):
        try:
            moe_config("delayed", **moe_act)
        except ValueError as error:
            assert "moe_act" in str(error), error
        else:
            raise AssertionError("TransformerConfig accepted moe_act recompute under delayed")
    with te_standing_in("delayed"):
        config = moe_config("delayed", moe_grouped_gemm=True)
    for name, value in moe_act.items():
        setattr(config, name, value)
    from polycom_megatron.config import PolyComConfig

    with te_standing_in("delayed"):
        try:
            build_experts(config, PolyComConfig(activation="polyrelu", kernel="torch"))
        except ValueError as error:
            assert "--recompute-modules moe_act" in str(error), error
            return 2
        except Exception as error:
            raise AssertionError(f"{type(error).__name__} instead of our ValueError: {error}")
    raise AssertionError("moe_act recompute under delayed scaling reached the experts")


def self_reads(cls):
    """``self.<name>`` loads in the methods ``cls`` itself defines (not its bases')."""
    names = set()
    for value in vars(cls).values():
        func = getattr(value, "__func__", value)
        if not inspect.isfunction(func):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and isinstance(node.ctx, ast.Load)):
                names.add(node.attr)
    return names


def self_writes(classes):
    names = set()
    for cls in classes:
        names |= set(vars(cls))
        for value in vars(cls).values():
            func = getattr(value, "__func__", value)
            if inspect.isfunction(func):
                for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(func)))):
                    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                            and node.value.id == "self" and isinstance(node.ctx, ast.Store)):
                        names.add(node.attr)
    return names


@check
def inherited_attributes_exist():
    """Every attribute our grouped experts read but do not set themselves exists once the
    inherited ``__init__`` of this release has run (FP8 on and off), including the
    padders' names that ``compat`` picks (``fp8_padding`` in 0.15, renamed in 0.16)."""
    from polycom_megatron import compat

    ours = [c for c in _our_grouped_classes()]
    count = 0
    for recipe in (None, "delayed"):
        with te_standing_in(recipe):
            experts = build_experts(moe_config(recipe))
        mine = self_writes([c for c in type(experts).__mro__ if c.__module__.startswith("polycom")])
        # activation_checkpoint is set by _activate itself before it is read.
        reads = set().union(*(self_reads(c) for c in ours)) - mine - {"activation_checkpoint"}
        if recipe is None:  # the padders exist (and are read) only under FP8 / FP4
            reads -= QUANTIZATION_ONLY
        else:
            reads |= set(compat.QUANTIZATION_PADDING_ATTRS)
        missing = sorted(n for n in reads if not hasattr(experts, n))
        assert not missing, f"FP8 {recipe}: inherited attributes missing: {missing}"
        count += len(reads)
    return count


QUANTIZATION_ONLY = {"quantization_padding", "quantization_unpadding", "fp8_padding",
                     "fp8_unpadding"}


def _our_grouped_classes():
    from polycom_megatron.layers import grouped_experts

    return [c for c in vars(grouped_experts).values()
            if inspect.isclass(c) and c.__module__ == grouped_experts.__name__
            and c.__name__ in ("_GroupedPolyCom", "PolyComTEGroupedMLP")]


def run_all() -> dict:
    from megatron.core import package_info

    init_single_rank()
    results = {}
    for fn in CHECKS:
        try:
            results[fn.__name__] = {"ok": True, "cases": fn()}
        except Exception as error:  # reported, not raised: every check runs
            results[fn.__name__] = {
                "ok": False, "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(limit=6)}
    return {"megatron_core": package_info.__version__, "checks": results}


if __name__ == "__main__":
    print("TE-CONTRACT " + json.dumps(run_all()))
    sys.exit(0)
