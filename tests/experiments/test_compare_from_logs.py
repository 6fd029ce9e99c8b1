"""``polycom-megatron compare --from-logs`` on TensorBoard logs, run as a user runs it.

In CI (no Megatron-LM tree): event files written by the real writer Megatron-LM uses
(``torch.utils.tensorboard.SummaryWriter``), with its calls: every argument as a text
summary (``write_args_to_tensorboard``), the validation loss and its ``vs samples`` twin,
and the test-set loss logged again under the same tag at the last iteration
(``evaluate_and_print_results``). With trees: logs of real ``pretrain --cpu`` runs.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

import cli_run
import megatron_lm

pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

SEQ, BATCH = 32, 4
# Megatron-LM's arguments for a 2-layer GPT (the ones the parameter count reads, and more).
ARGS = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
    "group_query_attention": False, "num_query_groups": 1, "padded_vocab_size": 4096,
    "seq_length": SEQ, "global_batch_size": BATCH, "add_bias_linear": False,
    "add_qkv_bias": False, "normalization": "RMSNorm", "position_embedding_type": "rope",
    "untie_embeddings_and_output_weights": True, "qk_layernorm": False, "num_experts": None,
    "polycom_order": 3, "polycom_bias": True, "polycom_gated": False, "lr": 0.005,
    "multi_latent_attention": False, "moe_layer_freq": 1, "mtp_num_layers": None,
}
# (activation args, ffn width): SwiGLU at width 128, PolyNorm at the matched 192.
VARIANTS = {"swiglu": ({"swiglu": True, "polycom_activation": "none"}, 128),
            "polynorm": ({"swiglu": False, "polycom_activation": "polynorm"}, 192)}
# Final validation losses by (activation, seed); the test-set value is 9.0 everywhere.
FINAL = {("swiglu", 1): 5.0, ("swiglu", 2): 5.2, ("swiglu", 3): 5.1,
         ("polynorm", 1): 4.9, ("polynorm", 2): 5.15, ("polynorm", 3): 4.95}
ITERATION_TIME = {"swiglu": 0.5, "polynorm": 0.64}  # seconds


def write_megatron_log(directory: Path, activation: str, seed: int, iters: int = 20,
                       eval_interval: int = 10) -> None:
    extra, width = VARIANTS[activation]
    args = {**ARGS, **extra, "ffn_hidden_size": width, "seed": seed,
            "tensorboard_dir": str(directory)}
    writer = SummaryWriter(log_dir=str(directory))
    for name, value in args.items():
        writer.add_text(name, str(value), global_step=0)
    for iteration in range(1, iters + 1):
        samples = iteration * BATCH
        writer.add_scalar("lm loss", 8.0 - iteration * 0.1, iteration)
        writer.add_scalar("lm loss vs samples", 8.0 - iteration * 0.1, samples)
        if iteration > 1:
            # A stall (an evaluation) at one iteration: the median ignores it.
            slow = 10.0 if iteration == 11 else 1.0
            writer.add_scalar("iteration-time", ITERATION_TIME[activation] * slow, iteration)
        if iteration % eval_interval == 0:
            loss = FINAL[activation, seed] if iteration == iters else 6.0 + seed / 10
            writer.add_scalar("lm loss validation", loss, iteration)
            writer.add_scalar("lm loss validation vs samples", loss, samples)
    # After training: the test split, logged under the validation tag at the same iteration.
    writer.add_scalar("lm loss validation", 9.0, iters)
    writer.add_scalar("lm loss validation vs samples", 9.0, iters * BATCH)
    writer.close()


@pytest.fixture(scope="module")
def cluster_logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    for activation, seed in FINAL:
        write_megatron_log(root / f"{activation}-s{seed}", activation, seed)
    return root


def _compare(*argv, timeout=120):
    return cli_run.run([cli_run.EXE, "compare", *map(str, argv)], timeout=timeout)


def test_report_from_megatron_lm_logs(cluster_logs, tmp_path):
    done = _compare("--from-logs", cluster_logs, "--output-dir", tmp_path / "report")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in VARIANTS}
    assert list(rows) == ["swiglu", "polynorm"]  # the baseline first

    summary = json.loads((tmp_path / "report" / "compare.json").read_text())["summary"]
    swiglu = [FINAL["swiglu", s] for s in (1, 2, 3)]
    polynorm = [FINAL["polynorm", s] for s in (1, 2, 3)]
    deltas = [p - s for p, s in zip(polynorm, swiglu)]
    # TensorBoard stores scalars as float32.
    approx = lambda value: pytest.approx(value, rel=1e-6, abs=1e-6)  # noqa: E731
    assert summary["polynorm"]["loss_mean"] == approx(statistics.fmean(polynorm))
    assert summary["polynorm"]["loss_std"] == approx(statistics.stdev(polynorm))
    assert summary["polynorm"]["delta_mean"] == approx(statistics.fmean(deltas))
    assert summary["polynorm"]["delta_std"] == approx(statistics.stdev(deltas))
    assert summary["polynorm"]["delta_n"] == 3 and summary["polynorm"]["seeds"] == [1, 2, 3]
    assert summary["swiglu"]["delta_mean"] is None
    # tokens/s: global batch x seq length / median iteration time.
    assert summary["swiglu"]["tokens_per_s"] == pytest.approx(BATCH * SEQ / 0.5)
    # Embeddings 2 x 4096 x 64, the final norm, and per layer 2 norms, attention (qkv
    # 64 x 192 + proj 64 x 64) and the FFN: SwiGLU 3 x 64 x 128; PolyNorm 2 x 64 x 192 + 4.
    shared = 2 * 4096 * 64 + 64 + 2 * (2 * 64 + 64 * 192 + 64 * 64)
    assert summary["swiglu"]["num_parameters"] == shared + 2 * 3 * 64 * 128
    assert summary["polynorm"]["num_parameters"] == shared + 2 * (2 * 64 * 192 + 4)
    assert f"{shared + 2 * 3 * 64 * 128:,}" in rows["swiglu"]
    assert f"{statistics.fmean(polynorm):.4f} ± {statistics.stdev(polynorm):.4f}" in rows["polynorm"]
    assert f"{statistics.fmean(deltas):+.4f} ± {statistics.stdev(deltas):.4f}" in rows["polynorm"]

    runs = json.loads((tmp_path / "report" / "compare.json").read_text())["runs"]
    first = next(r for r in runs if r["activation"] == "polynorm" and r["seed"] == 1)
    # The first value at an iteration is the validation loss, not the test split's 9.0.
    assert [(p["iteration"], p["tokens"]) for p in first["validation"]] == [
        (10, 10 * BATCH * SEQ), (20, 20 * BATCH * SEQ)]
    assert [p["loss"] for p in first["validation"]] == [approx(6.1), approx(4.9)]
    png = (tmp_path / "report" / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_bad_log_folders_are_named(cluster_logs, tmp_path):
    done = _compare("--from-logs", tmp_path / "absent", "--output-dir", tmp_path / "r")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "absent: no such directory" in done.stderr.strip().splitlines()[-1]

    (tmp_path / "empty").mkdir()
    done = _compare("--from-logs", tmp_path / "empty", "--output-dir", tmp_path / "r")
    assert done.returncode == 2 and "no TensorBoard event files" in done.stderr

    # The same run passed twice under two names: pairing by seed would be ambiguous.
    copy = tmp_path / "copy"
    write_megatron_log(copy, "swiglu", 1)
    done = _compare("--from-logs", cluster_logs, copy, "--output-dir", tmp_path / "r")
    assert done.returncode == 2
    assert re.search(r"two swiglu runs with seed 1: .* pass only one", done.stderr), done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--from-logs", ".", "--seeds", "2"], "--from-logs reports on finished runs; --seeds does not apply"),
    (["--activations", "swiglu,relu"], "unknown activation 'relu'"),
    (["--seed", "3"], "--seed is set by compare for each run; drop it"),
    (["--world-size", "3"], "--global-batch 16 is not divisible by --micro-batch x DP = 4 x 3"),
])
def test_usage_errors_are_one_line(tmp_path, argv, message):
    done = _compare(*argv, "--output-dir", tmp_path / "r")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "r").exists()  # refused before anything is written


# --------------------------------------------------------------------------------------
# Real Megatron-LM pretrain --cpu logs (skipped without trees)
# --------------------------------------------------------------------------------------

PARAMETERS = re.compile(r"number of parameters on \(tensor, pipeline\) model parallel rank "
                        r"\(0, 0\): (\d+)")


@megatron_lm.needs_trees
def test_report_from_real_pretrain_logs(tmp_path):
    tree = next(t for t in megatron_lm.trees() if t.name == "core_v0.16.1")
    printed = {}
    for name, flags in {"swiglu": ["--polycom-activation", "none", "--swiglu",
                                   "--ffn-hidden-size", "128"],
                        "polynorm": ["--polycom-activation", "polynorm",
                                     "--ffn-hidden-size", "192"]}.items():
        argv = ["-m", "polycom_megatron.training.pretrain", "--cpu", *megatron_lm.TINY_GPT,
                *flags, "--train-iters", "8", "--eval-interval", "4", "--eval-iters", "1",
                "--tensorboard-dir", tmp_path / "logs" / name, "--log-timers-to-tensorboard"]
        done = megatron_lm.run_python(tree, argv, cwd=tmp_path)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        printed[name] = int(PARAMETERS.search(done.stdout).group(1))

    done = _compare("--from-logs", tmp_path / "logs", "--output-dir", tmp_path / "report")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert list(result["summary"]) == ["swiglu", "polynorm"]
    for name, count in printed.items():
        # The count from the logged arguments is the one Megatron-LM printed.
        assert result["summary"][name]["num_parameters"] == count, (name, result["summary"])
        assert result["summary"][name]["tokens_per_s"] > 0
    for run in result["runs"]:
        assert run["seed"] == 7  # TINY_GPT's
        assert [p["iteration"] for p in run["validation"]] == [4, 8]
        assert [p["tokens"] for p in run["validation"]] == [4 * 4 * 32, 8 * 4 * 32]
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000


@megatron_lm.needs_trees
@pytest.mark.parametrize("coeff_mode", ["layer", "expert"])
def test_parameter_count_of_real_moe_logs(tmp_path, coeff_mode):
    """MoE (4 experts on one rank, so Megatron-LM's printed count is the whole model): the
    count from the logged arguments, one coefficient set per layer or per expert."""
    tree = next(t for t in megatron_lm.trees() if t.name == "core_v0.16.1")
    argv = ["-m", "polycom_megatron.training.pretrain", "--cpu", *megatron_lm.TINY_GPT,
            "--polycom-activation", "polynorm", "--polycom-coeff-mode", coeff_mode,
            "--num-experts", "4", "--moe-ffn-hidden-size", "96", "--moe-router-topk", "2",
            "--moe-token-dispatcher-type", "allgather", "--train-iters", "2",
            "--eval-interval", "2", "--eval-iters", "1", "--tensorboard-dir", tmp_path / "tb"]
    done = megatron_lm.run_python(tree, argv, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    from polycom_megatron.experiments import tblogs

    run = tblogs.read_run(tmp_path / "tb")
    assert run.activation == "polynorm"
    assert run.num_parameters == int(PARAMETERS.search(done.stdout).group(1))
