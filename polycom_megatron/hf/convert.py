"""Megatron GPT <-> transformers ``PolyComGPTForCausalLM``: the one place where settings
and parameter names of the two are mapped.

Both directions read one table, ``parameter_map(hf_config)``: for every parameter of the
model it names the Megatron key (in the state dict of a model built at TP=PP=EP=1, what
``megatron_io`` produces from any saved layout) and the transformers key(s), and how the
tensor moves:

* ``copy``: the same tensor.
* ``qkv``: Megatron's fused ``linear_qkv`` holds, per query group, that group's query
  heads, then its key head, then its value head; transformers has q/k/v projections.
* ``halves``: a gated fc1 is ``[gate; up]`` along its output rows (Megatron's GLU layout at
  TP=1, which its checkpoints keep at every TP size) -> gate_proj and up_proj.

Every split is undone by a concatenation, so Megatron -> HF -> Megatron is bit-exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from polycom_megatron.config import PolyComConfig

# Settings the exported model does not implement: a Megatron config using any of them is
# refused instead of exported into a model that computes something else.
_UNSUPPORTED = {
    "qk_layernorm": "QK layer norm (--qk-layernorm)",
    "layernorm_zero_centered_gamma": "zero-centred norm weights (--apply-layernorm-1p)",
    "rotary_interleaved": "interleaved rotary embeddings (--rotary-interleaved)",
    "multi_latent_attention": "multi-latent attention",
    "softmax_scale": "a custom softmax scale",
    "window_size": "sliding-window attention",
    "attention_output_gate": "the attention output gate",
    "mtp_num_layers": "multi-token prediction layers",
    "moe_router_num_groups": "group-limited routing (--moe-router-num-groups)",
    "moe_expert_capacity_factor": "token dropping (--moe-expert-capacity-factor)",
    "moe_apply_probs_on_input": "--moe-apply-probs-on-input",
}


@dataclass(frozen=True)
class MegatronModel:
    """What building the Megatron model needs besides the parallel layout.

    ``transformer``: TransformerConfig fields; ``polycom``: PolyComConfig fields;
    ``gpt``: GPTModel arguments (vocabulary, sequence length, RoPE, tied embeddings)."""

    transformer: dict
    polycom: dict
    gpt: dict

    def polycom_config(self) -> PolyComConfig:
        known = {f.name for f in dataclasses.fields(PolyComConfig)}
        missing = sorted(set(self.polycom) - known)
        if missing:
            # Only non-default gated/bias settings are ever written here (megatron_model).
            raise ValueError(
                f"this model uses PolyCom settings {missing} (the gated form or the "
                "bias-free variant) that this build of polycom-megatron lacks; upgrade it"
            )
        return PolyComConfig(**self.polycom)


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


def moe_layer_pattern(moe_layer_freq, num_layers: int, num_experts: int) -> List[bool]:
    """Which layers are MoE, as Megatron reads ``moe_layer_freq`` (int k: every k-th
    layer starting with the first; a list: 1 = MoE, 0 = dense)."""
    if not num_experts:
        return [False] * num_layers
    if isinstance(moe_layer_freq, int):
        return [i % moe_layer_freq == 0 for i in range(num_layers)]
    pattern = [bool(x) for x in moe_layer_freq]
    if len(pattern) != num_layers:
        raise ValueError(f"moe_layer_freq has {len(pattern)} entries for {num_layers} layers")
    return pattern


def hf_config_dict(config, polycom: PolyComConfig, gpt: dict) -> dict:
    """PolyComGPTConfig fields for a Megatron TransformerConfig + PolyComConfig + GPT args.

    Raises ValueError naming the first setting the exported model would not reproduce."""
    for name, what in _UNSUPPORTED.items():
        if getattr(config, name, None):
            raise ValueError(
                f"the checkpoint's model uses {what} ({name}), which the transformers export "
                "does not implement; export supports the Llama-style GPT this package trains"
            )
    if config.normalization != "RMSNorm":
        raise ValueError(
            f"normalization {config.normalization!r}: the transformers export supports RMSNorm"
        )
    if gpt.get("position_embedding_type", "rope") != "rope":
        raise ValueError(
            f"position embeddings {gpt['position_embedding_type']!r}: the export supports rope"
        )
    for name in ("rope_scaling", "seq_len_interpolation_factor"):
        if gpt.get(name):
            raise ValueError(f"RoPE scaling ({name}) is not supported by the export")
    balancing = config.moe_router_load_balancing_type
    if config.num_moe_experts and "sinkhorn" in (
        balancing if isinstance(balancing, (list, tuple)) else [balancing]
    ):
        raise ValueError("sinkhorn routing is not supported by the export; use aux_loss or none")
    if polycom is None:
        raise ValueError(
            "the checkpoint's model has no PolyCom activation (stock Megatron MLP); the "
            "transformers export is for PolyCom models"
        )
    experts = config.num_moe_experts or 0
    return dict(
        vocab_size=gpt["vocab_size"],
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        max_position_embeddings=gpt["max_sequence_length"],
        rms_norm_eps=config.layernorm_epsilon,
        rope_theta=float(gpt.get("rotary_base", 10000)),
        rotary_percent=float(gpt.get("rotary_percent", 1.0)),
        attention_bias=bool(config.add_qkv_bias),
        mlp_bias=bool(config.add_bias_linear),
        tie_word_embeddings=bool(gpt.get("share_embeddings_and_output_weights", False)),
        polycom_activation=polycom.activation,
        polycom_order=polycom.order,
        polycom_eps=polycom.eps,
        polycom_gated=bool(getattr(polycom, "gated", False)),
        polycom_bias=bool(getattr(polycom, "bias", True)),
        polycom_coeff_mode=polycom.coeff_mode,
        num_experts=experts,
        moe_layers=moe_layer_pattern(config.moe_layer_freq, config.num_layers, experts),
        moe_intermediate_size=config.moe_ffn_hidden_size if experts else None,
        moe_router_topk=config.moe_router_topk,
        moe_router_pre_softmax=bool(config.moe_router_pre_softmax),
        moe_router_score_function=config.moe_router_score_function,
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=bool(config.moe_router_enable_expert_bias),
        moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=bool(config.moe_shared_expert_gate),
    )


def megatron_model(hf) -> MegatronModel:
    """The Megatron model (at no particular layout) of a PolyComGPTConfig."""
    experts = hf.num_experts or 0
    transformer = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        layernorm_epsilon=hf.rms_norm_eps,
        normalization="RMSNorm",
        add_qkv_bias=hf.attention_bias,
        add_bias_linear=hf.mlp_bias,
        gated_linear_unit=hf.polycom_gated,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.initializer_range,
    )
    if experts:
        transformer.update(
            num_moe_experts=experts,
            moe_layer_freq=[int(x) for x in hf.moe_layers],
            moe_ffn_hidden_size=hf.moe_intermediate_size,
            moe_router_topk=hf.moe_router_topk,
            moe_router_pre_softmax=hf.moe_router_pre_softmax,
            moe_router_score_function=hf.moe_router_score_function,
            moe_router_topk_scaling_factor=hf.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=hf.moe_router_enable_expert_bias,
            moe_shared_expert_intermediate_size=hf.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=hf.moe_shared_expert_gate,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )
    polycom = dict(
        activation=hf.polycom_activation,
        order=hf.polycom_order,
        eps=hf.polycom_eps,
        coeff_mode=hf.polycom_coeff_mode,
    )
    if hf.polycom_gated:
        polycom["gated"] = True
    if not hf.polycom_bias:
        polycom["bias"] = False
    gpt = dict(
        vocab_size=hf.vocab_size,
        max_sequence_length=hf.max_position_embeddings,
        share_embeddings_and_output_weights=bool(hf.tie_word_embeddings),
        rotary_base=int(hf.rope_theta) if float(hf.rope_theta).is_integer() else hf.rope_theta,
        rotary_percent=hf.rotary_percent,
    )
    return MegatronModel(transformer, polycom, gpt)


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: Tuple[str, ...]
    kind: str = "copy"  # "copy", "qkv" or "halves"


def _mlp_entries(hf, mprefix: str, hprefix: str, own_activation: bool) -> List[Entry]:
    suffixes = ("weight", "bias") if hf.mlp_bias else ("weight",)
    out = []
    for s in suffixes:
        if hf.polycom_gated:
            out.append(Entry(f"{mprefix}linear_fc1.{s}",
                             (f"{hprefix}gate_proj.{s}", f"{hprefix}up_proj.{s}"), "halves"))
        else:
            out.append(Entry(f"{mprefix}linear_fc1.{s}", (f"{hprefix}up_proj.{s}",)))
        out.append(Entry(f"{mprefix}linear_fc2.{s}", (f"{hprefix}down_proj.{s}",)))
    if own_activation:
        out += _activation_entries(hf, f"{mprefix}activation_func.", f"{hprefix}act_fn.")
    return out


def _activation_entries(hf, mprefix: str, hprefix: str) -> List[Entry]:
    names = ("weight", "bias") if hf.polycom_bias else ("weight",)
    return [Entry(mprefix + n, (hprefix + n,)) for n in names]


def parameter_map(hf) -> List[Entry]:
    """Every parameter (and persistent buffer) of the model, both names."""
    entries = [Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for i in range(hf.num_hidden_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        entries.append(Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",)))
        qkv = ("weight", "bias") if hf.attention_bias else ("weight",)
        for s in qkv:
            entries.append(Entry(
                f"{m}self_attention.linear_qkv.{s}",
                tuple(f"{h}self_attn.{p}_proj.{s}" for p in "qkv"), "qkv",
            ))
        for s in ("weight", "bias") if hf.mlp_bias else ("weight",):
            entries.append(Entry(f"{m}self_attention.linear_proj.{s}", (f"{h}self_attn.o_proj.{s}",)))
        entries.append(Entry(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)))
        if not hf.moe_layers[i]:
            entries += _mlp_entries(hf, m + "mlp.", h + "mlp.", own_activation=True)
            continue
        entries.append(Entry(m + "mlp.router.weight", (h + "mlp.router.weight",)))
        if hf.moe_router_enable_expert_bias:
            entries.append(Entry(m + "mlp.router.expert_bias", (h + "mlp.expert_bias",)))
        per_expert = hf.polycom_coeff_mode == "expert"
        if not per_expert:
            entries += _activation_entries(hf, m + "mlp.experts.activation_func.", h + "mlp.act_fn.")
        for e in range(hf.num_experts):
            entries += _mlp_entries(
                hf, f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}.", per_expert
            )
        if hf.moe_shared_expert_intermediate_size:
            entries += _mlp_entries(hf, m + "mlp.shared_experts.", h + "mlp.shared_experts.", True)
            if hf.moe_shared_expert_gate:
                entries.append(Entry(m + "mlp.shared_experts.gate_weight",
                                     (h + "mlp.shared_expert_gate.weight",)))
    entries.append(Entry("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not hf.tie_word_embeddings:
        entries.append(Entry("output_layer.weight", ("lm_head.weight",)))
    return entries


def _check_keys(have, want, side: str, fix: str) -> None:
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"the {side} weights do not match the model configuration: "
                         f"{'; '.join(parts)}; {fix}")


def megatron_to_hf(state: Dict[str, torch.Tensor], hf) -> Dict[str, torch.Tensor]:
    """A TP=1 Megatron GPT state dict -> transformers state dict (tensors cloned)."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    entries = parameter_map(hf)
    _check_keys(state, [e.megatron for e in entries], "Megatron",
                "the checkpoint holds parameters the export does not know")
    out = {}
    for entry in entries:
        tensor = state[entry.megatron].detach().cpu()
        if entry.kind == "copy":
            parts = (tensor,)
        elif entry.kind == "halves":
            parts = torch.chunk(tensor, 2, dim=0)
        else:
            parts = _split_qkv(tensor, hf)
        for name, part in zip(entry.hf, parts):
            out[name] = part.contiguous().clone()
    return out


