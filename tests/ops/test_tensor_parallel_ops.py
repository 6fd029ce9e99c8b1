"""The ops with the hidden dimension sharded over a process group equal the unsharded op."""

import torch
import torch.distributed as dist

from distributed import run_distributed
from polycom_megatron.ops import polynorm, polyrelu


def _sharded_vs_full(rank, world_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 8 * world_size, dtype=torch.float64, generator=g)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    weight = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    bias = torch.tensor([0.05], dtype=torch.float64)
    width = x.shape[-1] // world_size
    cols = slice(rank * width, (rank + 1) * width)
    results = {}
    for op in (polynorm, polyrelu):
        full = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y_full = op(*full)
        y_full.backward(dy)
        shard = [x[..., cols].clone().requires_grad_(), weight.clone().requires_grad_(),
                 bias.clone().requires_grad_()]
        y_shard = op(*shard, group=dist.group.WORLD)
        y_shard.backward(dy[..., cols])
        # What the published code does under TP: normalise each shard on its own.
        y_naive = op(x[..., cols], weight, bias)
        results[op.__name__] = dict(
            out=(y_shard, y_full[..., cols]),
            dx=(shard[0].grad, full[0].grad[..., cols]),
            dweight=(shard[1].grad, full[1].grad),
            dbias=(shard[2].grad, full[2].grad),
            naive_error=(y_naive - y_full[..., cols]).abs().max().item(),
        )
    return results


def test_sharded_ops_equal_full_ops():
    results = run_distributed(_sharded_vs_full, 2, timeout_s=180)
    for name, checks in results.items():
        for what in ("out", "dx", "dweight", "dbias"):
            got, want = checks[what]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name} {what}")
    # Per-shard normalisation is visibly wrong, so the check above has teeth for PolyNorm.
    assert results["polynorm"]["naive_error"] > 1e-2
