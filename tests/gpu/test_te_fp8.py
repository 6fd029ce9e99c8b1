"""GPU check: PolyCom through Transformer Engine under every FP8 recipe the device runs.

Skips without CUDA and Transformer Engine (so CPU CI collects it and skips). On a GPU with
TE installed one call settles it:

    python -m pytest -q tests/gpu/test_te_fp8.py -rs

For each recipe the device and TE support (delayed and tensorwise/current scaling on
Hopper, blockwise where TE has Float8BlockScaling, MXFP8 on compute capability 10.0+), a
small dense GPT (TE spec: TE linears around PolyNorm / PolyReLU) and a small MoE GPT
(``--moe-grouped-gemm``: TE's grouped GEMM with our forward, FP8 padding of uneven expert
splits) run forward and backward in FP8 on one GPU. Each must give a finite loss close to
the same model in bf16 (FP8's error: a few percent), finite gradients everywhere, nonzero
float32 gradients for every PolyCom coefficient, and the widths that TE asserts on must be
the ones our layout check accepts.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

te = pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, HEADS, FFN, EXPERTS, VOCAB, SEQ, BATCH = 256, 4, 384, 4, 512, 128, 4


def _recipes():
    """(Megatron --fp8-recipe value, why skipped or None) for this device and TE."""
    if not torch.cuda.is_available():
        return [("delayed", "no GPU")]
    cc = torch.cuda.get_device_capability()
    import transformer_engine.common.recipe as recipe

    out = [("delayed", None if cc >= (8, 9) else "FP8 needs compute capability 8.9+")]
    out.append(("tensorwise", None if hasattr(recipe, "Float8CurrentScaling")
                else "this TE has no Float8CurrentScaling"))
    blockwise = None if hasattr(recipe, "Float8BlockScaling") else "this TE has no Float8BlockScaling"
    if blockwise is None and cc >= (10, 0):
        blockwise = "blockwise FP8 is a Hopper recipe"
    out.append(("blockwise", blockwise))
    out.append(("mxfp8", None if cc >= (10, 0) else "MXFP8 needs compute capability 10.0+"))
    return out


@pytest.fixture(scope="module", autouse=True)
def single_gpu_parallel_state():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1")
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


def _config(fp8_recipe, moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        normalization="RMSNorm", add_bias_linear=False, bias_activation_fusion=False,
        gated_linear_unit=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
        params_dtype=torch.bfloat16,
    )
    if moe:
        fields.update(num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=FFN,
                      moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall",
                      moe_router_load_balancing_type="none", moe_layer_freq=[0, 1])
    if fp8_recipe is not None:
        fields.update(fp8="hybrid", fp8_recipe=fp8_recipe)
    return TransformerConfig(**fields)


def _run(fp8_recipe, moe, activation, state=None):
    """Loss and gradients of one forward/backward; ``state`` loads the same weights."""
    from polycom_megatron import layout
    from polycom_megatron.config import PolyComConfig
    from polycom_megatron.model import build_gpt_model

    if fp8_recipe is not None:  # the widths used here pass our own FP8 layout check
        assert layout.check_layout(
            world_size=1, num_layers=2, num_heads=HEADS, hidden_size=HIDDEN,
            ffn_hidden_size=FFN, num_experts=EXPERTS if moe else None,
            moe_ffn_hidden_size=FFN if moe else None, precision="fp8",
            fp8_recipe=fp8_recipe, activation=activation) == []
    torch.manual_seed(0)
    config = _config(fp8_recipe, moe)
    model = build_gpt_model(config, PolyComConfig(activation=activation), vocab_size=VOCAB,
                            max_sequence_length=SEQ, use_te=True).cuda()
    if state is not None:  # TE's FP8 metadata (_extra_state) is per run, not a weight
        result = model.load_state_dict(state, strict=False)
        assert all("_extra_state" in k for k in result.missing_keys + result.unexpected_keys)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).cuda()
    position_ids = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, SEQ)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return model, loss.item(), grads


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("activation", ["polynorm", "polyrelu"])
@pytest.mark.parametrize("fp8_recipe, skip", _recipes(), ids=[r for r, _ in _recipes()])
def test_fp8_forward_backward(fp8_recipe, skip, activation, moe):
    if skip:
        pytest.skip(skip)
    reference, ref_loss, _ = _run(None, moe, activation)
    state = {k: v for k, v in reference.state_dict().items() if "_extra_state" not in k}
    model, loss, grads = _run(fp8_recipe, moe, activation, state=state)
    assert torch.isfinite(torch.tensor(loss)) and abs(loss - ref_loss) < 0.05 * abs(ref_loss), (
        loss, ref_loss)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad}"
    coeffs = {n: g for n, g in grads.items() if "activation_func" in n}
    assert coeffs and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in coeffs.values())
    if moe:
        from polycom_megatron.layers.grouped_experts import PolyComTEGroupedMLP

        assert any(isinstance(m, PolyComTEGroupedMLP) for m in model.modules())
