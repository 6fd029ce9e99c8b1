"""``polycom-megatron bench``: training throughput of PolyCom vs SwiGLU/GELU in Megatron-Core.

Three sections, run one after another in one process; within a section every configuration
is timed interleaved (A B C A B C ...) over several rounds so that drift (clocks, thermals,
other tenants) hits all of them alike, and medians are reported. Warmup is excluded.

- mlp:   one FFN layer of the dense config, forward + backward, per activation and kernel;
- moe:   one MoE layer of the MoE config (router, dispatch, experts, combine), fwd + bwd;
- model: a real training step (forward, backward, Megatron DDP gradient finalisation and
         optimizer step) of the dense and of the MoE GPT, with MFU.

Matched parameters (the paper's rule): SwiGLU keeps the preset width f; GELU, PolyReLU and
PolyNorm get ``matched_ffn_hidden_size(f)`` = 1.5 f; the gated PolyReLU-GLU and PolyNorm-GLU
(``--polycom-gated``) keep f, like SwiGLU. Sections free their models before the
next one starts; numbers are only compared within a section.

    polycom-megatron bench                   # CUDA: paper shapes, bf16; CPU: tiny stand-ins
    polycom-megatron bench --only model --activations swiglu,polynorm --layers 24,4
    polycom-megatron bench --smoke           # seconds, for tests

MFU uses the FLOP count of ``flops.py`` over a peak measured here with a matmul on the same
device and dtype. Memory per configuration: on CUDA from the caching allocator's counters;
on CPU from the process RSS and its resettable high-water mark (see ``RssMemory``). Output:
a table on stdout, ``throughput.json`` and ``throughput.png`` (``report.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from polycom_megatron.bench import parse_choices, resolve_device
from polycom_megatron.bench import flops as F
from polycom_megatron.bench.cases import (
    POLYCOM,  # noqa: F401 (part of this module's interface)
    SEED,
    Case,
    fit_layers,
    layer_cases,
    model_cases,
)
from polycom_megatron.bench.memory import free_memory, memory_probe
from polycom_megatron.bench.peak import PeakMeter
from polycom_megatron.cli_types import (
    OneLineErrorParser,
    int_list,
    non_negative_float,
    positive_int,
    prepare_output_dir,
    writable_dir,
)
from polycom_megatron.variants import ffn_width

SECTIONS = ("mlp", "moe", "model")
KERNEL_CHOICES = ("auto", "torch", "compile", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class GptPreset:
    """A GPT in SwiGLU widths; ``shape()`` gives any activation its matched widths."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    swiglu_ffn: int
    vocab_size: int
    num_experts: Optional[int] = None
    top_k: int = 0

    def shape(self, activation: str, seq_length: int, num_layers: Optional[int] = None):
        ffn = ffn_width(activation, self.swiglu_ffn)
        return F.ModelShape(
            num_layers=num_layers or self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            # A pure-MoE model never builds a dense FFN, but TransformerConfig wants a width.
            ffn_hidden_size=ffn,
            vocab_size=self.vocab_size,
            seq_length=seq_length,
            activation=activation,
            num_experts=self.num_experts,
            moe_router_topk=self.top_k,
            moe_ffn_hidden_size=ffn if self.num_experts else None,
        )


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dense: GptPreset
    moe: GptPreset
    seq_length: int
    micro_batch: int


