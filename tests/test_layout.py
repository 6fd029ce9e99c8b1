"""polycom_megatron.layout: every rule fires on its own and names the knob to change."""

import pytest

from polycom_megatron import layout

# The paper's dense reference on 2 nodes x 8 GPUs, and the MoE reference with EP=8.
DENSE = dict(world_size=16, num_layers=24, num_heads=16, ffn_hidden_size=8256,
             micro_batch=2, global_batch=64, seq_length=4096)
MOE = dict(world_size=16, ep=8, num_layers=16, num_heads=16, num_experts=64,
           ffn_hidden_size=1536, moe_ffn_hidden_size=1536, micro_batch=1,
           global_batch=1024, seq_length=4096)


def test_reference_layouts_pass_with_their_derived_sizes():
    assert layout.check_layout(**DENSE) == []
    assert layout.require_layout(**DENSE) == layout.Layout(
        data_parallel=16, expert_data_parallel=16, grad_accumulation_steps=2)
    assert layout.require_layout(**MOE) == layout.Layout(
        data_parallel=16, expert_data_parallel=2, grad_accumulation_steps=64)
    tp_pp = dict(DENSE, tp=2, pp=2, sequence_parallel=True)
    assert layout.require_layout(**tp_pp).data_parallel == 4


@pytest.mark.parametrize(
    "base, change, expected",
    [
        (DENSE, dict(tp=3), "TP x PP x CP = 3 x 1 x 1 = 3"),
        (DENSE, dict(pp=5), "NUM_LAYERS=24 is not divisible by PP=5"),
        (DENSE, dict(world_size=12, tp=12), "NUM_HEADS=16 is not divisible by TP=12"),
        (DENSE, dict(num_query_groups=3), "NUM_HEADS=16 is not divisible by NUM_QUERY_GROUPS=3"),
        (DENSE, dict(tp=8, num_query_groups=4, sequence_parallel=True),
         "NUM_QUERY_GROUPS=4 is not divisible by TP=8"),
        (DENSE, dict(tp=2, ffn_hidden_size=8255, sequence_parallel=True),
         "FFN_HIDDEN=8255 is not divisible by TP=2"),
        (DENSE, dict(global_batch=60), "GLOBAL_BATCH=60 is not divisible by MICRO_BATCH x DP = 2 x 16"),
        (DENSE, dict(sequence_parallel=True), "SP=1 needs TP > 1"),
        (DENSE, dict(cp=2, world_size=16, seq_length=4094), "SEQ_LEN=4094 is not divisible by 2 x CP = 4"),
        (DENSE, dict(ep=2), "EP=2 needs an MoE model"),
        (DENSE, dict(etp=2), "ETP=2 needs an MoE model"),
        (MOE, dict(ep=5, world_size=20), "NUM_EXPERTS=64 is not divisible by EP=5"),
        (MOE, dict(ep=16, etp=2), "ETP x EP x PP = 2 x 16 x 1 = 32"),
        (MOE, dict(etp=2, ep=4, moe_ffn_hidden_size=1535), "MOE_FFN_HIDDEN=1535 is not divisible by ETP=2"),
        (MOE, dict(tp=2), "an MoE model with TP=2 needs SP=1"),
        (DENSE, dict(micro_batch=0), "MICRO_BATCH=0 must be a positive integer"),
        (DENSE, dict(num_query_groups=0), "NUM_QUERY_GROUPS=0 must be a positive integer"),
    ],
)
def test_each_rule_names_its_knob(base, change, expected):
    problems = layout.check_layout(**dict(base, **change))
    assert any(expected in problem for problem in problems), problems


def test_all_problems_are_reported_together():
    problems = layout.check_layout(**dict(DENSE, tp=3, pp=5))
    assert len(problems) >= 3  # world size, layers, heads: one message each
    with pytest.raises(layout.LayoutError) as error:
        layout.require_layout(**dict(DENSE, tp=3, pp=5))
    for problem in problems:
        assert problem in str(error.value)


def test_cli_ok_and_failure(capsys):
    assert layout.main(["--world-size", "16", "--num-layers", "24", "--num-heads", "16",
                        "--micro-batch", "2", "--global-batch", "64"]) == 0
    assert "DP=16" in capsys.readouterr().out
    assert layout.main(["--world-size", "16", "--pp", "5", "--num-layers", "24",
                        "--num-heads", "16", "--micro-batch", "2", "--global-batch", "64"]) == 1
    assert "PP=5" in capsys.readouterr().err


