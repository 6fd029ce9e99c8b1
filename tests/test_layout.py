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