PRESETS = {
    # From anchors: dense 1B (Llama-style) and MoE 1B/7B (OLMoE-style). The vocabularies are
    # our assumption (Llama's 32000, OLMoE's padded 50304): the configs do not fix them.
    "paper": Preset(
        "paper",
        "the paper's dense 1B and MoE 1B-active/7B-total shapes",
        dense=GptPreset(24, 2048, 16, 5504, 32000),
        moe=GptPreset(16, 2048, 16, 1024, 50304, num_experts=64, top_k=8),
        seq_length=4096,
        micro_batch=2,
    ),
    # Same proportions (FFN 2.6875 h, experts f = h/2), sized for a 2-core CPU.
    "cpu": Preset(
        "cpu",
        "tiny scaled-down models for CPU, NOT the paper's shapes",
        dense=GptPreset(2, 512, 8, 1376, 8192),
        moe=GptPreset(2, 512, 8, 256, 8192, num_experts=8, top_k=2),
        seq_length=256,
        micro_batch=2,
    ),
    "smoke": Preset(
        "smoke",
        "smoke-test shapes, numbers mean nothing",
        dense=GptPreset(2, 64, 4, 128, 256),
        moe=GptPreset(2, 64, 4, 64, 256, num_experts=4, top_k=2),
        seq_length=32,
        micro_batch=2,
    ),
}


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    preset: Preset
    seq_length: int
    micro_batch: int
    rounds: int
    warmup: int
    sample_time: float  # a sample repeats the step until this many seconds have passed
    sections: Tuple[str, ...]
    layer_activations: Tuple[str, ...]
    model_activations: Tuple[str, ...]
    kernels: Tuple[str, ...]
    model_kernel: str
    layers: Optional[Tuple[int, int]]  # (dense, moe) forced by --layers
    use_te: bool
    recompute: bool
    out_dir: Path
    peak_matmul_size: int
    notes: List[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def layer_counts(text: str) -> Tuple[int, int]:
    """``--layers``: N for both models or DENSE,MOE."""
    parts = int_list(text)
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or DENSE,MOE")
    return parts[0], parts[-1]


def parse_args(argv) -> argparse.Namespace:
    p = OneLineErrorParser(
        prog="polycom-megatron bench",
        description="Layer and training-step throughput of PolyCom vs SwiGLU/GELU (Megatron-Core).",
    )
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shapes: paper (default on CUDA), cpu (default on CPU), smoke")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="interleaved rounds (default 5; smoke 2)")
    p.add_argument("--warmup", type=positive_int, default=None,
                   help="untimed steps per configuration before the rounds, at least 1: the "
                   "first step compiles and allocates (default 2, CUDA 3, smoke 1)")
    p.add_argument("--sample-time", type=non_negative_float, default=None,
                   help="seconds one sample repeats a step for "
                   "(default CUDA 0.5, CPU 0.3, smoke 0)")
    p.add_argument("--only", choices=SECTIONS, action="append", default=None,
                   help="run only this section (repeatable); default all")
    p.add_argument("--activations", default=None,
                   help="comma list of swiglu,gelu,polyrelu,polynorm,polyrelu-glu,polynorm-glu "
                   "(default: all for the layers, swiglu,polyrelu,polynorm,polynorm-glu for the "
                   "models)")
    p.add_argument("--kernels", default=None,
                   help="PolyCom kernels for the layer sections, comma list of "
                   "auto,torch,compile,triton (default: torch,compile,triton on CUDA; "
                   "torch,compile,auto on CPU)")
    p.add_argument("--model-kernel", choices=KERNEL_CHOICES, default="auto",
                   help="PolyCom kernel in the model section (default auto: triton on CUDA, "
                   "the compiled CPU kernels on CPU)")
    p.add_argument("--layers", type=layer_counts, default=None,
                   help="layers of the models: N for both or DENSE,MOE (default: the preset's, "
                   "scaled down on CUDA when the models would not fit)")
    p.add_argument("--seq-len", type=positive_int, default=None)
    p.add_argument("--micro-batch", type=positive_int, default=None)
    p.add_argument("--te", choices=("auto", "on", "off"), default="auto",
                   help="Transformer Engine spec (auto: on CUDA when it imports)")
    p.add_argument("--recompute", choices=("auto", "selective", "none"), default="auto",
                   help="activation recompute in the models (auto: selective on CUDA, the paper's)")
    p.add_argument("--out-dir", type=writable_dir, default=None,
                   help="default bench/results/<time>-<device> on CUDA, "
                   "runs/bench/<time>-cpu on CPU")
    p.add_argument("--overwrite", action="store_true",
                   help="replace throughput.json/.png already in --out-dir")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds, 1 warmup (tests)")
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device, "bench")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if device.type == "cpu" and torch.cuda.is_available():
        raise SystemExit("polycom-megatron bench: --device cpu: CUDA is present, and "
                         "Megatron-Core's CPU shim refuses to run next to it; benchmark on the "
                         "GPU instead")
    notes = []
    preset = PRESETS[args.preset or ("smoke" if args.smoke else "paper" if cuda else "cpu")]
    notes.append(f"shapes: preset '{preset.name}' ({preset.description})")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]

    acts = parse_choices(args.activations, F.ACTIVATIONS, "activations")
    layer_acts = acts or F.ACTIVATIONS
    # GELU is a layer-level reference; the model comparison is PolyCom vs SwiGLU unless asked.
    model_acts = acts or ("swiglu", "polyrelu", "polynorm", "polynorm-glu")

    kernels = parse_choices(args.kernels, KERNEL_CHOICES, "kernels")
    if kernels is None:
        kernels = ("torch", "compile", "triton") if cuda else ("torch", "compile", "auto")
        if not cuda:
            notes.append("triton kernels skipped on CPU (they run there only under "
                         "TRITON_INTERPRET=1, far too slowly to time); pass --kernels to force")
    layers = args.layers
    use_te = args.te == "on" or (args.te == "auto" and cuda and _te_available())
    if use_te and not cuda:
        raise SystemExit("polycom-megatron bench: --te on needs CUDA; pass --te off on CPU")
    if cuda and not use_te:
        notes.append("Transformer Engine not used: local Megatron spec (unfused attention)")
    recompute = args.recompute == "selective" or (args.recompute == "auto" and cuda)
    if recompute:
        notes.append("selective recompute (core attention) in the models, as in the paper; "
                     "MFU counts model FLOPs, not the recomputation")

    default_warmup = 1 if args.smoke else 3 if cuda else 2
    sample_time = args.sample_time
    if sample_time is None:
        sample_time = 0.0 if args.smoke else 0.5 if cuda else 0.3
    if args.out_dir:
        out_dir = Path(args.out_dir)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        # CPU runs are checks, not results: keep them out of bench/results (runs/ is ignored).
        root = Path("bench/results") if cuda else Path("runs/bench")
        out_dir = root / f"{stamp}-{_device_slug(device)}"
    check_out_dir(out_dir, args.overwrite)

    return Settings(
        device=device,
        dtype=dtype,
        preset=preset,
        seq_length=args.seq_len or preset.seq_length,
        micro_batch=args.micro_batch or preset.micro_batch,
        rounds=args.rounds if args.rounds is not None else 2 if args.smoke else 5,
        warmup=args.warmup if args.warmup is not None else default_warmup,
        sample_time=sample_time,
        sections=tuple(x for x in SECTIONS if x in (args.only or SECTIONS)),
        layer_activations=layer_acts,
        model_activations=model_acts,
        kernels=kernels,
        model_kernel=args.model_kernel,
        layers=layers,
        use_te=use_te,
        recompute=recompute,
        out_dir=out_dir,
        peak_matmul_size=256 if args.smoke else 8192 if cuda else 2048,
        notes=notes,
    )


