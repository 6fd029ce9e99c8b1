"""The FLOP formulas against independent counts.

torch's FlopCounterMode counts every matmul that actually runs (mm, addmm, bmm, baddbmm)
in a tiny Megatron GPT on CPU. Megatron's local attention multiplies the full S x S score
matrix before masking, so it is compared with the ``causal=False`` count. Elementwise work
is invisible to the counter, hence the ``gemm`` part only.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polycom_megatron.bench import flops as F
from polycom_megatron.bench import throughput as T

SEQ, BATCH = 16, 2


@pytest.fixture(scope="module")
def settings():
    # Local spec even where Transformer Engine is installed: the counter cannot see TE's GEMMs.
    s = T.resolve_settings(T.parse_args(["--smoke", "--te", "off", "--out-dir", "unused"]))
    s.seq_length, s.micro_batch = SEQ, BATCH
    created = T.init_single_process(s.device)
    yield s
    T.shutdown(created)


def tiny_shape(activation, moe=False):
    preset = T.GptPreset(2, 32, 4, 48, 64, num_experts=4 if moe else None, top_k=2 if moe else 0)
    return preset.shape(activation, SEQ)


def build_model(shape, s):
    from polycom_megatron.model import build_gpt_model

    config = T.transformer_config(shape, s)
    torch.manual_seed(0)
    if shape.is_moe and shape.activation in T.POLYCOM:
        # Builds without PolyCom experts refuse MoE specs; the benchmark reports them unavailable.
        from polycom_megatron.specs import get_gpt_block_spec

        try:
            get_gpt_block_spec(config, T.polycom_config(shape.activation, "torch"), use_te=False)
        except ValueError as exc:
            pytest.skip(f"PolyCom experts not in this build: {exc}")
    model = build_gpt_model(
        config, T.polycom_config(shape.activation, "torch"), shape.vocab_size, shape.seq_length
    )
    return model.to(s.device)


def count(model, shape, backward=False):
    device = next(model.parameters()).device
    tokens = torch.randint(0, shape.vocab_size, (BATCH, SEQ), device=device)
    positions = torch.arange(SEQ, device=device).unsqueeze(0).expand(BATCH, SEQ)
    with FlopCounterMode(display=False) as counter:
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        if backward:
            loss.backward()
    return counter.get_total_flops()


CASES = [("swiglu", False), ("gelu", False), ("polynorm", False), ("polyrelu", False),
         ("polynorm-glu", False), ("swiglu", True), ("gelu", True), ("polynorm", True),
         ("polynorm-glu", True)]


@pytest.mark.parametrize("activation,moe", CASES)
def test_forward_gemm_flops_match_flop_counter(settings, activation, moe):
    shape = tiny_shape(activation, moe)
    counted = count(build_model(shape, settings), shape)
    formula = F.model_flops(shape, causal=False).gemm * BATCH * SEQ
    assert formula == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("activation,moe", [("swiglu", False), ("polynorm", False),
                                            ("swiglu", True)])
def test_backward_is_twice_forward(settings, activation, moe):
    shape = tiny_shape(activation, moe)
    model = build_model(shape, settings)
    forward = count(model, shape)
    both = count(model, shape, backward=True)
    assert both == pytest.approx(F.TRAINING_MULTIPLIER * forward, rel=0.02)


def test_dense_gemms_are_two_flops_per_weight(settings):
    """Forward GEMM FLOPs per token, attention scores aside, = 2 x the weights a token meets."""
    shape = tiny_shape("polynorm")
    model = build_model(shape, settings)
    linear = sum(
        p.numel() for n, p in model.named_parameters()
        if p.dim() == 2 and "embedding" not in n
    )
    per_token = F.model_flops(shape)
    assert per_token.gemm - per_token.attention == 2 * linear


def test_activation_counts_and_conventions():
    assert [F.activation_flops_per_element(a) for a in F.ACTIVATIONS] == [5, 5, 7, 14, 8, 15]
    assert F.activation_flops_per_element("polyrelu", order=2) == 5
    assert F.activation_flops_per_element("polynorm", order=2) == 9
    with pytest.raises(ValueError):
        F.activation_flops_per_element("relu")
    # SwiGLU's fc1 is doubled; at matched widths the GEMMs cost the same.
    swiglu, poly = F.mlp_flops(2048, 5504, "swiglu"), F.mlp_flops(2048, 8256, "polynorm")
    assert swiglu.mlp == poly.mlp == 6 * 2048 * 5504
    assert poly.activation == 14 * 8256
    # Causal attention counts half the score matrix.
    full = F.attention_flops(2048, 16, 4096, causal=False)
    half = F.attention_flops(2048, 16, 4096, causal=True)
    assert half.attention * 2 == full.attention == 4 * 4096 * 2048
    assert F.training_flops(half).total == 3 * half.total


def test_paper_dense_1b_is_about_6n_per_token():
    """The paper's dense 1B: 6 x non-embedding params + attention + LM head per token."""
    shape = T.PRESETS["paper"].dense.shape("swiglu", 4096)
    train = F.training_flops(F.model_flops(shape))
    layer_params = 24 * (4 * 2048**2 + 3 * 2048 * 5504)
    expected = 6 * layer_params + 3 * (24 * 2 * 4096 * 2048 + 2 * 2048 * 32000)
    assert train.gemm == pytest.approx(expected, rel=1e-12)
    # MoE counts only the top-k experts a token visits, plus the router.
    moe = T.PRESETS["paper"].moe.shape("polynorm", 4096)
    ffn = F.ffn_flops(moe)
    assert ffn.mlp == 8 * 2 * 2 * 2048 * 1536 and ffn.router == 2 * 2048 * 64
