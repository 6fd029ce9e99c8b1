"""A Megatron PolyCom GPT as a transformers model: ``PolyComGPTForCausalLM``.

Self-contained on purpose: ``export-hf`` copies this file and ``configuration.py``
verbatim into the exported directory, so that ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works with only torch and transformers installed. It therefore
imports nothing from polycom_megatron.

It computes what Megatron-Core's GPTModel computes, op for op where that matters for
exactness: pre-norm RMSNorm (``torch.nn.functional.rms_norm`` with Megatron's eps),
rotary embeddings on the first ``rotary_percent`` of each head (non-interleaved halves,
positions in float32), grouped-query attention (each key/value head serves consecutive
query heads, as Megatron's ``repeat_interleave``), softmax in float32, PolyCom in float32,
and Megatron's MoE: router logits, top-k with the configured score function, each
expert's intermediate scaled by its routing probability before the down projection,
expert outputs summed per token, plus the shared expert.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration import PolyComGPTConfig

# transformers 5 renamed the cache argument/output field from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
    "past_key_values"
)
_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


# ----------------------------------------------------------------------------------------
# PolyCom
# ----------------------------------------------------------------------------------------


def _norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)


def polycom(x, weight, bias, activation: str, eps: float) -> torch.Tensor:
    """PolyNorm / PolyReLU over the last dimension, float32 inside, in ``x``'s dtype.

    ``weight = [a_r, ..., a_1]`` (highest power first), ``bias = [a_0]`` or None."""
    xf = x.float()
    order = weight.shape[-1]
    base = torch.relu(xf) if activation == "polyrelu" else xf
    out = bias.float() if bias is not None else torch.zeros((), dtype=torch.float32, device=x.device)
    for i in range(order):
        power = base.pow(order - i)
        term = _norm(power, eps) if activation == "polynorm" else power
        out = out + weight[i].float() * term
    return out


class PolyComActivation(nn.Module):
    """The learnable coefficients of one PolyCom activation."""

    def __init__(self, config: PolyComGPTConfig):
        super().__init__()
        order = config.polycom_order
        self.activation = config.polycom_activation
        self.eps = config.polycom_eps
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1)) if config.polycom_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return polycom(x, self.weight, self.bias, self.activation, self.eps)


class PolyComMLP(nn.Module):
    """``down(act(up(x)))`` or, gated, ``down(act(gate(x)) * up(x))``.

    ``act`` is this MLP's own activation, or the one passed in (an MoE layer's shared
    coefficients). ``scale`` (routing probabilities, one per row) multiplies the
    intermediate before the down projection, where Megatron's experts apply it."""

    def __init__(self, config: PolyComGPTConfig, width: int, own_activation: bool = True):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gated = config.polycom_gated
        if self.gated:
            self.gate_proj = nn.Linear(h, width, bias=bias)
        self.up_proj = nn.Linear(h, width, bias=bias)
        self.down_proj = nn.Linear(width, h, bias=bias)
        self.act_fn = PolyComActivation(config) if own_activation else None

    def forward(self, x, act: Optional[PolyComActivation] = None, scale=None):
        act = act if act is not None else self.act_fn
        if self.gated:
            intermediate = act(self.gate_proj(x)) * self.up_proj(x).float()
        else:
            intermediate = act(self.up_proj(x))
        intermediate = intermediate.to(x.dtype)
        if scale is not None:
            intermediate = (intermediate * scale.unsqueeze(-1)).to(x.dtype)
        return self.down_proj(intermediate)


