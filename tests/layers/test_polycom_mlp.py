"""PolyComMLP and PolyComActivation inside real megatron-core modules (one CPU rank)."""

import pytest
import torch

import gpt_harness as h
from distributed import run_distributed


def _build_and_inspect(rank, world_size):
    from polycom_megatron.config import PolyComConfig

    config, ddp, optimizer = h.build(h.Layout(), PolyComConfig(order=3))
    acts = [layer.mlp.activation_func for layer in ddp.module.decoder.layers]
    named = dict(ddp.module.named_parameters())
    # The param groups Megatron's optimizer really built (wd_mult 0 = no weight decay);
    # they hold fp32 main params only with mixed precision, so match the model's params.
    groups = [g for o in optimizer.chained_optimizers for g in o.optimizer.param_groups]
    no_decay = {id(p) for g in groups if g["wd_mult"] == 0.0 for p in g["params"]}
    coeff_names = [n for n in named if "activation_func" in n]
    return dict(
        distinct=len({id(a.weight) for a in acts}) == len(acts),
        init=[(a.weight.tolist(), a.bias.tolist()) for a in acts],
        attrs={n: (getattr(named[n], "tensor_model_parallel", False),
                   getattr(named[n], "sequence_parallel", False)) for n in coeff_names},
        no_decay={n: id(named[n]) in no_decay for n in coeff_names},
        fc1_decays=id(named["decoder.layers.0.mlp.linear_fc1.weight"]) not in no_decay,
    )


def test_coefficients_per_layer_initialised_and_marked():
    info = run_distributed(_build_and_inspect, 1, timeout_s=120)
    assert info["distinct"], "each layer must own its coefficients"
    for weight, bias in info["init"]:
        assert weight == pytest.approx([1 / 3] * 3) and bias == [0.0]
    # Full gradients come out of the op on every TP rank: Megatron must neither sum them
    # again (sequence_parallel) nor count them per rank in the grad norm (tensor_model_parallel).
    assert info["attrs"] and all(a == (False, False) for a in info["attrs"].values())
    assert all(info["no_decay"].values()), "coefficients are excluded from weight decay"
    assert info["fc1_decays"]


def _build_with(rank, world_size, overrides, polycom_kwargs=None):
    from polycom_megatron.config import PolyComConfig

    try:
        h.build(h.Layout(), PolyComConfig(**(polycom_kwargs or {})), **overrides)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(gated_linear_unit=True), "--swiglu"),
        (dict(bias_activation_fusion=True, add_bias_linear=True,
              activation_func=torch.nn.functional.gelu), "--no-bias-gelu-fusion"),
        (dict(activation_func_fp8_input_store=True, gated_linear_unit=True,
              activation_func=torch.nn.functional.silu), "--swiglu"),
        (dict(use_te_activation_func=True), "--use-te-activation-func"),
    ],
)
def test_incompatible_megatron_settings_are_refused(overrides, flag):
    message = run_distributed(_build_with, 1, overrides, timeout_s=120)
    assert message is not None and flag in message


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(gated_linear_unit=False), "--polycom-gated (PolyComConfig.gated) needs"),
        (dict(glu_linear_offset=1.0), "--glu-linear-offset"),
        (dict(activation_func_clamp_value=7.0), "--activation-func-clamp-value"),
    ],
)
def test_gated_form_refuses_settings_it_cannot_honour(overrides, flag):
    message = run_distributed(_build_with, 1, overrides, dict(gated=True), timeout_s=120)
    assert message is not None and flag in message


def test_fp8_input_store_is_refused():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from polycom_megatron.layers.mlp import check_transformer_config

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    config.activation_func_fp8_input_store = True  # Megatron allows it only with SwiGLU
    with pytest.raises(ValueError, match="--activation-func-fp8-input-store"):
        check_transformer_config(config)


def _parameter_counts(rank, world_size):
    import moe_harness as mh
    from polycom_megatron.config import PolyComConfig

    swiglu = dict(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    counts = {}
    for name, build in (("dense", h.build), ("moe", mh.build)):
        for form, polycom, overrides in (
            ("swiglu", None, swiglu),
            ("polynorm-glu", PolyComConfig(gated=True), {}),
            ("polynorm-glu-no-bias", PolyComConfig(gated=True, bias=False), {}),
            ("polynorm", PolyComConfig(), {}),
        ):
            _, ddp, _ = build(h.Layout(), polycom, **overrides)
            counts[(name, form)] = sum(p.numel() for p in ddp.module.parameters())
    return counts


def test_gated_form_has_swiglus_parameters_at_swiglus_width():
    """At the same FFN width, PolyNorm-GLU = SwiGLU + the coefficients (r + 1 per
    activation: 2 dense layers; or 1 dense layer, the routed experts and the shared expert
    in layer mode), while the non-gated form at that width has a third fewer FFN weights."""
    counts = run_distributed(_parameter_counts, 1, timeout_s=300)
    for name, activations in (("dense", 2), ("moe", 3)):
        swiglu = counts[(name, "swiglu")]
        assert counts[(name, "polynorm-glu")] == swiglu + activations * 4
        assert counts[(name, "polynorm-glu-no-bias")] == swiglu + activations * 3
        assert counts[(name, "polynorm")] < swiglu
