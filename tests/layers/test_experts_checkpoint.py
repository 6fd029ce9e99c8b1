"""Distributed checkpoints of PolyCom MoE models reshard along the expert axis: saved at
EP=4 (after training steps, so the coefficients have moved and, per expert, differ), loaded
at EP=2, EP=1, expert TP=2, TP=2 with SP, and into the grouped backend, the model computes
the same per-token losses; for PolyNorm and for the gated PolyNorm-GLU (whose expert fc1 is
``[gate_i; up_i]`` per expert-TP rank)."""

import os

import pytest
import torch

import gpt_harness as h
import moe_harness as mh
from distributed import run_distributed

SAVED_AT = h.Layout(ep=4)
TARGETS = {
    "ep2": (h.Layout(ep=2), {}),
    "ep1": (h.Layout(ep=1), {}),
    "ep2-etp2": (h.Layout(ep=2, etp=2), {}),
    "tp2-sp-ep2-etp1": (h.Layout(tp=2, sp=True, ep=2, etp=1), {}),
    # Same checkpoint keys in both backends, so the per-expert loop's checkpoint loads
    # into the grouped experts (legacy GroupedMLP, reference grouped GEMM on CPU).
    "grouped ep2": (h.Layout(ep=2), dict(moe_grouped_gemm=True)),
}
COEFF = "decoder.layers.1.mlp.experts.experts.activation_func.weight"
# (coefficient mode, gated form): PolyNorm, and PolyNorm-GLU, whose expert fc1 holds
# [gate_i; up_i] per expert-TP rank.
RUNS = (("layer", False), ("expert", False), ("layer", True), ("expert", True))
NAMES = ["layer", "expert", "layer-glu", "expert-glu"]


def _name(mode, gated):
    return mode + ("-glu" if gated else "")


def _save_then_load(rank, world_size, ckpt_root):
    from megatron.core import dist_checkpointing

    from polycom_megatron.config import PolyComConfig

    mh.use_reference_grouped_gemm()
    results = {}
    for mode, gated in RUNS:
        polycom = PolyComConfig(activation="polynorm", coeff_mode=mode, gated=gated)
        ckpt_dir = os.path.join(ckpt_root, _name(mode, gated))
        config, ddp, optimizer = mh.build(SAVED_AT, polycom)
        for step in range(2):
            mh.train_step(ddp, optimizer, step)
        saved = mh.per_token_losses(ddp)
        coeff = mh.gather(ddp.module, "param")[COEFF]
        dist_checkpointing.save(ddp.module.sharded_state_dict(), ckpt_dir)

        runs = {"saved": saved, "coeff": coeff}
        for name, (layout, overrides) in TARGETS.items():
            # Other weights ("fresh" salt), so loading has to overwrite every one to pass.
            config, ddp, optimizer = mh.build(layout, polycom, salt="fresh", **overrides)
            fresh = mh.per_token_losses(ddp)
            state = dist_checkpointing.load(ddp.module.sharded_state_dict(), ckpt_dir)
            ddp.module.load_state_dict(state)
            runs[name] = {
                "fresh": fresh,
                "loaded": mh.per_token_losses(ddp),
                "coeff": mh.gather(ddp.module, "param")[COEFF],
            }
        results[_name(mode, gated)] = runs
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_ckpt")
    for name in NAMES:
        os.makedirs(root / name)
    return run_distributed(_save_then_load, 4, str(root), timeout_s=600)


@pytest.mark.parametrize("mode", NAMES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_ep4_checkpoint_loads_at_other_layouts(results, mode, target):
    runs = results[mode]
    got = runs[target]
    assert not torch.allclose(got["fresh"], runs["saved"]), "fresh weights must differ"
    torch.testing.assert_close(got["loaded"], runs["saved"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["coeff"], runs["coeff"], rtol=0, atol=0)


@pytest.mark.parametrize("form", ["", "-glu"])
def test_saved_coefficients_moved_and_per_expert_ones_differ(results, form):
    layer, expert = results["layer" + form]["coeff"], results["expert" + form]["coeff"]
    assert layer.shape == (3,) and expert.shape == (4, 3)
    assert not torch.allclose(layer, torch.full_like(layer, 1 / 3))
    assert all(not torch.equal(expert[i], expert[j]) for i in range(4) for j in range(i + 1, 4))
