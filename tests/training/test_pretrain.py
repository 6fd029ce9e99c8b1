"""The Megatron launcher, as far as it runs without megatron.training: the PolyCom flags
checked and turned into Megatron flags before Megatron starts, unsupported flags refused,
the model provider building the right GPT from parsed arguments (one CPU rank, gloo),
the shared loss and batch code, and the message when megatron.training is missing.
At the end, with real Megatron-LM trees (see megatron_lm.py): ``pretrain --cpu`` runs
Megatron-LM's own loop, and resumes from its checkpoint."""

import argparse
import importlib.util
import math
import re

import pytest
import torch

import gpt_harness as h
import megatron_lm
from distributed import run_distributed
from polycom_megatron.config import PolyComConfig, add_polycom_args
from polycom_megatron.training import pretrain
from polycom_megatron.training.pretrain import NO_FUSION_FLAGS, prepare_argv

MEGATRON_ARGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192"]


# --------------------------------------------------------------------------------------
# Flags, before Megatron parses anything
# --------------------------------------------------------------------------------------


def test_polycom_flags_become_a_config_and_turn_fusion_off(capsys):
    argv = MEGATRON_ARGS + [
        "--polycom-activation", "polyrelu", "--polycom-order", "2",
        "--polycom-eps", "1e-5", "--polycom-kernel", "torch", "--polycom-coeff-mode", "expert",
    ]
    megatron_argv, polycom = prepare_argv(argv)
    assert polycom == PolyComConfig(
        activation="polyrelu", order=2, eps=1e-5, kernel="torch", coeff_mode="expert"
    )
    assert megatron_argv == argv + list(NO_FUSION_FLAGS)
    assert "bias-activation fusion is off" in capsys.readouterr().out


def test_fusion_flags_already_given_are_not_repeated(capsys):
    argv = MEGATRON_ARGS + ["--polycom-activation", "polynorm", "--no-bias-gelu-fusion"]
    megatron_argv, _ = prepare_argv(argv)
    assert megatron_argv.count("--no-bias-gelu-fusion") == 1
    assert megatron_argv[-1] == "--no-bias-swiglu-fusion"


def test_without_polycom_the_arguments_pass_through_untouched(capsys):
    argv = MEGATRON_ARGS + ["--swiglu"]
    assert prepare_argv(argv) == (argv, None)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("glu", ["--swiglu", "--quick-geglu"])
def test_gated_units_are_refused_with_polycom(glu):
    with pytest.raises(ValueError, match=f"{glu} cannot be combined with --polycom-activation"):
        prepare_argv(MEGATRON_ARGS + [glu, "--polycom-activation", "polynorm"])


def test_gated_form_keeps_fusion_off_and_refuses_a_second_gated_unit(capsys):
    argv = MEGATRON_ARGS + ["--polycom-activation", "polynorm", "--polycom-gated"]
    megatron_argv, polycom = prepare_argv(argv)
    assert polycom == PolyComConfig(activation="polynorm", gated=True)
    assert megatron_argv == argv + list(NO_FUSION_FLAGS)
    assert "polynorm-glu: bias-activation fusion is off" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--polycom-gated: both choose the gate's activation"):
        prepare_argv(argv + ["--swiglu"])
    with pytest.raises(ValueError, match="--polycom-gated needs a PolyCom activation"):
        prepare_argv(MEGATRON_ARGS + ["--polycom-gated"])


def test_main_reports_bad_polycom_flags_before_anything_starts(capsys):
    assert pretrain.main(MEGATRON_ARGS + ["--polycom-activation", "polynorm", "--swiglu"]) == 2
    assert "--swiglu cannot be combined" in capsys.readouterr().err
    assert pretrain.main(["--polycom-activation", "polynorm", "--polycom-order", "0"]) == 2
    assert "--polycom-order" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is not None,
    reason="megatron.training is importable here",
)
def test_main_explains_how_to_get_megatron_training(capsys):
    assert pretrain.main(MEGATRON_ARGS + ["--polycom-activation", "polynorm"]) == 2
    err = capsys.readouterr().err
    for hint in ("megatron.training", "Python >= 3.12", "megatron-core>=0.17", "PYTHONPATH",
                 "polycom-megatron train-cpu"):
        assert hint in err