OUTPUT_FILES = ("throughput.json", "throughput.png")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the results can be written there, and replace nothing unasked."""
    present = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if present and not overwrite:
        raise SystemExit(f"polycom-megatron bench: {out_dir} already holds {', '.join(present)}; "
                         "pass --overwrite to replace them or choose another --out-dir")
    try:
        prepare_output_dir(out_dir)
    except ValueError as exc:
        raise SystemExit(f"polycom-megatron bench: --out-dir: {exc}") from None


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------- process setup


def init_single_process(device: torch.device) -> bool:
    """One rank, TP = PP = EP = 1. Returns whether we created the process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device.type == "cpu":
        from polycom_megatron import cpu

        cpu.enable()
    else:
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        # An in-process store: no port to pick, nothing to collide with.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
        )
        created = True
    elif dist.get_world_size() != 1:
        raise SystemExit("polycom-megatron bench: the benchmark runs as a single process; "
                         "launch it without torchrun")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(SEED)
    return created


def shutdown(created: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(case: Case, s: Settings, probe) -> None:
    """Build, warm up (compilation, autotuning, optimizer state), measure memory in one
    untimed step, and size the sample. Memory is never probed inside timed samples: on CPU
    the probe returns pages to the OS, which the next step would pay for in page faults."""
    if case.unavailable:
        return
    free_memory(s.device)
    before = probe.current()
    try:
        start = time.perf_counter()
        case.step = case.build()
        case.params = case.step.params
        for number in range(s.warmup):
            case.step()
            if not number:  # start-up: building, first allocations, compiling
                _sync(s.device)
                case.first_step_s = time.perf_counter() - start
        resident = probe.current()
        probe.reset_peak()
        case.step()
        case.step_peak_bytes = max(0, probe.peak() - resident)
        case.resident_bytes = max(0, resident - before)
        _sync(s.device)
        start = time.perf_counter()
        case.step()
        _sync(s.device)
        once = time.perf_counter() - start
    except Exception as exc:  # reported, not fatal: one configuration must not sink the run
        case.unavailable = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        case.step = None
    if case.unavailable:
        free_memory(s.device)  # here, once the traceback no longer holds the model's tensors
        return
    case.repeats = max(1, math.ceil(s.sample_time / max(once, 1e-6)))


# Peak samples: at the start and the end, and after every round (see peak.py).
PEAK_SAMPLES_EDGE, PEAK_SAMPLES_ROUND = 7, 2


def run_rounds(cases: List[Case], s: Settings, peak: Optional[PeakMeter] = None,
               label: str = "") -> None:
    """A B C, A B C, ...: every round times each live configuration once; the peak is
    sampled again after each round, under the same conditions as the runs."""
    for number in range(s.rounds):
        if peak is not None and number:
            peak.measure(PEAK_SAMPLES_ROUND, f"{label}, after round {number}")
        for case in cases:
            if case.step is None:
                continue
            try:
                _sync(s.device)
                start = time.perf_counter()
                for _ in range(case.repeats):
                    case.step()
                _sync(s.device)
                elapsed = time.perf_counter() - start
            except Exception as exc:
                case.unavailable = f"failed while timed: {type(exc).__name__}: {exc}"[:300]
                case.step = None
                case.seconds.clear()
            if case.unavailable:
                free_memory(s.device)
                continue
            case.seconds.append(elapsed / case.repeats)


def run_section(cases: List[Case], s: Settings, probe, label: str,
                peak: Optional[PeakMeter] = None) -> List[Case]:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    # Megatron's MoE aux-loss log is a global sized by the first model's layer count;
    # each section brings models of another depth.
    get_moe_layer_wise_logging_tracker().clear()
    print(f"[{label}] building and warming up {len(cases)} configurations", flush=True)
    for case in cases:
        prepare(case, s, probe)
        state = f"{case.repeats} step(s) per sample"
        if case.unavailable:
            state = "unavailable: " + case.unavailable
        print(f"  {case.name:<20} {state}", flush=True)
    t0 = time.perf_counter()
    run_rounds(cases, s, peak, label)
    if peak is not None:
        peak.measure(PEAK_SAMPLES_ROUND, f"{label}, after round {s.rounds}")
    elapsed = time.perf_counter() - t0
    print(f"[{label}] {s.rounds} interleaved rounds in {elapsed:.1f} s", flush=True)
    for case in cases:
        case.step = None  # free the models before the next section
    free_memory(s.device)
    return cases


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    """``polycom-megatron bench``: 0 when at least one configuration was measured."""
    from polycom_megatron.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = resolve_settings(args)
    wall = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    created = init_single_process(s.device)
    try:
        probe = memory_probe(s.device)
        peak = PeakMeter(s.device, s.dtype, s.peak_matmul_size)
        first = peak.measure(PEAK_SAMPLES_EDGE, "start")
        print(f"device {report.device_name(s.device)}, {str(s.dtype).replace('torch.', '')}; peak "
              f"{first / 1e12:.3f} TFLOP/s measured ({peak.result()['matmul']} matmul, best "
              f"of {PEAK_SAMPLES_EDGE}, {torch.get_num_threads()} threads; sampled again "
              "between rounds and at the end, the best is kept)", flush=True)
        cases: List[Case] = []
        for section in s.sections:
            if section in ("mlp", "moe"):
                cases += run_section(layer_cases(section, s), s, probe, f"{section} layer", peak)
            else:
                for kind in ("dense", "moe"):
                    gpt = s.preset.dense if kind == "dense" else s.preset.moe
                    layers = fit_layers(gpt, s, kind)
                    cases += run_section(model_cases(kind, s, layers), s, probe,
                                         f"{kind} model", peak)
        peak.measure(PEAK_SAMPLES_EDGE, "end")
        if not s.cuda:
            s.notes.append("CPU run: the models are tiny stand-ins; the timings check the "
                           "pipeline, they say little about GPU throughput")
        payload = report.build_payload(cases, s, peak.result(), probe.method, argv,
                                       wall_s=time.perf_counter() - wall)
        payload["environment"]["load_average_1min_at_start"] = load_at_start
        s.out_dir.mkdir(parents=True, exist_ok=True)
        print()
        print(report.format_table(payload))
        json_path = report.write_json(payload, s.out_dir / "throughput.json")
        png_path = report.write_chart(payload, s.out_dir / "throughput.png")
        print(f"\nwrote {json_path}")
        print(f"wrote {png_path}" if png_path else "chart skipped: matplotlib is not installed "
              "(pip install 'polycom-megatron[bench]')")
        print(f"total wall time {time.perf_counter() - wall:.1f} s")
    finally:
        shutdown(created)
    if not any(c["tokens_per_s"] for c in payload["cases"]):
        raise SystemExit("polycom-megatron bench: no configuration could be measured (see the "
                         "reasons in the table above)")
    return 0


def settings_dict(s: Settings) -> dict:
    """Settings as plain JSON values."""
    out = {}
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, (torch.device, torch.dtype, Path)):
            value = str(value).replace("torch.", "")
        elif isinstance(value, Preset):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
