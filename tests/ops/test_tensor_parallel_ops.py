"""The ops with the hidden dimension sharded over a process group equal the unsharded op.

The gated ops take fc1's output as Megatron's GLU shards it: every rank holds
``[gate shard, up shard]`` of the full ``[gate, up]``.
"""

import torch
import torch.distributed as dist

from distributed import run_distributed
from polycom_megatron.ops import polynorm, polynorm_glu, polyrelu, polyrelu_glu


def _plain_shard(t, cols):
    return t[..., cols]


def _glu_shard(t, cols):
    gate, up = t.chunk(2, dim=-1)
    return torch.cat([gate[..., cols], up[..., cols]], dim=-1)


# name -> (op, bias or None, how this rank's slice of the op's input is taken)
CASES = {
    "polynorm": (polynorm, True, _plain_shard),
    "polyrelu": (polyrelu, True, _plain_shard),
    "polynorm_glu": (polynorm_glu, True, _glu_shard),
    "polynorm_glu_no_bias": (polynorm_glu, False, _glu_shard),
    "polyrelu_glu": (polyrelu_glu, True, _glu_shard),
    "polyrelu_glu_no_bias": (polyrelu_glu, False, _glu_shard),
}


def _sharded_vs_full(rank, world_size):
    g = torch.Generator().manual_seed(0)
    n = 8 * world_size
    width = n // world_size
    cols = slice(rank * width, (rank + 1) * width)
    weight = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    results = {}
    for name, (op, with_bias, shard_of) in CASES.items():
        gated = shard_of is _glu_shard
        x = torch.randn(6, 5, 2 * n if gated else n, dtype=torch.float64, generator=g)
        dy = torch.randn(6, 5, n, dtype=torch.float64, generator=g)
        bias = torch.tensor([0.05], dtype=torch.float64) if with_bias else None

        def leaves():
            return [t if t is None else t.clone().requires_grad_() for t in (weight, bias)]

        full = [x.clone().requires_grad_()] + leaves()
        y_full = op(*full)
        y_full.backward(dy)
        shard = [shard_of(x, cols).requires_grad_()] + leaves()
        y_shard = op(*shard, group=dist.group.WORLD)
        y_shard.backward(dy[..., cols])
        # What the published code does under TP: normalise each shard on its own.
        y_naive = op(shard_of(x, cols), weight, bias)
        results[name] = dict(
            out=(y_shard, y_full[..., cols]),
            dx=(shard[0].grad, shard_of(full[0].grad, cols)),
            dweight=(shard[1].grad, full[1].grad),
            dbias=(None, None) if bias is None else (shard[2].grad, full[2].grad),
            naive_error=(y_naive - y_full[..., cols]).abs().max().item(),
        )
    return results


def test_sharded_ops_equal_full_ops():
    results = run_distributed(_sharded_vs_full, 2, timeout_s=180)
    assert set(results) == set(CASES)
    for name, checks in results.items():
        for what in ("out", "dx", "dweight", "dbias"):
            got, want = checks[what]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name} {what}")
    # Per-shard normalisation is visibly wrong, so the check above has teeth for PolyNorm.
    for name in ("polynorm", "polynorm_glu", "polynorm_glu_no_bias"):
        assert results[name]["naive_error"] > 1e-2, name