# --------------------------------------------------------------------------------------
# Parsed Megatron arguments
# --------------------------------------------------------------------------------------


def megatron_args(*polycom_flags, **settings):
    """What Megatron's parser hands the model provider: our flags parsed by our own
    argparse group (as extra_args_provider), plus the Megatron settings the provider reads."""
    args = add_polycom_args(argparse.ArgumentParser()).parse_args(list(polycom_flags))
    base = dict(
        padded_vocab_size=h.VOCAB,
        max_position_embeddings=h.SEQ,
        transformer_impl="local",
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
    )
    for name, value in {**base, **settings}.items():
        setattr(args, name, value)
    return args


def test_supported_arguments_pass_the_check():
    assert pretrain.unsupported_settings(megatron_args("--polycom-activation", "polynorm")) == []


@pytest.mark.parametrize(
    "setting, flag",
    [
        (dict(spec=["my.module", "spec"]), "--spec"),
        (dict(mtp_num_layers=1), "--mtp-num-layers"),
        (dict(use_legacy_models=True), "--use-legacy-models"),
        (dict(sft=True), "--sft"),
        (dict(rotary_base=500000), "--rotary-base"),
        (dict(transformer_impl="inference_optimized"), "--transformer-impl inference_optimized"),
    ],
)
def test_unsupported_arguments_are_named(setting, flag):
    found = pretrain.unsupported_settings(megatron_args(**setting))
    assert len(found) == 1 and found[0].startswith(flag)
    with pytest.raises(pretrain.UnsupportedSettings, match=flag):
        pretrain.check_args(megatron_args(**setting))


def test_cpu_is_the_launchers_own_option():
    assert pretrain.split_launcher_args(["--cpu"] + MEGATRON_ARGS) == (MEGATRON_ARGS, True)
    assert pretrain.split_launcher_args(MEGATRON_ARGS) == (MEGATRON_ARGS, False)


def test_cpu_adds_what_megatron_needs_without_cuda(capsys):
    argv = MEGATRON_ARGS + ["--transformer-impl", "local", "--use-cpu-initialization"]
    completed = pretrain.cpu_argv(argv)
    assert completed[: len(argv)] == argv
    added = completed[len(argv):]
    for flag, *value in pretrain.CPU_FLAGS:
        assert completed.count(flag) == 1, flag
        if value:
            assert completed[completed.index(flag) + 1] == value[0]
    assert "--transformer-impl" not in added and "--use-cpu-initialization" not in added
    assert "note: --cpu: added --distributed-backend gloo" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--transformer-impl", "transformer_engine"),
                                         ("--distributed-backend", "nccl")])
def test_cpu_refuses_cuda_only_choices(capsys, flag, value):
    with pytest.raises(ValueError, match=f"--cpu runs without CUDA and needs {flag}"):
        pretrain.cpu_argv(MEGATRON_ARGS + [flag, value])
    assert pretrain.main(["--cpu", flag, value] + MEGATRON_ARGS) == 2
    assert f"drop {flag} or --cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The model provider, on one CPU rank
# --------------------------------------------------------------------------------------


def _describe(model):
    """Picklable facts about a built GPT, plus the loss of one forward pass."""
    layers = model.decoder.layers
    out = dict(
        mlp=[type(layer.mlp).__name__ for layer in layers],
        activation=[repr(getattr(layer.mlp, "activation_func", None)) for layer in layers],
        module_types=sorted({type(m).__name__ for m in model.modules()}),
        has_embedding=hasattr(model, "embedding"),
        has_output_layer=hasattr(model, "output_layer"),
        described=pretrain.describe_mlps(model),
        fc1_rows=[layer.mlp.linear_fc1.weight.shape[0] for layer in layers
                  if hasattr(layer.mlp, "linear_fc1")],
    )
    if out["has_output_layer"]:
        out["output_rows"] = model.output_layer.weight.shape[0]
    if out["has_embedding"] and out["has_output_layer"]:
        tokens, position_ids, mask, labels = h.batch()
        out["loss_shape"] = tuple(model(tokens, position_ids, mask, labels=labels).shape)
    return out


