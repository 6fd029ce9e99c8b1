"""The transformers model on its own (no Megatron): the PolyCom MLPs against the formulas
written out, the gated form and its bias-free variant, KV-cache generation against
recomputing every step, padding, tied embeddings, Auto-class registration, and the
converter's tables (lossless both ways, Megatron's fused QKV layout)."""

import pytest
import torch

from polycom_megatron.hf import convert
from polycom_megatron.hf.configuration import PolyComGPTConfig
from polycom_megatron.hf.modeling import PolyComGPTForCausalLM, PolyComMLP

H = 16


def config(**changes) -> PolyComGPTConfig:
    fields = dict(vocab_size=64, hidden_size=H, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    fields.update(changes)
    return PolyComGPTConfig(**fields)


def randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def norm(v, eps=1e-6):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def formula(activation, x, a, bias):
    """a = [a_r, ..., a_1]; bias = a_0 or None."""
    r = len(a)
    q = torch.relu(x) if activation == "polyrelu" else x
    out = torch.zeros_like(x) if bias is None else torch.full_like(x, float(bias))
    for p in range(1, r + 1):
        term = q ** p
        out = out + a[r - p] * (norm(term) if activation == "polynorm" else term)
    return out


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_mlp_matches_the_formula(activation, gated, bias, order):
    cfg = config(polycom_activation=activation, polycom_gated=gated, polycom_bias=bias,
                 polycom_order=order)
    mlp = randomised(PolyComMLP(cfg, 24))
    assert (mlp.act_fn.bias is None) == (not bias)
    x = torch.randn(3, 5, H, dtype=torch.float64).float()
    a = mlp.act_fn.weight.detach()
    b = mlp.act_fn.bias.detach() if bias else None
    with torch.no_grad():
        if gated:
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
            want = mlp.down_proj(formula(activation, g, a, b) * u)
        else:
            want = mlp.down_proj(formula(activation, mlp.up_proj(x), a, b))
        got = mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


MODELS = {
    "dense": {},
    "gated-no-bias": dict(polycom_gated=True, polycom_bias=False),
    "moe": dict(num_experts=4, moe_layers=[False, True], moe_intermediate_size=8,
                moe_shared_expert_intermediate_size=12, moe_shared_expert_gate=True),
    "moe-sigmoid": dict(num_experts=4, moe_intermediate_size=8, polycom_coeff_mode="expert",
                        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_topk_scaling_factor=2.0),
    "tied": dict(tie_word_embeddings=True, rotary_percent=0.5),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_generate_with_kv_cache_equals_recomputing(kind):
    model = randomised(PolyComGPTForCausalLM(config(**MODELS[kind])))
    prompt = torch.tensor([[3, 9, 27, 17, 51]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=0)
        seq = prompt
        for _ in range(12):
            logits = model(seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == seq.tolist()


def test_left_padding_changes_nothing():
    model = randomised(PolyComGPTForCausalLM(config(**MODELS["moe"])))
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(short, use_cache=False).logits[0]
        batched = model(padded, attention_mask=mask, use_cache=False).logits[0, 2:]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_saved_model_reloads_through_the_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import polycom_megatron.hf  # noqa: F401

    model = randomised(PolyComGPTForCausalLM(config(**MODELS["tied"])))
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PolyComGPTConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, model(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_converter_is_lossless_both_ways(kind):
    cfg = config(**MODELS[kind])
    hf_state = randomised(PolyComGPTForCausalLM(cfg)).state_dict()
    megatron = convert.hf_to_megatron(hf_state, cfg)
    assert set(megatron) == {e.megatron for e in convert.parameter_map(cfg)}
    back = convert.megatron_to_hf(megatron, cfg)
    expected = {k for k in hf_state if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for name in expected:
        assert torch.equal(back[name], hf_state[name]), name


def test_fused_qkv_is_split_per_query_group():
    """Megatron's linear_qkv rows, per query group: its query heads, its key, its value."""
    cfg = config(num_attention_heads=4, num_key_value_heads=2, hidden_size=8)
    d, rows = cfg.head_dim, []
    for group in range(2):
        for head in range(2):
            rows.append(torch.full((d, 8), 100.0 + 2 * group + head))  # query head 2g+h
        rows.append(torch.full((d, 8), 200.0 + group))  # key of group g
        rows.append(torch.full((d, 8), 300.0 + group))  # value of group g
    q, k, v = convert._split_qkv(torch.cat(rows), cfg)
    assert q[::d, 0].tolist() == [100, 101, 102, 103]
    assert k[::d, 0].tolist() == [200, 201] and v[::d, 0].tolist() == [300, 301]
    assert torch.equal(convert._merge_qkv((q, k, v), cfg), torch.cat(rows))


def test_unknown_weights_are_named():
    cfg = config()
    state = convert.hf_to_megatron(randomised(PolyComGPTForCausalLM(cfg)).state_dict(), cfg)
    state["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(4)
    with pytest.raises(ValueError, match="unexpected.*q_layernorm"):
        convert.megatron_to_hf(state, cfg)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="polycom_activation 'gelu'"):
        config(polycom_activation="gelu")
    with pytest.raises(ValueError, match="moe_layers has 3 entries for 2 layers"):
        config(num_experts=2, moe_layers=[True, True, True])
