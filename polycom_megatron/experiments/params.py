"""The parameter count of a GPT from its Megatron-LM arguments (as TensorBoard logs them).

Megatron-LM prints the count to stdout but does not log it to TensorBoard, so
``compare --from-logs`` counts it from the arguments: embeddings, attention, norms, the
FFN (dense or routed experts) and the PolyCom coefficients. Shapes this count does not
model (multi-latent attention, shared experts, mixed dense/MoE layers, MTP, ...) give
None, shown as unknown, rather than a wrong number; so do arguments missing from the logs
(Megatron-LM logs all of its arguments; a log that lacks one is not counted by guessing).
"""

from __future__ import annotations

from typing import Dict, Optional

# Arguments whose non-default value changes the shape beyond what is counted here.
UNMODELLED = {
    "multi_latent_attention": "False", "moe_shared_expert_intermediate_size": "None",
    "moe_layer_freq": "1", "mtp_num_layers": "None", "heterogeneous_layers_config_path": "None",
    "moe_latent_size": "None", "qk_l2_norm": "False", "experimental_attention_variant": "None",
}


def _int(args, name, default=None) -> Optional[int]:
    text = args.get(name, "None")
    return default if text == "None" else int(text)


def _flag(args, name) -> bool:
    """A boolean argument; KeyError when the log lacks it."""
    return args[name] == "True"


def count_parameters(args: Dict[str, str]) -> Optional[int]:
    """All parameters of the model the arguments describe (None when it cannot tell)."""
    try:
        return _count(args)
    except (KeyError, ValueError):
        return None


def _count(args) -> Optional[int]:
    for name, default in UNMODELLED.items():
        if args.get(name, default) != default:
            return None
    h, layers = int(args["hidden_size"]), int(args["num_layers"])
    vocab = int(args["padded_vocab_size"])
    heads = int(args["num_attention_heads"])
    kv = _int(args, "kv_channels", h // heads)
    groups = _int(args, "num_query_groups", heads) if _flag(args, "group_query_attention") else heads
    bias = _flag(args, "add_bias_linear")
    if args["normalization"] not in ("LayerNorm", "RMSNorm"):
        return None
    norm = h * (2 if args["normalization"] == "LayerNorm" else 1)

    total = vocab * h * (2 if args["untie_embeddings_and_output_weights"] == "True" else 1)
    if args["position_embedding_type"] == "learned_absolute":
        total += int(args["max_position_embeddings"]) * h
    total += norm  # the final norm

    qkv_out = heads * kv + 2 * groups * kv
    attention = h * qkv_out + heads * kv * h
    if bias or _flag(args, "add_qkv_bias"):
        attention += qkv_out
    if bias:
        attention += h
    if _flag(args, "qk_layernorm"):
        attention += 2 * norm // h * kv
    per_layer = 2 * norm + attention + _ffn(args, h, bias)
    return total + layers * per_layer


def _ffn(args, h: int, bias: bool) -> int:
    # Megatron-LM without our plugin has no polycom_* arguments: its stock MLP.
    activation = args.get("polycom_activation", "None")
    polycom = activation not in ("None", "none")
    gated = _flag(args, "polycom_gated") if polycom else _flag(args, "swiglu")
    coefficients = int(args["polycom_order"]) + _flag(args, "polycom_bias") if polycom else 0

    def mlp(width: int) -> int:
        fc1 = h * width * (2 if gated else 1) + (width * (2 if gated else 1) if bias else 0)
        return fc1 + width * h + (h if bias else 0)

    experts = _int(args, "num_experts", 0)
    if not experts:
        return mlp(int(args["ffn_hidden_size"])) + coefficients
    width = _int(args, "moe_ffn_hidden_size") or int(args["ffn_hidden_size"])
    per_expert = args.get("polycom_coeff_mode", "layer") == "expert"
    router = experts * h
    return router + experts * mlp(width) + coefficients * (experts if per_expert else 1)