def _build_from_args(rank, world_size, flags, settings, config_overrides, stages):
    from polycom_megatron.training.pretrain import model_from_args

    h.init_parallel(h.Layout())
    config = h.transformer_config(h.Layout(), **config_overrides)
    args = megatron_args(*flags, **settings)
    results = {}
    for pre, post in stages:
        torch.manual_seed(h.SEED)
        results[(pre, post)] = _describe(model_from_args(args, config, pre, post))
    return results


def build_from_args(flags=(), settings=None, config_overrides=None, stages=((True, True),)):
    return run_distributed(
        _build_from_args, 1, tuple(flags), settings or {}, config_overrides or {}, stages,
        timeout_s=180,
    )


def test_provider_builds_polycom_mlps_from_the_flags():
    stages = ((True, True), (True, False), (False, True))
    built = build_from_args(
        ["--polycom-activation", "polynorm", "--polycom-order", "2"], stages=stages
    )
    full = built[(True, True)]
    assert full["mlp"] == ["PolyComMLP", "PolyComMLP"]
    assert full["described"] == "2 x PolyComMLP"
    assert all("polynorm" in a and "order=2" in a for a in full["activation"]), full["activation"]
    assert full["output_rows"] == h.VOCAB
    assert full["loss_shape"] == (h.BATCH, h.SEQ)
    # Pipeline stages: the first has the embedding only, the last the output layer only.
    assert built[(True, False)]["has_embedding"] and not built[(True, False)]["has_output_layer"]
    assert built[(False, True)]["has_output_layer"] and not built[(False, True)]["has_embedding"]


def test_provider_turns_on_the_gated_unit_for_the_gated_form():
    """--polycom-gated alone (no --swiglu) gives PolyNorm-GLU MLPs on a [gate; up] fc1."""
    full = build_from_args(["--polycom-activation", "polynorm", "--polycom-gated",
                            "--polycom-no-bias"])[(True, True)]
    assert full["mlp"] == ["PolyComMLP", "PolyComMLP"]
    assert all("polynorm-glu" in a and "bias=False" in a for a in full["activation"]), full
    assert full["fc1_rows"] == [2 * 48, 2 * 48]  # harness FFN width 48: gate and up
    assert full["loss_shape"] == (h.BATCH, h.SEQ)
    plain = build_from_args(["--polycom-activation", "polynorm"])[(True, True)]
    assert plain["fc1_rows"] == [48, 48]


def test_provider_without_polycom_builds_the_stock_mlp():
    full = build_from_args(["--polycom-activation", "none"])[(True, True)]
    assert full["mlp"] == ["MLP", "MLP"]
    assert full["described"] == "2 x MLP"
    assert not any("PolyCom" in name for name in full["module_types"])
    assert full["loss_shape"] == (h.BATCH, h.SEQ)


def test_provider_builds_polycom_experts_for_moe():
    moe = dict(
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
        moe_token_dispatcher_type="allgather",
    )
    full = build_from_args(["--polycom-activation", "polyrelu"], config_overrides=moe)[(True, True)]
    assert full["mlp"] == ["MoELayer", "MoELayer"]
    assert full["described"] == "2 x MoELayer[PolyComSequentialMLP]"
    assert any(name.startswith("PolyCom") and "MLP" in name for name in full["module_types"])
    assert full["loss_shape"] == (h.BATCH, h.SEQ)


# --------------------------------------------------------------------------------------
# Shared forward-step pieces (common.py)
# --------------------------------------------------------------------------------------


def test_loss_func_sums_masked_token_losses_for_megatrons_schedule():
    from polycom_megatron.training.common import loss_func

    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, num_tokens, report = loss_func(mask, losses)
    assert loss.item() == 8.0 and num_tokens.item() == 3
    assert report["lm loss"].tolist() == [8.0, 3.0]
    loss.backward()
    assert losses.grad.tolist() == mask.tolist()  # masked tokens get no gradient


