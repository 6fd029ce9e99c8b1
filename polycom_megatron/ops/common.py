"""Pieces shared by the PolyNorm and PolyReLU ops.

Coefficient layout. Checkpoints store ``weight = [a_r, ..., a_1]`` (highest power first)
and ``bias = [a_0]``, as the authors' released checkpoints do. Kernels instead take one
float32 table ``coeffs[e, p]`` = coefficient of power p (p = 0..r) for coefficient set e,
so that "power p" is an index and not a subtraction everywhere. The two conversions
below are the only place that knows both layouts.

Coefficient sets. A dense layer has one set (weight ``[r]``, bias ``[1]``). A grouped MoE
layer with per-expert coefficients has one set per local expert (weight ``[E, r]``, bias
``[E, 1]``) and a ``tokens_per_expert`` split saying which rows belong to which expert.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

TokensPerExpert = Union[torch.Tensor, Sequence[int], None]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the op's compute precision: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def coeff_table(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Storage layout -> ``[sets, r + 1]`` table indexed by power, in compute precision.

    ``bias=None`` (the gated ops without an a_0 term) gives a zero power-0 column.
    """
    if bias is None and weight.dim() in (1, 2):
        bias = weight.new_zeros(*weight.shape[:-1], 1)
    if weight.dim() not in (1, 2) or bias.shape[-1:] != (1,):
        raise ValueError(
            f"PolyCom weight must be [r] or [experts, r] and bias [1] or [experts, 1]; "
            f"got weight {tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )
    weight2 = weight.reshape(-1, weight.shape[-1])
    bias2 = bias.reshape(-1, 1)
    if weight2.shape[0] != bias2.shape[0]:
        raise ValueError(
            f"PolyCom weight has {weight2.shape[0]} coefficient sets but bias has {bias2.shape[0]}"
        )
    return upcast(torch.cat([bias2, weight2.flip(-1)], dim=-1)).contiguous()


def split_table_grad(
    table_grad: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
):
    """Gradient of the table -> gradients in storage layout and dtype (None for no bias)."""
    grad_bias = None if bias is None else table_grad[:, :1].reshape(bias.shape).to(bias.dtype)
    grad_weight = table_grad[:, 1:].flip(-1).reshape(weight.shape).to(weight.dtype)
    return grad_weight, grad_bias


def row_sets(
    tokens_per_expert: TokensPerExpert, num_sets: int, rows: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Index of the coefficient set of every row, or None when all rows share set 0.

    Rows are grouped expert-major, as Megatron's grouped experts lay out fc1's output.
    """
    if tokens_per_expert is None:
        if num_sets != 1:
            raise ValueError(
                f"{num_sets} coefficient sets were given without tokens_per_expert; "
                "pass the per-expert row counts so each row finds its expert's coefficients"
            )
        return None
    counts = torch.as_tensor(tokens_per_expert, dtype=torch.long)
    if counts.numel() != num_sets:
        raise ValueError(
            f"tokens_per_expert has {counts.numel()} entries but there are {num_sets} "
            "coefficient sets (one per local expert)"
        )
    if counts.device.type == "cpu":
        # A CPU split is cheap to check; a device split is trusted to avoid a host sync.
        total = int(counts.sum())
        if total != rows:
            raise ValueError(
                f"tokens_per_expert sums to {total} rows but the input has {rows} rows; "
                "pass the (padded) split that fc1's output was computed with"
            )
    counts = counts.to(device)
    sets = torch.arange(num_sets, device=device)
    return torch.repeat_interleave(sets, counts, output_size=rows).to(torch.int32)


def coeffs_per_row(coeffs: torch.Tensor, sets: Optional[torch.Tensor]) -> torch.Tensor:
    """``[rows or 1, r + 1]`` coefficients, broadcastable against per-row work."""
    return coeffs if sets is None else coeffs.index_select(0, sets.long())


def sum_rows_per_set(row_values: torch.Tensor, sets: Optional[torch.Tensor], num_sets: int):
    """Sum ``[rows, k]`` per coefficient set -> ``[num_sets, k]``."""
    if sets is None:
        return row_values.sum(dim=0, keepdim=True)
    out = row_values.new_zeros(num_sets, row_values.shape[1])
    return out.index_add_(0, sets.long(), row_values)


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum ``tensor`` in place across ``group`` (no-op for a group of one)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View any ``[..., n]`` tensor as contiguous ``[rows, n]``."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def glu_rows(x: torch.Tensor, op: str) -> torch.Tensor:
    """fc1's gated output ``[..., 2n]`` as contiguous ``[rows, 2n]`` (gate half, then up half)."""
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"{op} takes fc1's gated output [..., 2n] (gate half, then up half); got shape "
            f"{tuple(x.shape)}: its last dimension must be even and non-zero (fc1 must output "
            "twice the FFN hidden size, as Megatron's gated_linear_unit lays it out)"
        )
    return as_rows(x)


def gate_up(rows: torch.Tensor):
    """The gate and up halves (views) of ``[rows, 2n]``."""
    n = rows.shape[-1] // 2
    return rows[..., :n], rows[..., n:]


def horner(coeffs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per row ``sum_k coeffs[:, k] * v^k`` (``coeffs`` ``[rows or 1, K]``, K >= 1) by
    Horner's rule: one multiply-add per term, no power of ``v`` kept."""
    top = coeffs.shape[1] - 1
    out = coeffs[:, top : top + 1] * torch.ones_like(v) if top == 0 else None
    for k in range(top - 1, -1, -1):
        out = coeffs[:, k : k + 1] + (coeffs[:, top : top + 1] if out is None else out) * v
    return out


# Pieces of the fused CPU kernel sets (polynorm_cpu, polyrelu_cpu).


def halves(x, gated):
    """(gate or input, up half or None), both in compute precision."""
    if not gated:
        return upcast(x), None
    g, u = gate_up(x)
    return upcast(g), upcast(u)


def power_sums(x, g, order):
    """Per row ``[sum g x, sum g x^2, ..., sum g x^order]`` (g = None: sums of squares of
    the powers, ``sum x^(2p)``)."""
    out, power = [], x
    for p in range(order):
        out.append((power * (power if g is None else g)).sum(dim=-1))
        power = power * x
    return torch.stack(out, dim=-1)


def upstream(x, dy, gated):
    """(gate or input, the gradient reaching the activation, up half or None, dy)."""
    g, u = halves(x, gated)
    dyf = upcast(dy)
    return g, (dyf if u is None else dyf * u), u, dyf


def cpu_kernel_set(name, module_doc, gated, pieces):
    """A kernel-set class whose static methods are ``pieces`` with ``gated`` bound."""
    members = {"name": "cpu", "__doc__": module_doc}
    for piece in pieces:
        members[piece.__name__] = staticmethod(functools.partial(piece, gated=gated))
    return type(name, (), members)
