"""A small GPTModel with PolyCom MLPs is the same model at every tensor-parallel size.

Same seed, same batch; one step through Megatron's DDP, finalize_model_grads and
optimizer at TP=1, TP=2 and TP=4, with sequence parallelism off and on; loss, grad norm,
every gradient (gathered to full shape) and every parameter after the step must agree.
The gated forms (PolyCom(gate) * up, Megatron's GLU fc1 sharded as [gate_i; up_i] per TP
rank) run the same check: PolyNorm-GLU at every layout, PolyReLU-GLU without a0 at two.
"""

import pytest
import torch

import gpt_harness as h
from distributed import run_distributed

LAYOUTS = [h.Layout(tp=2), h.Layout(tp=2, sp=True), h.Layout(tp=4), h.Layout(tp=4, sp=True)]
# Keyword arguments of PolyComConfig, and the layouts compared with TP=1.
FORMS = {
    "polynorm": (dict(activation="polynorm"), LAYOUTS),
    "polyrelu": (dict(activation="polyrelu"), LAYOUTS),
    "polynorm-glu": (dict(activation="polynorm", gated=True), LAYOUTS),
    "polyrelu-glu-no-bias": (
        dict(activation="polyrelu", gated=True, bias=False),
        [h.Layout(tp=2), h.Layout(tp=4, sp=True)],
    ),
}


def _all_layouts(rank, world_size, form, config_overrides, layouts=tuple(LAYOUTS)):
    from polycom_megatron.config import PolyComConfig

    polycom = PolyComConfig(**form)
    results = {}
    for layout in (h.Layout(tp=1),) + tuple(layouts):
        results[str(layout)] = h.run_layout(layout, polycom, steps=2, **config_overrides)
    return results


def _check(results):
    base = results.pop(str(h.Layout(tp=1)))
    for name, res in results.items():
        torch.testing.assert_close(res["loss"], base["loss"], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(res["grad_norm"], base["grad_norm"], rtol=1e-5, atol=1e-6)
        h.assert_same(res["initial"], base["initial"], rtol=0, atol=0, label=f"{name} init")
        h.assert_same(res["grads"], base["grads"], label=f"{name} grads")
        # Adam divides by sqrt(v): a near-zero gradient's fp32 round-off becomes a visible
        # fraction of a step, so parameters are compared to 1% of one step (lr = 1e-2).
        h.assert_same(res["params"], base["params"], rtol=0, atol=1e-4, label=f"{name} params")
    coeffs = [k for k in base["grads"] if "activation_func" in k]
    assert coeffs and all(base["grads"][k].abs().sum() > 0 for k in coeffs)


@pytest.mark.parametrize("form", list(FORMS))
def test_same_model_at_every_tp_size(form):
    kwargs, layouts = FORMS[form]
    results = run_distributed(_all_layouts, 4, kwargs, {}, tuple(layouts), timeout_s=600)
    fc1 = results[str(h.Layout(tp=1))]["grads"]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.shape[0] == (2 if kwargs.get("gated") else 1) * 48  # [gate; up] when gated
    _check(results)


@pytest.mark.parametrize(
    "recompute",
    [
        dict(recompute_granularity="selective", recompute_modules=["mlp"]),
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ],
    ids=["selective-mlp", "full"],
)
def test_same_model_with_activation_recompute(recompute):
    layouts = (h.Layout(tp=2, sp=True),)
    form = dict(activation="polynorm")
    _check(run_distributed(_all_layouts, 2, form, recompute, layouts, timeout_s=600))
