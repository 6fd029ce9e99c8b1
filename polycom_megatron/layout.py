"""Does a parallel layout divide? Checked before a job asks for GPUs.

Megatron finds most of these problems too, but only after every rank has started, and
some (a global batch that does not divide) it reports far from the knob that caused
them. ``check_layout`` returns every problem at once, each naming the knob to change
(the variable names of ``examples/``, with the Megatron flag beside them).

With ``precision="fp8"`` it also checks what Transformer Engine's FP8 GEMMs need: every
per-rank GEMM width (dense fc1/fc2 at TP, expert fc1/fc2 at ETP, attention's QKV and
projection at TP) a multiple of 16, or 32 for MXFP8, and a device that runs the recipe
(FP8 needs compute capability 8.9+, MXFP8 10.0+, i.e. not H100/H200). A width that does
not align comes with one that does and keeps the 1.5x rule
(``polycom_megatron.matched_ffn_hidden_size(..., multiple_of=...)``).

``python -m polycom_megatron.layout --world-size 16 --tp 2 ...`` is the same check for
shell scripts (the examples call it): it prints the derived sizes and exits 0, or prints
the problems and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from polycom_megatron.config import ACTIVATIONS, SWIGLU_TO_POLYCOM_WIDTH, matched_ffn_hidden_size

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
PRECISIONS = ("bf16", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell


class LayoutError(ValueError):
    """A layout that does not divide (or does not suit FP8); the message lists every problem."""


@dataclass(frozen=True)
class Layout:
    """Sizes derived from a valid layout."""

    data_parallel: int
    expert_data_parallel: int
    grad_accumulation_steps: int


def check_layout(
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    cp: int = 1,
    num_layers: int = 1,
    num_heads: int = 1,
    num_query_groups: Optional[int] = None,
    num_experts: Optional[int] = None,
    ffn_hidden_size: Optional[int] = None,
    moe_ffn_hidden_size: Optional[int] = None,
    micro_batch: int = 1,
    global_batch: int = 1,
    sequence_parallel: bool = False,
    seq_length: Optional[int] = None,
    hidden_size: Optional[int] = None,
    kv_channels: Optional[int] = None,
    activation: Optional[str] = None,
    precision: str = "bf16",
    fp8_recipe: str = "delayed",
    compute_capability: Optional[str] = None,
) -> list:
    """Every way the layout fails to divide, as messages naming the knob; [] if it is fine.

    ``etp`` (expert tensor parallel) defaults to ``tp`` as in Megatron; ``num_query_groups``
    defaults to ``num_heads`` (no grouped-query attention); ``kv_channels`` to
    ``hidden_size / num_heads``. ``activation`` ("polynorm", "polyrelu", "swiglu") only
    shapes the suggested widths. ``compute_capability`` ("9.0") is the GPU's; None reads
    it from torch when CUDA is there (see ``device_capability``).
    """
    etp = tp if etp is None else etp
    groups = num_heads if num_query_groups is None else num_query_groups
    sizes = dict(world_size=world_size, TP=tp, PP=pp, EP=ep, ETP=etp, CP=cp,
                 NUM_LAYERS=num_layers, NUM_HEADS=num_heads, NUM_QUERY_GROUPS=groups,
                 MICRO_BATCH=micro_batch, GLOBAL_BATCH=global_batch)
    optional = dict(FFN_HIDDEN=ffn_hidden_size, MOE_FFN_HIDDEN=moe_ffn_hidden_size,
                    SEQ_LEN=seq_length)
    sizes.update({name: value for name, value in optional.items() if value is not None})
    bad = [f"{name}={value} must be a positive integer" for name, value in sizes.items()
           if not isinstance(value, int) or value < 1]
    if bad:
        return bad

    problems = []

    def need(divides: bool, message: str):
        if not divides:
            problems.append(message)

    model_parallel = tp * pp * cp
    need(world_size % model_parallel == 0,
         f"world size {world_size} (NNODES x GPUS_PER_NODE) is not divisible by "
         f"TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel}")
    need(num_layers % pp == 0,
         f"NUM_LAYERS={num_layers} is not divisible by PP={pp} "
         "(--pipeline-model-parallel-size)")
    need(num_heads % tp == 0,
         f"NUM_HEADS={num_heads} is not divisible by TP={tp} (--tensor-model-parallel-size)")
    if groups != num_heads:  # grouped-query attention: TP splits the key/value groups too
        need(num_heads % groups == 0,
             f"NUM_HEADS={num_heads} is not divisible by NUM_QUERY_GROUPS={groups}")
        need(groups % tp == 0,
             f"NUM_QUERY_GROUPS={groups} is not divisible by TP={tp} "
             "(--tensor-model-parallel-size)")
    if ffn_hidden_size is not None:
        need(ffn_hidden_size % tp == 0,
             f"FFN_HIDDEN={ffn_hidden_size} is not divisible by TP={tp} "
             "(--tensor-model-parallel-size)")

    if num_experts:
        expert_parallel = etp * ep * pp
        need(world_size % expert_parallel == 0,
             f"world size {world_size} (NNODES x GPUS_PER_NODE) is not divisible by "
             f"ETP x EP x PP = {etp} x {ep} x {pp} = {expert_parallel}")
        need(num_experts % ep == 0,
             f"NUM_EXPERTS={num_experts} is not divisible by EP={ep} "
             "(--expert-model-parallel-size)")
        if moe_ffn_hidden_size is not None:
            need(moe_ffn_hidden_size % etp == 0,
                 f"MOE_FFN_HIDDEN={moe_ffn_hidden_size} is not divisible by ETP={etp} "
                 "(--expert-tensor-parallel-size)")
        # Megatron's MoELayer raises this at the first training step, not at start-up.
        need(tp == 1 or sequence_parallel,
             f"an MoE model with TP={tp} needs SP=1 (--sequence-parallel)")
    else:
        need(ep == 1, f"EP={ep} needs an MoE model (NUM_EXPERTS); set EP=1")
        need(etp == tp, f"ETP={etp} needs an MoE model (NUM_EXPERTS); leave ETP unset")

    # Megatron-LM drops --sequence-parallel with a warning when TP=1: say so up front.
    need(not sequence_parallel or tp > 1,
         f"SP=1 needs TP > 1 (sequence parallelism splits activations across TP ranks); "
         f"TP={tp}")
    if seq_length is not None:
        if cp > 1:
            need(seq_length % (2 * cp) == 0,
                 f"SEQ_LEN={seq_length} is not divisible by 2 x CP = {2 * cp} "
                 "(context parallelism splits each sequence into 2 x CP chunks)")
        if sequence_parallel:
            need(seq_length % (tp * cp) == 0,
                 f"SEQ_LEN={seq_length} is not divisible by TP x CP = {tp * cp} "
                 "(sequence parallelism splits the sequence across TP ranks)")

    if precision not in PRECISIONS:
        problems.append(f"PRECISION={precision} is not one of: {' '.join(PRECISIONS)}")
    elif precision == "fp8":
        problems += fp8_problems(
            tp=tp, etp=etp, num_heads=num_heads, num_query_groups=groups,
            hidden_size=hidden_size, kv_channels=kv_channels, activation=activation,
            ffn_hidden_size=ffn_hidden_size,
            moe_ffn_hidden_size=moe_ffn_hidden_size if num_experts else None,
            fp8_recipe=fp8_recipe, compute_capability=compute_capability,
        )

    if world_size % model_parallel == 0:
        dp = world_size // model_parallel
        need(global_batch % (micro_batch * dp) == 0,
             f"GLOBAL_BATCH={global_batch} is not divisible by MICRO_BATCH x DP = "
             f"{micro_batch} x {dp} = {micro_batch * dp} (DP = world size / (TP x PP x CP))")
    return problems


def fp8_alignment(fp8_recipe: str) -> int:
    """The multiple TE's FP8 GEMMs need in every dimension: 32 for MXFP8, else 16."""
    return 32 if fp8_recipe == "mxfp8" else 16


