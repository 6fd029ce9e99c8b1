"""The transformers configuration of a PolyCom GPT exported from Megatron.

Self-contained on purpose: ``export-hf`` copies this file verbatim into the exported
directory (``trust_remote_code``), so it imports nothing but transformers.

Every field mirrors one Megatron ``TransformerConfig`` / PolyCom setting; the mapping
between the two lives in ``polycom_megatron/hf/convert.py`` (the one place that knows
both names).
"""

from transformers import PretrainedConfig

ACTIVATIONS = ("polynorm", "polyrelu")
COEFF_MODES = ("layer", "expert")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class PolyComGPTConfig(PretrainedConfig):
    """A Megatron GPT (pre-norm RMSNorm, RoPE, GQA) whose MLPs use PolyNorm or PolyReLU,
    dense or Mixture-of-Experts.

    MLP: ``down(act(up(x)))``, or with ``polycom_gated`` ``down(act(gate(x)) * up(x))``;
    ``act`` is PolyCom with coefficients ``weight = [a_r, ..., a_1]`` and ``bias = [a_0]``
    (no bias with ``polycom_bias=False``), computed in float32.

    MoE: ``moe_layers[i]`` says whether layer i is MoE (dense layers use
    ``intermediate_size``, experts ``moe_intermediate_size``). Router: logits of a linear
    layer; ``moe_router_score_function`` softmax (top-k before or after it, per
    ``moe_router_pre_softmax``) or sigmoid (top-k probabilities renormalised, optional
    ``expert_bias`` for selection only); probabilities times ``moe_router_topk_scaling_factor``.
    Coefficients: one set per MoE layer ("layer") or per expert ("expert").
    """

    model_type = "polycom_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rotary_percent=1.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        polycom_activation="polynorm",
        polycom_order=3,
        polycom_eps=1e-6,
        polycom_gated=False,
        polycom_bias=True,
        polycom_coeff_mode="layer",
        num_experts=0,
        moe_layers=None,
        moe_intermediate_size=None,
        moe_router_topk=2,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        if polycom_activation not in ACTIVATIONS:
            raise ValueError(
                f"polycom_activation {polycom_activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if polycom_coeff_mode not in COEFF_MODES:
            raise ValueError(
                f"polycom_coeff_mode {polycom_coeff_mode!r} is not one of {', '.join(COEFF_MODES)}"
            )
        if moe_router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"moe_router_score_function {moe_router_score_function!r} is not one of "
                f"{', '.join(SCORE_FUNCTIONS)}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rotary_percent = rotary_percent
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.polycom_activation = polycom_activation
        self.polycom_order = polycom_order
        self.polycom_eps = polycom_eps
        self.polycom_gated = polycom_gated
        self.polycom_bias = polycom_bias
        self.polycom_coeff_mode = polycom_coeff_mode
        self.num_experts = num_experts
        if moe_layers is None:
            moe_layers = [bool(num_experts)] * num_hidden_layers
        if len(moe_layers) != num_hidden_layers:
            raise ValueError(
                f"moe_layers has {len(moe_layers)} entries for {num_hidden_layers} layers"
            )
        self.moe_layers = [bool(m) for m in moe_layers]
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.moe_router_topk = moe_router_topk
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_shared_expert_gate = moe_shared_expert_gate
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        # Set after the base class, whose constructor differs across transformers releases.
        self.tie_word_embeddings = tie_word_embeddings
