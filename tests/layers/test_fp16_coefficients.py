"""With --fp16 the PolyCom coefficients and their gradients stay float32.

A coefficient's gradient sums over every row and hidden unit of its layer, so it is far
larger than any weight's gradient; in fp16 it would overflow first and Megatron's dynamic
loss scaler would then shrink the scale for every weight. The model here goes through
Megatron's real ``Float16Module`` and DDP (fp16 gradient buffers, as --fp16 has without
--accumulate-allreduce-grads-in-fp32), dense and MoE layers on one CPU rank.
"""

import pytest
import torch

import gpt_harness as h
import moe_harness as mh
from distributed import run_distributed



def _scaled_backward(rank, world_size, moe):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from polycom_megatron.config import PolyComConfig
    from polycom_megatron.model import build_gpt_model

    layout = h.Layout()
    h.init_parallel(layout)
    config = h.transformer_config(layout, fp16=True, params_dtype=torch.float16,
                                  **(mh.MOE if moe else {}))
    torch.manual_seed(h.SEED)
    model = build_gpt_model(config, PolyComConfig(kernel="torch"), vocab_size=h.VOCAB,
                            max_sequence_length=h.SEQ)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  Float16Module(config, model))
    tokens, position_ids, mask, labels = h.batch()
    steps = []
    for exponent in range(0, 40, 2):  # the loss scales a dynamic scaler would try
        ddp.zero_grad_buffer()
        loss = ddp(tokens, position_ids, mask, labels=labels).float().mean()
        (loss * 2.0 ** exponent).backward()
        grads = {n: p.main_grad for n, p in ddp.module.named_parameters()}
        coeffs = {n: g for n, g in grads.items() if "activation_func" in n}
        weights = {n: g for n, g in grads.items() if n not in coeffs}
        steps.append(dict(
            exponent=exponent,
            coeff_dtypes={str(g.dtype) for g in coeffs.values()},
            param_dtypes={str(p.dtype) for n, p in ddp.module.named_parameters() if n in coeffs},
            weight_dtypes={str(g.dtype) for g in weights.values()},
            coeff_finite=all(torch.isfinite(g).all().item() for g in coeffs.values()),
            weight_finite=all(torch.isfinite(g).all().item() for g in weights.values()),
            coeff_max=max(g.abs().max().item() for g in coeffs.values()),
            weight_max=max(g.abs().max().item() for g in weights.values()),
            n_coeffs=len(coeffs),
        ))
    # And Megatron's fp16 distributed optimizer steps them as the float32 params they are.
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, fp16=True, use_distributed_optimizer=True,
        initial_loss_scale=2.0 ** 12), [ddp])
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()
              if "activation_func" in n}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(tokens, position_ids, mask, labels=labels).float().mean()
    optimizer.scale_loss(loss).backward()
    finalize_model_grads([ddp])
    stepped, _, _ = optimizer.step()
    after = dict(ddp.module.named_parameters())
    steps[-1]["optimizer"] = dict(
        stepped=bool(stepped),
        moved=all(not torch.equal(before[n], after[n]) for n in before),
        dtypes={str(after[n].dtype) for n in before})
    return steps


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp16_model_keeps_coefficient_grads_fp32_and_finite(moe):
    steps = run_distributed(_scaled_backward, 1, moe, timeout_s=300)
    assert steps[0]["n_coeffs"] >= 2
    for step in steps:
        assert step["weight_dtypes"] == {"torch.float16"}  # the model really is fp16
        assert step["param_dtypes"] == {"torch.float32"}, step
        assert step["coeff_dtypes"] == {"torch.float32"}, step
    usable = [s for s in steps if s["weight_finite"]]
    assert usable and len(usable) < len(steps), "the scan must reach the weights' overflow"
    # The coefficients never set the loss scale: finite at every scale the weights allow,
    # and still finite at the first scale where a weight gradient overflows.
    assert all(s["coeff_finite"] for s in usable)
    assert steps[len(usable)]["coeff_finite"], steps[len(usable)]
    assert steps[-1]["optimizer"] == dict(stepped=True, moved=True, dtypes={"torch.float32"})