def hf_to_megatron(state: Dict[str, torch.Tensor], hf) -> Dict[str, torch.Tensor]:
    """A transformers state dict -> TP=1 Megatron GPT state dict."""
    entries = parameter_map(hf)
    expected = [name for e in entries for name in e.hf]
    if hf.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    _check_keys(state, expected, "transformers",
                "was the directory written by polycom-megatron export-hf?")
    out = {}
    for entry in entries:
        parts = [state[name].detach().cpu() for name in entry.hf]
        if entry.kind == "qkv":
            out[entry.megatron] = _merge_qkv(parts, hf)
        else:
            out[entry.megatron] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].clone()
    return out


def _qkv_shape(hf):
    groups = hf.num_key_value_heads
    return groups, hf.num_attention_heads // groups, hf.head_dim


def _split_qkv(tensor: torch.Tensor, hf):
    groups, q_per_group, dim = _qkv_shape(hf)
    grouped = tensor.reshape(groups, q_per_group + 2, dim, *tensor.shape[1:])
    q = grouped[:, :q_per_group].reshape(groups * q_per_group * dim, *tensor.shape[1:])
    k = grouped[:, q_per_group].reshape(groups * dim, *tensor.shape[1:])
    v = grouped[:, q_per_group + 1].reshape(groups * dim, *tensor.shape[1:])
    return q, k, v


def _merge_qkv(parts, hf) -> torch.Tensor:
    q, k, v = parts
    groups, q_per_group, dim = _qkv_shape(hf)
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(groups, q_per_group, dim, *rest),
            k.reshape(groups, 1, dim, *rest),
            v.reshape(groups, 1, dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(groups * (q_per_group + 2) * dim, *rest).contiguous()


def describe(hf) -> str:
    """One line: what the model is."""
    kind = (
        f"MoE {hf.num_experts} experts top-{hf.moe_router_topk} ({sum(hf.moe_layers)} of "
        f"{hf.num_hidden_layers} layers)" if hf.num_experts else "dense"
    )
    act = hf.polycom_activation + ("-glu" if hf.polycom_gated else "")
    return (f"{act} GPT, {hf.num_hidden_layers} layers, hidden {hf.hidden_size}, "
            f"{hf.num_attention_heads} heads ({hf.num_key_value_heads} kv), {kind}, "
            f"vocab {hf.vocab_size}")

