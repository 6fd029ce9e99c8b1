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
import gc
import math
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from polycom_megatron.bench import parse_choices
from polycom_megatron.bench import flops as F
from polycom_megatron.config import matched_ffn_hidden_size

POLYCOM = ("polyrelu", "polynorm", "polyrelu-glu", "polynorm-glu")
SECTIONS = ("mlp", "moe", "model")
KERNEL_CHOICES = ("torch", "compile", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = 1234


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
        ffn = self.swiglu_ffn
        if activation != "swiglu":
            ffn = matched_ffn_hidden_size(ffn, gated=activation in F.GATED)
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


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="polycom-megatron bench",
        description="Layer and training-step throughput of PolyCom vs SwiGLU/GELU (Megatron-Core).",
    )
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shapes: paper (default on CUDA), cpu (default on CPU), smoke")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration before the rounds (default 2, CUDA 3)")
    p.add_argument("--sample-time", type=float, default=None,
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
                   "torch,compile,triton (default: all on CUDA; torch,compile on CPU)")
    p.add_argument("--model-kernel", default="auto",
                   help="PolyCom kernel in the model section "
                   "(default auto: triton on CUDA, torch on CPU)")
    p.add_argument("--layers", default=None,
                   help="layers of the models: N for both or DENSE,MOE (default: the preset's, "
                   "scaled down on CUDA when the models would not fit)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--te", choices=("auto", "on", "off"), default="auto",
                   help="Transformer Engine spec (auto: on CUDA when it imports)")
    p.add_argument("--recompute", choices=("auto", "selective", "none"), default="auto",
                   help="activation recompute in the models (auto: selective on CUDA, the paper's)")
    p.add_argument("--out-dir", default=None,
                   help="default bench/results/<time>-<device> on CUDA, "
                   "runs/bench/<time>-cpu on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds, 1 warmup (tests)")
    return p.parse_args(argv)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {device}: only cuda and cpu are supported")
    if device.type == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu: CUDA is present, and Megatron-Core's CPU shim refuses to "
                         "run next to it; benchmark on the GPU instead")
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
        kernels = KERNEL_CHOICES if cuda else ("torch", "compile")
        if not cuda:
            notes.append("triton kernels skipped on CPU (they run there only under "
                         "TRITON_INTERPRET=1, far too slowly to time); pass --kernels to force")
    if args.model_kernel not in ("auto",) + KERNEL_CHOICES:
        raise SystemExit(f"--model-kernel: choose auto or one of {', '.join(KERNEL_CHOICES)}")

    layers = None
    if args.layers:
        try:
            parts = [int(x) for x in args.layers.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or min(parts) < 1:
            raise SystemExit("--layers: N or DENSE,MOE, positive integers")
        layers = (parts[0], parts[-1])

    use_te = args.te == "on" or (args.te == "auto" and cuda and _te_available())
    if use_te and not cuda:
        raise SystemExit("--te on needs CUDA")
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

    return Settings(
        device=device,
        dtype=dtype,
        preset=preset,
        seq_length=args.seq_len or preset.seq_length,
        micro_batch=args.micro_batch or preset.micro_batch,
        rounds=args.rounds or (2 if args.smoke else 5),
        warmup=max(1, args.warmup if args.warmup is not None else default_warmup),
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
        raise SystemExit("the benchmark runs as a single process; launch it without torchrun")
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


# --------------------------------------------------------------------------- memory


class CudaMemory:
    method = "CUDA memory_allocated / max_memory_allocated (bytes held by tensors)"

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def _malloc_trim() -> None:
    """Hand glibc's free pages back to the OS, so that RSS tracks live tensors; without it
    freed blocks are reused silently and a step's growth hides inside old pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssMemory:
    """Process RSS; the kernel's high-water mark can be reset by writing 5 to clear_refs."""

    method = ("CPU: process RSS (VmRSS in /proc/self/status) after glibc malloc_trim; peak = "
              "VmHWM after resetting it via /proc/self/clear_refs; approximate (page-granular, "
              "includes allocator slack)")

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    @classmethod
    def usable(cls) -> bool:
        try:
            cls._read("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def current(self) -> int:
        _malloc_trim()
        return self._read("VmRSS")

    def reset_peak(self) -> None:
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return self._read("VmHWM")


class MaxRssMemory:
    method = ("resource.getrusage ru_maxrss: the process-lifetime peak, which cannot be reset, "
              "so a step's peak shows only when it exceeds every earlier one")

    def current(self) -> int:
        return RssMemory._read("VmRSS") if os.path.exists("/proc/self/status") else self.peak()

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_probe(device: torch.device):
    if device.type == "cuda":
        return CudaMemory(device)
    return RssMemory() if RssMemory.usable() else MaxRssMemory()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- configurations


@dataclass
class Case:
    """One configuration to time. ``build`` returns the step function (or raises: the
    configuration is then reported unavailable with the reason)."""

    section: str  # mlp, moe, dense-model, moe-model
    activation: str
    kernel: Optional[str]  # PolyCom kernel; None for SwiGLU/GELU
    shape: F.ModelShape
    tokens_per_step: int
    flops_per_token: float  # training FLOPs (3 x forward) per token
    build: Callable[[], Callable[[], None]] = field(repr=False)
    params: int = 0
    unavailable: Optional[str] = None
    seconds: List[float] = field(default_factory=list)  # per step, one entry per round
    resident_bytes: Optional[int] = None
    step_peak_bytes: Optional[int] = None
    step: Optional[Callable[[], None]] = field(default=None, repr=False)
    repeats: int = 1

    @property
    def name(self) -> str:
        return self.activation if self.kernel is None else f"{self.activation}[{self.kernel}]"


def transformer_config(shape: F.ModelShape, s: Settings):
    import torch.nn.functional as tF
    from megatron.core.transformer.transformer_config import TransformerConfig

    swiglu = shape.activation == "swiglu"
    fields_ = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gated_linear_unit=shape.activation in F.GATED,
        activation_func=tF.silu if swiglu else tF.gelu,
        # SwiGLU gets Megatron's fused kernel on GPU, as a real run would. Megatron fuses
        # GELU only together with a bias, which these models do not have, so GELU runs
        # unfused; PolyCom refuses bias fusion (it has its own kernels).
        bias_activation_fusion=swiglu and s.cuda,
        params_dtype=s.dtype,
        pipeline_dtype=s.dtype,
        bf16=s.dtype == torch.bfloat16,
        use_cpu_initialization=not s.cuda,
    )
    if shape.is_moe:
        fields_.update(
            num_moe_experts=shape.num_experts,
            moe_router_topk=shape.moe_router_topk,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            # gloo cannot run the alltoall dispatcher (see cpu.py); one GPU can.
            moe_token_dispatcher_type="alltoall" if s.cuda else "allgather",
            moe_grouped_gemm=s.use_te,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,  # the paper's MoE run
            moe_z_loss_coeff=1e-3,
        )
    if s.recompute:
        fields_.update(recompute_granularity="selective")
    return TransformerConfig(**fields_)


def polycom_config(activation: str, kernel: str):
    from polycom_megatron.config import PolyComConfig

    if activation not in POLYCOM:
        return None
    base, _, glu = activation.partition("-")
    return PolyComConfig(activation=base, kernel=kernel, gated=glu == "glu")


def _ffn_spec(config, polycom, s: Settings):
    """The FFN (MLP or MoE layer) spec of one decoder layer, built the way the model builds it."""
    from megatron.core.models.gpt import gpt_layer_specs

    from polycom_megatron.specs import get_gpt_block_spec, with_local_norms

    if polycom is None:
        block = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=s.use_te, normalization=config.normalization
        )
        if not s.use_te:
            block = with_local_norms(block)
    else:
        block = get_gpt_block_spec(config, polycom, use_te=s.use_te)
    return block.layer_specs[0].submodules.mlp


def _kernel_unavailable(kernel: str, s: Settings) -> Optional[str]:
    if kernel != "triton":
        return None
    from polycom_megatron.ops import dispatch

    if not dispatch.triton_available():
        return "Triton is not installed"
    if not s.cuda and not _triton_interpreted():
        return "Triton runs on CPU only under TRITON_INTERPRET=1"
    return None


def _resolve_kernel(choice: str, s: Settings) -> str:
    from polycom_megatron.ops import dispatch

    try:
        return dispatch.resolve(choice, s.device)
    except RuntimeError:  # triton asked for but missing: _kernel_unavailable says so
        return choice


def layer_cases(section: str, s: Settings) -> List[Case]:
    """mlp: one FFN of the dense config; moe: one MoE layer of the MoE config."""
    gpt = s.preset.dense if section == "mlp" else s.preset.moe
    cases = []
    for activation in s.layer_activations:
        kernels = s.kernels if activation in POLYCOM else (None,)
        for kernel in kernels:
            shape = gpt.shape(activation, s.seq_length, num_layers=1)
            case = Case(
                section=section,
                activation=activation,
                kernel=kernel,
                shape=shape,
                tokens_per_step=s.tokens,
                flops_per_token=F.training_flops(F.ffn_flops(shape)).total,
                build=lambda shape=shape, kernel=kernel: _build_layer(shape, kernel, s),
            )
            case.unavailable = kernel and _kernel_unavailable(kernel, s)
            cases.append(case)
    return cases


def _build_layer(shape: F.ModelShape, kernel: Optional[str], s: Settings):
    from megatron.core.transformer.spec_utils import build_module

    config = transformer_config(shape, s)
    spec = _ffn_spec(config, polycom_config(shape.activation, kernel or "auto"), s)
    torch.manual_seed(SEED)
    module = build_module(spec, config=config).to(s.device)
    if hasattr(module, "set_layer_number"):  # MoE: the aux-loss tracker files by layer
        module.set_layer_number(1)
    module.train()
    g = torch.Generator(device=s.device).manual_seed(SEED)
    x = torch.randn(s.seq_length, s.micro_batch, shape.hidden_size, device=s.device,
                    dtype=s.dtype, generator=g).requires_grad_(True)
    grad = torch.randn(x.shape, device=s.device, dtype=s.dtype, generator=g)
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out, _ = module(x)
        out.backward(grad)

    step.params = sum(p.numel() for p in params)
    step.owner = module  # keeps the module alive as long as the step
    return step


def model_cases(kind: str, s: Settings, num_layers: int) -> List[Case]:
    gpt = s.preset.dense if kind == "dense" else s.preset.moe
    cases = []
    for activation in s.model_activations:
        # Named by what "auto" resolves to here, so the table says which kernel ran.
        kernel = _resolve_kernel(s.model_kernel, s) if activation in POLYCOM else None
        shape = gpt.shape(activation, s.seq_length, num_layers=num_layers)
        case = Case(
            section=f"{kind}-model",
            activation=activation,
            kernel=kernel,
            shape=shape,
            tokens_per_step=s.tokens,
            flops_per_token=F.training_flops(F.model_flops(shape, causal=True)).total,
            build=lambda shape=shape, kernel=kernel: _build_training_step(shape, kernel, s),
        )
        case.unavailable = kernel and _kernel_unavailable(kernel, s)
        cases.append(case)
    return cases


def _build_training_step(shape: F.ModelShape, kernel: Optional[str], s: Settings):
    """GPTModel + Megatron DDP + Megatron optimizer, and one full training step over them."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from polycom_megatron.model import build_gpt_model

    config = transformer_config(shape, s)
    torch.manual_seed(SEED)
    model = build_gpt_model(
        config,
        polycom_config(shape.activation, kernel or "auto"),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        use_te=s.use_te,
    )
    model = model.to(s.device)  # Megatron's get_model does the same (norms start on CPU)
    if config.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-4,
            weight_decay=0.1,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=config.bf16,
            params_dtype=s.dtype,
        ),
        [ddp],
    )
    g = torch.Generator(device=s.device).manual_seed(SEED)
    tokens = torch.randint(0, shape.vocab_size, (s.micro_batch, s.seq_length + 1),
                           device=s.device, generator=g)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(s.seq_length, device=s.device).unsqueeze(0).expand_as(inputs)
    # TE builds its causal mask itself. Megatron's local attention would build a default one
    # on "cuda" by name, also when recomputing in backward, where the CPU shim cannot reach.
    mask = None if s.use_te else torch.ones(
        1, 1, s.seq_length, s.seq_length, dtype=torch.bool, device=s.device
    ).triu(diagonal=1)

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = ddp(inputs, position_ids, mask, labels=labels)
        losses.float().mean().backward()
        finalize_model_grads([ddp])
        optimizer.step()

    step.params = sum(p.numel() for p in model.parameters())
    step.owner = (ddp, optimizer)
    return step


# --------------------------------------------------------------------------- fitting on one GPU


def estimate_model_bytes(shape: F.ModelShape, s: Settings, num_layers: int) -> Tuple[float, float]:
    """(resident, step) bytes of one model: resident = weights, fp32 grads, optimizer state;
    step = saved activations and logits of one micro-batch. Deliberately generous."""
    h, v = shape.hidden_size, shape.vocab_size
    gated = 2 if shape.activation in F.GATED else 1
    attn_params = 4 * h * h
    if shape.is_moe:
        f, k = shape.moe_ffn_hidden_size, shape.moe_router_topk
        ffn_params = shape.num_experts * (gated + 1) * h * f + h * shape.num_experts
        ffn_act = k * ((gated + 1) * f + 3 * h)  # fc1 out, act out, permuted copies
    else:
        f = shape.ffn_hidden_size
        ffn_params = (gated + 1) * h * f
        ffn_act = (gated + 1) * f
    elem = torch.tensor([], dtype=s.dtype).element_size()
    # bf16: 2 weight + 4 fp32 grad + 4 fp32 main copy + 8 Adam; fp32: 4 + 4 + 8.
    per_param = 18 if elem == 2 else 16
    resident = per_param * (2 * h * v + num_layers * (attn_params + ffn_params))
    per_layer_act = 10 * h + ffn_act
    if not s.recompute and not s.use_te:
        per_layer_act += 3 * shape.num_attention_heads * shape.seq_length  # S x S scores
    step = s.tokens * (elem * per_layer_act * num_layers * 1.2 + 12 * v)
    return resident, step


def fit_layers(gpt: GptPreset, s: Settings, kind: str) -> int:
    """The preset's layer count, or fewer when all models of the section (kept resident to
    interleave them) would not fit in the free GPU memory."""
    if s.layers:
        return s.layers[0] if kind == "dense" else s.layers[1]
    if not s.cuda:
        return gpt.num_layers
    free_memory(s.device)
    free, _ = torch.cuda.mem_get_info(s.device)
    budget = 0.85 * free - 2e9  # workspaces, allocator slack
    shapes = [gpt.shape(a, s.seq_length) for a in s.model_activations]

    def need(layers):
        sizes = [estimate_model_bytes(sh, s, layers) for sh in shapes]
        return sum(r for r, _ in sizes) + max(st for _, st in sizes)

    layers = gpt.num_layers
    while layers > 1 and need(layers) > budget:
        layers -= 1
    if layers < gpt.num_layers:
        s.notes.append(
            f"{kind} model scaled from {gpt.num_layers} to {layers} layers so that its "
            f"{len(shapes)} configurations fit together on one device "
            f"(estimate {need(layers) / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free); "
            "pass --layers to choose"
        )
    return layers


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
        case.step = case.build()
        case.params = case.step.params
        for _ in range(s.warmup):
            case.step()
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


def run_rounds(cases: List[Case], s: Settings) -> None:
    """A B C, A B C, ...: every round times each live configuration once."""
    for _ in range(s.rounds):
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


def run_section(cases: List[Case], s: Settings, probe, label: str) -> List[Case]:
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
    run_rounds(cases, s)
    elapsed = time.perf_counter() - t0
    print(f"[{label}] {s.rounds} interleaved rounds in {elapsed:.1f} s", flush=True)
    for case in cases:
        case.step = None  # free the models before the next section
    free_memory(s.device)
    return cases


def measure_peak_flops(s: Settings) -> dict:
    """Peak FLOP/s as this device reaches it: the best of several timed square matmuls.
    The best, not the median: contention only ever slows a sample down."""
    n = s.peak_matmul_size
    g = torch.Generator(device=s.device).manual_seed(SEED)
    a = torch.randn(n, n, device=s.device, dtype=s.dtype, generator=g)
    b = torch.randn(n, n, device=s.device, dtype=s.dtype, generator=g)
    for _ in range(3):
        a @ b
    _sync(s.device)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        reps = 10 if s.cuda else 1
        for _ in range(reps):
            a @ b
        _sync(s.device)
        times.append((time.perf_counter() - start) / reps)
    work = 2.0 * n**3
    return dict(flops_per_s=work / min(times), median_flops_per_s=work / statistics.median(times),
                matmul=f"[{n}x{n}] @ [{n}x{n}]", dtype=str(s.dtype).replace("torch.", ""),
                samples=len(times), threads=torch.get_num_threads())


def best_peak(first: dict, second: dict) -> dict:
    """Peak measured at the start and at the end of the run; the higher one is kept."""
    best = dict(max(first, second, key=lambda p: p["flops_per_s"]))
    best["measured_at_start_and_end"] = [first["flops_per_s"], second["flops_per_s"]]
    return best


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    from polycom_megatron.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = resolve_settings(args)
    wall = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    created = init_single_process(s.device)
    try:
        probe = memory_probe(s.device)
        peak = measure_peak_flops(s)
        print(f"device {report.device_name(s.device)}, {str(s.dtype).replace('torch.', '')}; peak "
              f"{peak['flops_per_s'] / 1e12:.3f} TFLOP/s measured ({peak['matmul']} matmul, best "
              f"of {peak['samples']}, {peak['threads']} threads; measured again at the end)",
              flush=True)
        cases: List[Case] = []
        for section in s.sections:
            if section in ("mlp", "moe"):
                cases += run_section(layer_cases(section, s), s, probe, f"{section} layer")
            else:
                for kind in ("dense", "moe"):
                    gpt = s.preset.dense if kind == "dense" else s.preset.moe
                    layers = fit_layers(gpt, s, kind)
                    cases += run_section(model_cases(kind, s, layers), s, probe, f"{kind} model")
        peak = best_peak(peak, measure_peak_flops(s))
        if not s.cuda:
            s.notes.append("CPU run: the models are tiny stand-ins; the timings check the "
                           "pipeline, they say little about GPU throughput")
        payload = report.build_payload(cases, s, peak, probe.method, argv,
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