# --- FP8 -------------------------------------------------------------------------------

FP8 = dict(DENSE, hidden_size=2048, activation="polynorm", precision="fp8",
           compute_capability="9.0", sequence_parallel=True)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(tp=8), "FFN_HIDDEN=8256 at TP=8 gives 1032 per rank: FP8 GEMMs (FP8_RECIPE=delayed) "
                     "need every per-rank GEMM dimension divisible by 16; use FFN_HIDDEN=8320 = "
                     "polycom_megatron.matched_ffn_hidden_size(5504, multiple_of=128)"),
        (dict(tp=4, fp8_recipe="mxfp8", compute_capability="10.0"),
         "FFN_HIDDEN=8256 at TP=4 gives 2064 per rank"),
        (dict(tp=2, fp8_recipe="mxfp8"), "MXFP8 (FP8_RECIPE=mxfp8) needs compute capability "
                                         "10.0+, and this device is 9.0 (from COMPUTE_CAPABILITY=9.0)"),
        (dict(tp=2, compute_capability="8.0"), "FP8 (PRECISION=fp8) needs compute capability 8.9+"),
        (dict(tp=2, hidden_size=2056, num_heads=8), "HIDDEN=2056"),
        (dict(tp=8, hidden_size=2048, num_heads=16, num_query_groups=8, kv_channels=68,
              ffn_hidden_size=8320), "attention at TP=8 gives per-rank widths 136 (projection) and 272 (QKV)"),
        (dict(tp=2, fp8_recipe="nvfp4"), "FP8_RECIPE=nvfp4 is not one of"),
        (dict(precision="fp16"), "PRECISION=fp16 is not one of"),
        (dict(MOE, tp=1, etp=8, hidden_size=2048, precision="fp8", moe_ffn_hidden_size=1544,
              compute_capability="9.0", ffn_hidden_size=1536, activation="polynorm"),
         "MOE_FFN_HIDDEN=1544 at ETP=8 gives 193 per rank"),
    ],
)
def test_fp8_rules_name_the_knob_and_a_width_that_works(change, expected):
    problems = layout.check_layout(**dict(FP8, **change))
    assert any(expected in problem for problem in problems), problems


def test_fp8_accepts_aligned_layouts_and_bf16_ignores_alignment():
    assert layout.check_layout(**dict(FP8, tp=8, ffn_hidden_size=8320)) == []
    assert layout.check_layout(**dict(FP8, tp=4)) == []
    assert layout.check_layout(**dict(FP8, tp=8, precision="bf16")) == []
    assert layout.check_layout(**dict(FP8, tp=2, fp8_recipe="mxfp8", compute_capability="10.0")) == []


def test_suggested_width_keeps_the_matched_rule():
    from polycom_megatron.config import matched_ffn_hidden_size

    assert layout.aligned_width(8256, 128, "polynorm").startswith(
        f"{matched_ffn_hidden_size(5504, multiple_of=128)} = ")
    assert layout.aligned_width(5504, 256, "swiglu") == "5632"  # not a PolyCom width


def test_device_capability_sources(monkeypatch):
    import torch

    assert layout.device_capability("10.0") == ((10, 0), "COMPUTE_CAPABILITY=10.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layout.device_capability(None) == (None, "no CUDA device visible here")
    with pytest.raises(ValueError, match="COMPUTE_CAPABILITY=hopper is not of the form 9.0"):
        layout.device_capability("hopper")


def test_cli_fp8(capsys):
    base = ["--world-size", "16", "--num-layers", "24", "--num-heads", "16", "--micro-batch", "2",
            "--global-batch", "64", "--hidden-size", "2048", "--ffn-hidden-size", "8256",
            "--activation", "polynorm", "--precision", "fp8", "--tp", "8", "--sequence-parallel", "1"]
    assert layout.main(base) == 1
    assert "use FFN_HIDDEN=8320" in capsys.readouterr().err
    assert layout.main(base + ["--compute-capability", "hopper"]) == 1
    assert "COMPUTE_CAPABILITY=hopper" in capsys.readouterr().err
