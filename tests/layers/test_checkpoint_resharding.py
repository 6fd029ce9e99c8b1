"""Distributed checkpoints of PolyCom models reshard across tensor-parallel sizes: saved
at TP=2 (after a training step, so the coefficients have moved), loaded at TP=1 and TP=4,
the model computes the same losses. The gated form's fc1 is ``[gate_i; up_i]`` on each TP
rank; Megatron's GLU checkpoint factory stores it as the whole ``[gate; up]``."""

import pytest
import torch

import gpt_harness as h
from distributed import run_distributed


def _per_token_losses(ddp):
    tokens, position_ids, mask, labels = h.batch(seed=99)
    with torch.no_grad():
        return ddp(tokens, position_ids, mask, labels=labels).detach().clone()


FORMS = {
    "polynorm": dict(activation="polynorm"),
    "polyrelu": dict(activation="polyrelu"),
    "polynorm-glu": dict(activation="polynorm", gated=True),
}


def _save_then_load(rank, world_size, form, ckpt_dir):
    from megatron.core import dist_checkpointing

    from polycom_megatron.config import PolyComConfig

    polycom = PolyComConfig(**FORMS[form])
    config, ddp, optimizer = h.build(h.Layout(tp=2), polycom)
    h.train_step(ddp, optimizer, config)
    saved = _per_token_losses(ddp)
    coeffs = {k: v for k, v in h.snapshot(ddp, "param").items() if "activation_func" in k}
    dist_checkpointing.save(ddp.module.sharded_state_dict(), ckpt_dir)

    results = {"saved": saved, "coeffs": coeffs}
    for tp in (1, 4):
        # A different seed, so loading has to overwrite every weight to pass.
        config, ddp, optimizer = h.build(h.Layout(tp=tp), polycom, seed=h.SEED + tp)
        fresh = _per_token_losses(ddp)
        state = dist_checkpointing.load(ddp.module.sharded_state_dict(), ckpt_dir)
        ddp.module.load_state_dict(state)
        results[f"tp{tp}"] = {"fresh": fresh, "loaded": _per_token_losses(ddp)}
    return results


@pytest.mark.parametrize("form", list(FORMS))
def test_tp2_checkpoint_loads_at_tp1_and_tp4(form, tmp_path):
    results = run_distributed(_save_then_load, 4, form, str(tmp_path), timeout_s=600)
    weights = [v for k, v in results["coeffs"].items() if k.endswith("activation_func.weight")]
    # The step moved the coefficients off their init (all 1/r), so loading them is tested.
    assert weights and all(not torch.allclose(w, torch.full_like(w, 1 / 3)) for w in weights)
    for tp in ("tp1", "tp4"):
        assert not torch.allclose(results[tp]["fresh"], results["saved"]), "init must differ"
        torch.testing.assert_close(results[tp]["loaded"], results["saved"], rtol=1e-5, atol=1e-6)