def device_capability(explicit: Optional[str] = None):
    """``((major, minor), where it came from)``, or ``(None, why not)``.

    An explicit value (the examples' COMPUTE_CAPABILITY) wins; else torch's view of GPU 0
    when CUDA is there (a dry run on a login node usually has none)."""
    if explicit:
        major, _, minor = str(explicit).partition(".")
        if not (major.isdigit() and (minor or "0").isdigit()):
            raise ValueError(f"COMPUTE_CAPABILITY={explicit} is not of the form 9.0")
        return (int(major), int(minor or 0)), f"COMPUTE_CAPABILITY={explicit}"
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible here"
    cc = torch.cuda.get_device_capability(0)
    return cc, f"torch.cuda ({torch.cuda.get_device_name(0)})"


def aligned_width(width: int, per_rank_multiple: int, activation: Optional[str]) -> str:
    """The next width up that splits into aligned per-rank pieces, and how to get it."""
    fixed = matched = None
    twin = round(width / SWIGLU_TO_POLYCOM_WIDTH)
    if activation in ACTIVATIONS and matched_ffn_hidden_size(twin) == width:
        fixed = matched_ffn_hidden_size(twin, multiple_of=per_rank_multiple)
        matched = (f" = polycom_megatron.matched_ffn_hidden_size({twin}, "
                   f"multiple_of={per_rank_multiple}), 1.5x the SwiGLU twin's {twin} rounded up")
    else:
        fixed = -(-width // per_rank_multiple) * per_rank_multiple
    return f"{fixed}{matched or ''}"


def fp8_problems(*, tp, etp, num_heads, num_query_groups, hidden_size, kv_channels,
                 activation, ffn_hidden_size, moe_ffn_hidden_size, fp8_recipe,
                 compute_capability) -> list:
    """What Transformer Engine's FP8 GEMMs and the device need, as messages naming knobs."""
    if fp8_recipe not in FP8_RECIPES:
        return [f"FP8_RECIPE={fp8_recipe} is not one of: {' '.join(FP8_RECIPES)}"]
    align = fp8_alignment(fp8_recipe)
    problems = []
    why = (f"FP8 GEMMs (FP8_RECIPE={fp8_recipe}) need every per-rank GEMM dimension "
           f"divisible by {align}")

    def ffn(knob, width, ranks, rank_knob):
        if width is None or width % ranks:
            return  # the divisibility rule above already names it
        if (width // ranks) % align:
            problems.append(
                f"{knob}={width} at {rank_knob}={ranks} gives {width // ranks} per rank: {why}; "
                f"use {knob}={aligned_width(width, ranks * align, activation)}")

    ffn("FFN_HIDDEN", ffn_hidden_size, tp, "TP")
    ffn("MOE_FFN_HIDDEN", moe_ffn_hidden_size, etp, "ETP")
    if hidden_size is not None:
        if hidden_size % align:
            problems.append(f"HIDDEN={hidden_size} (the input of fc1 and QKV): {why}")
        head = kv_channels or (hidden_size // num_heads if hidden_size % num_heads == 0 else None)
        if head is not None and num_heads % tp == 0 and num_query_groups % tp == 0:
            q = num_heads // tp * head
            qkv = (num_heads + 2 * num_query_groups) // tp * head
            if q % align or qkv % align:
                problems.append(
                    f"attention at TP={tp} gives per-rank widths {q} (projection) and {qkv} "
                    f"(QKV) for NUM_HEADS={num_heads}, NUM_QUERY_GROUPS={num_query_groups}, "
                    f"head dim {head}: {why}")

    cc, source = device_capability(compute_capability)
    need = MXFP8_MIN_CAPABILITY if fp8_recipe == "mxfp8" else FP8_MIN_CAPABILITY
    what = "MXFP8 (FP8_RECIPE=mxfp8)" if fp8_recipe == "mxfp8" else "FP8 (PRECISION=fp8)"
    if cc is None:
        if fp8_recipe == "mxfp8":
            problems.append(
                f"{what} needs compute capability {need[0]}.{need[1]}+ (Blackwell) and the "
                f"device is unknown ({source}): set COMPUTE_CAPABILITY (e.g. 9.0 for "
                "H100/H200, 10.0 for B200) or run where the GPU is visible")
    elif cc < need:
        other = ("; use FP8_RECIPE=tensorwise, blockwise or delayed" if fp8_recipe == "mxfp8"
                 else "; use PRECISION=bf16")
        problems.append(
            f"{what} needs compute capability {need[0]}.{need[1]}+, and this device is "
            f"{cc[0]}.{cc[1]} (from {source}){other}")
    return problems


def require_layout(**kwargs) -> Layout:
    """``check_layout`` that raises ``LayoutError`` listing every problem; else the sizes."""
    problems = check_layout(**kwargs)
    if problems:
        raise LayoutError("this layout cannot run:\n  - " + "\n  - ".join(problems))
    world = kwargs["world_size"]
    tp, pp, cp = kwargs.get("tp", 1), kwargs.get("pp", 1), kwargs.get("cp", 1)
    etp = kwargs.get("etp") or tp
    dp = world // (tp * pp * cp)
    edp = world // (etp * kwargs.get("ep", 1) * pp) if kwargs.get("num_experts") else dp
    steps = kwargs.get("global_batch", 1) // (kwargs.get("micro_batch", 1) * dp)
    return Layout(data_parallel=dp, expert_data_parallel=edp, grad_accumulation_steps=steps)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m polycom_megatron.layout",
        description="Check that a Megatron parallel layout divides.",
    )
    ints = ("world-size", "tp", "pp", "ep", "etp", "cp", "num-layers", "num-heads",
            "num-query-groups", "num-experts", "ffn-hidden-size", "moe-ffn-hidden-size",
            "micro-batch", "global-batch", "seq-length")
    required = {"world-size", "num-layers", "num-heads", "micro-batch", "global-batch"}
    for name in ints:
        parser.add_argument(f"--{name}", type=int, required=name in required)
    parser.add_argument("--sequence-parallel", type=int, choices=(0, 1), default=0)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--kv-channels", type=int)
    parser.add_argument("--activation")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--fp8-recipe", default="delayed")
    parser.add_argument("--compute-capability",
                        help="the GPU's, e.g. 9.0 (default: from torch when CUDA is there)")
    return parser


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    args["sequence_parallel"] = bool(args["sequence_parallel"])
    for name in ("tp", "pp", "ep", "cp"):
        args[name] = 1 if args[name] is None else args[name]
    if not args["num_experts"]:
        args["num_experts"] = None
    try:
        layout = require_layout(**args)
    except (LayoutError, ValueError) as error:
        print(f"layout check failed: {error}", file=sys.stderr)
        return 1
    print(f"layout ok: DP={layout.data_parallel} expert-DP={layout.expert_data_parallel} "
          f"gradient-accumulation steps={layout.grad_accumulation_steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
