"""The configurations ``polycom-megatron bench`` times: one FFN or MoE layer, or a full
training step of a GPT, per activation and kernel, each built the way a real run builds it
(Megatron-Core specs, DDP, optimizer); and how many layers fit on one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import torch

from polycom_megatron.bench import flops as F
from polycom_megatron.bench.memory import free_memory

if TYPE_CHECKING:  # annotations only: throughput.py imports this module
    from polycom_megatron.bench.throughput import GptPreset, Settings

from polycom_megatron.variants import POLYCOM, polycom_config as _variant_polycom

SEED = 1234


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    first_step_s: Optional[float] = None  # build to the end of the first step: start-up
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
    return _variant_polycom(activation, kernel=kernel)


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
                kernel=kernel and _resolve_kernel(kernel, s),
                shape=shape,
                tokens_per_step=s.tokens,
                flops_per_token=F.training_flops(F.ffn_flops(shape)).total,
                build=lambda shape=shape, kernel=kernel: _build_layer(shape, kernel, s),
            )
            case.unavailable = kernel and _kernel_unavailable(kernel, s)
            cases.append(case)
    return cases


def _build_layer(shape: F.ModelShape, kernel: Optional[str], s: Settings):
    from polycom_megatron import compat

    config = transformer_config(shape, s)
    spec = _ffn_spec(config, polycom_config(shape.activation, kernel or "auto"), s)
    torch.manual_seed(SEED)
    module = compat.build_layer_ffn(spec, config).to(s.device)
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
            # Built with the choice itself, as a run given --polycom-kernel would be.
            build=lambda shape=shape, kernel=kernel: _build_training_step(
                shape, kernel and s.model_kernel, s
            ),
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