def _get_batch_one_rank(rank, world_size, with_mask):
    from polycom_megatron.training.common import BatchShape, get_batch

    h.init_parallel(h.Layout())
    tokens, position_ids, mask, labels = h.batch()
    sample = dict(tokens=tokens, labels=labels, position_ids=position_ids,
                  loss_mask=torch.ones(h.BATCH, h.SEQ), attention_mask=mask)
    return get_batch(iter([sample]), BatchShape(h.BATCH, h.SEQ, with_mask)), sample


@pytest.mark.parametrize("with_mask", [True, False])
def test_get_batch_hands_a_single_stage_everything_it_needs(with_mask):
    batch, sample = run_distributed(_get_batch_one_rank, 1, with_mask, timeout_s=180)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(batch[key], sample[key])
    if with_mask:
        assert torch.equal(batch["attention_mask"], sample["attention_mask"])
    else:
        assert batch["attention_mask"] is None


# --------------------------------------------------------------------------------------
# Megatron-LM's own training loop on real release trees (skipped without them)
# --------------------------------------------------------------------------------------

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "192", "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-3",
    "--lr-decay-style", "constant", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    # 0.15's mock data draws token ids up to 4095: 4095 + the end-of-document id.
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "4095", "--mock-data",
    "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000", "--seed", "7",
    # Dropout off: Megatron-LM's loop restores the RNG inexactly on the CPU harness.
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
TINY_MOE_TP2_EP2 = [
    "--tensor-model-parallel-size", "2", "--sequence-parallel",
    "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96",
    "--moe-token-dispatcher-type", "allgather",
]
LM_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+)")


def _train(tree, cwd, ranks, argv):
    launcher = ["-m", "polycom_megatron.training.pretrain", "--cpu", *TINY_GPT, *argv]
    if ranks > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(ranks), *launcher]
    done = megatron_lm.run_python(tree, launcher, cwd=cwd)
    assert done.returncode == 0, (tree, done.stdout[-4000:], done.stderr[-4000:])
    losses = {int(step): float(loss) for step, loss in LM_LOSS.findall(done.stdout)}
    return done.stdout, losses


@megatron_lm.needs_trees
@pytest.mark.parametrize("setup", ["dense", "moe-tp2-ep2"])
def test_megatron_training_loop_on_cpu(tmp_path, setup):
    """``polycom-megatron pretrain --cpu`` runs Megatron-LM's pretrain() on PolyCom models,
    and a run resumed from its checkpoint continues from the saved weights and data."""
    ranks, extra = (1, []) if setup == "dense" else (2, TINY_MOE_TP2_EP2)
    expected = "2 x PolyComMLP" if setup == "dense" else "2 x MoELayer[PolyComSequentialMLP]"
    for tree in megatron_lm.trees():
        save = tmp_path / tree.name / "checkpoints"
        polycom = ["--polycom-activation", "polynorm", "--save", save, "--save-interval", "4"]
        log, losses = _train(tree, tmp_path, ranks,
                             [*extra, *polycom, "--train-iters", "6", "--exit-interval", "4"])
        assert f"decoder MLPs: {expected}" in log, tree
        # Mock tokens are close to uniform over 4096 ids: the loss stays near ln(4096) = 8.32
        # (that it falls on real text is train-cpu's test).
        assert sorted(losses) == [1, 2, 3, 4], (tree, losses)
        assert all(abs(loss - math.log(4096)) < 0.5 for loss in losses.values()), (tree, losses)

        log, resumed = _train(tree, tmp_path, ranks,
                              [*extra, *polycom, "--train-iters", "6", "--load", save])
        assert sorted(resumed) == [5, 6], (tree, resumed)
        _, straight = _train(tree, tmp_path, ranks, [*extra, "--polycom-activation",
                                                     "polynorm", "--train-iters", "6"])
        # Iteration 5 runs on the restored weights, data position and RNG: equal. Iteration
        # 6 also depends on the restored optimizer moments; on the CPU it differed by ~2e-3
        # in this loop (not in train-cpu's, which restores exactly): not asserted, open.
        assert resumed[5] == pytest.approx(straight[5], rel=1e-5), (tree, resumed, straight)