class PolyComMoE(nn.Module):
    """Megatron's MoE layer at inference: router, top-k, routed experts, shared expert."""

    def __init__(self, config: PolyComGPTConfig):
        super().__init__()
        self.config = config
        e, width = config.num_experts, config.moe_intermediate_size
        self.router = nn.Linear(config.hidden_size, e, bias=False)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.expert_bias = None
        per_expert = config.polycom_coeff_mode == "expert"
        self.experts = nn.ModuleList(
            PolyComMLP(config, width, own_activation=per_expert) for _ in range(e)
        )
        self.act_fn = None if per_expert else PolyComActivation(config)
        self.shared_experts = None
        self.shared_expert_gate = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = PolyComMLP(config, config.moe_shared_expert_intermediate_size)
            if config.moe_shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor):
        """[tokens, hidden] -> (probs [tokens, experts] with zeros off the top-k, chosen mask)."""
        c = self.config
        logits = self.router(x)
        k = c.moe_router_topk
        if c.moe_router_score_function == "softmax":
            if c.moe_router_pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                probs, top = torch.topk(scores, k=k, dim=1)
            else:
                scores, top = torch.topk(logits, k=k, dim=1)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            scores = torch.sigmoid(logits.float()).type_as(logits)
            if self.expert_bias is not None:
                _, top = torch.topk(scores + self.expert_bias, k=k, dim=1)
                scores = torch.gather(scores, dim=1, index=top).type_as(logits)
            else:
                scores, top = torch.topk(scores, k=k, dim=1)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores
        if c.moe_router_topk_scaling_factor:
            probs = probs * c.moe_router_topk_scaling_factor
        routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
        chosen = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top, 1).bool()
        return routing_probs, chosen

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = chosen[:, e].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = expert(x[rows], act=self.act_fn, scale=probs[rows, e])
            out.index_add_(0, rows, y)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared
        return out.reshape(shape)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Megatron's RoPE: frequencies for the first ``head_dim * rotary_percent`` channels.

    The frequencies are computed in every forward (a few dozen numbers) rather than kept
    in a buffer: transformers builds models on the meta device before loading weights,
    and a non-persistent buffer would not survive that."""

    def __init__(self, config: PolyComGPTConfig):
        super().__init__()
        dim = config.head_dim
        if config.rotary_percent < 1.0:
            dim = int(dim * config.rotary_percent)
        self.dim = dim
        self.base = config.rope_theta

    def forward(self, position_ids: torch.Tensor):
        """[batch, seq] positions -> (cos, sin) of shape [batch, 1, seq, rot_dim], float32."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (exponents / self.dim))
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return torch.cos(emb), torch.sin(emb)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    t_rot = t_rot * cos + _rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1)


class PolyComGPTAttention(nn.Module):
    def __init__(self, config: PolyComGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.mlp_bias)

    def forward(self, hidden, rotary, mask, cache=None):
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim**0.5)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(context)


class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm``'s math (what Megatron's local spec runs), weight only."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class PolyComGPTDecoderLayer(nn.Module):
    def __init__(self, config: PolyComGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PolyComGPTAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.moe_layers[layer_idx]:
            self.mlp = PolyComMoE(config)
        else:
            self.mlp = PolyComMLP(config, config.intermediate_size)

    def forward(self, hidden, rotary, mask, cache=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary, mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


class PolyComGPTPreTrainedModel(PreTrainedModel):
    config_class = PolyComGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["PolyComGPTDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, PolyComActivation):
            nn.init.constant_(module.weight, 1.0 / module.weight.shape[-1])
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def _attention_mask(attention_mask, batch, query_len, past_len, device):
    """Boolean [batch, 1, query, key]: causal, and padding keys masked out."""
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)
    allowed = torch.arange(key_len, device=device)[None, :] <= query_pos[:, None]
    allowed = allowed[None, None].expand(batch, 1, query_len, key_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -key_len:].bool()
    return allowed


class PolyComGPTModel(PolyComGPTPreTrainedModel):
    def __init__(self, config: PolyComGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            PolyComGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Optional[Cache] = None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers releases whose DynamicCache takes no config
                cache = DynamicCache()
        b, s = hidden.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only.
                full = attention_mask.long().cumsum(-1) - 1
                position_ids = full.clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=hidden.device)[None].expand(b, s)
        rotary = self.rotary(position_ids)
        mask = _attention_mask(attention_mask, b, s, past, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, rotary, mask, cache if use_cache else None)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, **{_CACHE_FIELD: cache if use_cache else None}
        )


class PolyComGPTForCausalLM(PolyComGPTPreTrainedModel, GenerationMixin):
    # transformers 5 maps tied parameters target -> source; earlier releases list them.
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"}
        if _TRANSFORMERS_MAJOR >= 5
        else ["lm_head.weight"]
    )

    def __init__(self, config: PolyComGPTConfig):
        super().__init__(config)
        self.model = PolyComGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Optional[Cache] = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Shifted next-token cross entropy; -100 marks positions to ignore.
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)}
        )
