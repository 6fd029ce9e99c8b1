"""The CPU training job end to end on 2 gloo ranks: a run cut in half and resumed from
its checkpoint reproduces the uninterrupted run step for step; the loss falls; tensor
parallelism and data parallelism train the same model; bad layouts are refused up front.

Every run is a real ``cpu_loop.run``: data prepared by data.py, megatron-core's GPTDataset,
DDP, optimizer, scheduler, schedule and dist_checkpointing, on spawned ranks with a deadline.
"""

import json
import math
import re
from pathlib import Path

import pytest

from polycom_megatron.training import checkpoint, cpu_loop
from polycom_megatron.training.cpu_job import CpuJob

STEPS = 8
DEADLINE_S = 240  # per run; a healthy one takes seconds

pytestmark = pytest.mark.timeout(900)


def small_job(output_dir: Path, data_dir: Path, **changes) -> CpuJob:
    """A model small enough for seconds per run, with every part of the default job:
    PolyNorm experts on expert parallelism (EP=2 over DP=2), dropout (so the RNG state in
    the checkpoint matters), micro-batches, warm-up and cosine decay."""
    fields = dict(
        output_dir=output_dir,
        data=data_dir,
        steps=STEPS,
        world_size=2,
        tp=1,
        ep=2,
        num_experts=4,
        layers=2,
        hidden=64,
        heads=4,
        seq_len=64,
        micro_batch=2,
        global_batch=8,
        lr=1e-2,
        lr_decay_steps=STEPS,
        dropout=0.1,
        vocab_size=1024,
        log_interval=100,
        eval_iters=2,
    )
    fields.update(changes)
    return CpuJob(**fields).validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    cpu_loop.prepare_data(small_job(path.parent / "unused", path), quiet=True)
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """STEPS steps in one go, validating every 2 steps (the halves below validate only at
    their ends: equal training losses show that validation leaves training untouched)."""
    job = small_job(tmp_path_factory.mktemp("straight"), data_dir, eval_interval=2)
    return cpu_loop.run(job, prepare_quietly=True, deadline_s=DEADLINE_S)


@pytest.fixture(scope="module")
def halves(tmp_path_factory, data_dir):
    """(run dir, first half, second half): STEPS // 2 steps, then --resume to STEPS."""
    out = tmp_path_factory.mktemp("halves")
    first = cpu_loop.run(
        small_job(out, data_dir, steps=STEPS // 2, save_interval=2),
        prepare_quietly=True, deadline_s=DEADLINE_S,
    )
    second = cpu_loop.run(
        small_job(out, data_dir, resume=True), prepare_quietly=True, deadline_s=DEADLINE_S
    )
    return out, first, second


def test_resumed_run_reproduces_the_uninterrupted_run(straight, halves):
    half = STEPS // 2
    tmp_path, first, second = halves
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "iter_0000002").is_dir(), "--save-interval 2 saves along the way"
    assert first.checkpoint_path == str(ckpts / "iter_0000004")
    assert second.resumed_from == str(ckpts / "iter_0000004")
    assert (second.start_iteration, second.final_iteration) == (half, STEPS)
    assert checkpoint.latest_iteration(ckpts) == STEPS

    assert list(first.losses) == list(range(1, half + 1))
    assert list(second.losses) == list(range(half + 1, STEPS + 1))
    for part in (first, second):
        for step, loss in part.losses.items():
            assert loss == pytest.approx(straight.losses[step], rel=1e-6, abs=1e-7), step
            assert part.grad_norms[step] == pytest.approx(straight.grad_norms[step], rel=1e-6), step


def test_validation_is_held_out_deterministic_and_unaffected_by_resume(straight, halves):
    _, first, second = halves
    assert sorted(straight.validation) == [2, 4, 6, 8]
    assert sorted(first.validation) == [4] and sorted(second.validation) == [8]
    for part in (first, second):
        for step, found in part.validation.items():
            assert found["loss"] == pytest.approx(straight.validation[step]["loss"], rel=1e-6)
    for step, found in straight.validation.items():
        assert found["ppl"] == pytest.approx(math.exp(found["loss"]), rel=1e-12)
        # Held-out documents: above the training loss once training has fit a little.
        assert found["loss"] > 0
    assert straight.validation[8]["loss"] < straight.validation[2]["loss"]
    # --eval-iters 2 global batches of 8 sequences of 64 tokens each time.
    assert straight.validation_tokens == 2 * 8 * 64


def test_summary_json_holds_what_a_comparison_reads(straight):
    summary = json.loads((Path(straight.checkpoint_path).parents[1] / "summary.json").read_text())
    assert summary["activation"] == "polynorm" and summary["ffn_hidden"] == 128
    assert summary["seed"] == 1234 and summary["split"] == "90,10,0"
    assert summary["tokens_per_s"] == pytest.approx(straight.tokens_per_s) and summary["tokens_per_s"] > 0
    assert {int(k): v for k, v in summary["validation"].items()} == straight.validation
    assert {int(k): v for k, v in summary["losses"].items()} == straight.losses
    assert len(summary["learning_rates"]) == STEPS


def test_loss_falls(straight):
    losses = list(straight.losses.values())
    assert len(losses) == STEPS
    assert max(losses[-2:]) < losses[0] - 0.5, losses


def test_run_reports_and_checkpoints(straight):
    assert straight.checkpoint_path and Path(straight.checkpoint_path).is_dir()
    assert straight.checkpoint_bytes == checkpoint.size_on_disk(straight.checkpoint_path) > 0
    assert straight.tokens_trained == STEPS * 8 * 64
    summary = json.loads((Path(straight.checkpoint_path).parents[1] / "summary.json").read_text())
    assert summary["final_iteration"] == STEPS
    text = straight.describe()
    assert "4 experts, top-2, EP 2" in text and "tokens/s" in text and "MiB" in text


def test_tensor_parallel_trains_the_same_model_as_data_parallel(data_dir, tmp_path):
    """Dense model (expert weights are drawn per expert-parallel rank, so MoE layouts do
    not start from the same weights): TP=2 with sequence parallelism, one DP rank and
    batches broadcast across TP, against DP=2 without TP. Same global batches, same
    initial weights (drawn whole on CPU, then split), so the same losses."""
    runs = {}
    for tp in (1, 2):
        job = small_job(tmp_path / f"tp{tp}", data_dir, tp=tp, ep=1, num_experts=0, dropout=0.0)
        runs[tp] = cpu_loop.run(job, prepare_quietly=True, deadline_s=DEADLINE_S)
    assert "DP 2" in runs[1].layout and "TP 2" in runs[2].layout
    for step, loss in runs[1].losses.items():
        assert runs[2].losses[step] == pytest.approx(loss, rel=1e-4), step
    # Validation: the loss of the last stage's TP rank 0, token-weighted over DP ranks.
    assert list(runs[1].validation) == list(runs[2].validation) == [STEPS]
    assert runs[2].validation[STEPS]["loss"] == pytest.approx(
        runs[1].validation[STEPS]["loss"], rel=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--world-size", "3"], "not divisible by TP x PP"),
        (["--world-size", "8"], "at most 4 ranks"),
        (["--tp", "2", "--heads", "3", "--hidden", "96"], "--heads 3 is not divisible by --tp 2"),
        (["--num-experts", "3", "--ep", "2", "--tp", "1"], "--num-experts 3 is not divisible by --ep 2"),
        (["--num-experts", "4", "--ep", "4", "--tp", "2"], "--ep 4 must divide the data-parallel size 2"),
        (["--global-batch", "6"], "--global-batch 6 is not divisible"),
        (["--layers", "3", "--pp", "2", "--tp", "1"], "--layers 3 is not divisible by --pp 2"),
    ],
)
def test_bad_layouts_are_refused_before_any_rank_starts(flags, message, tmp_path, capsys):
    assert cpu_loop.main(["--output-dir", str(tmp_path)] + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists(), "nothing is prepared for a job that cannot run"


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    assert cpu_loop.main(["--output-dir", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_train_cpu_command_trains_the_gated_form(data_dir, tmp_path):
    """``polycom-megatron train-cpu --polycom-gated``, as a user runs it: a PolyNorm-GLU
    MoE GPT (second order, as the --pnglu form) on EP=2; exit code 0, the loss falls."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("polycom-megatron", path=str(Path(sys.executable).parent))
    assert exe, "the polycom-megatron executable is installed next to this Python"
    argv = [exe, "train-cpu", "--output-dir", str(tmp_path), "--data-dir", str(data_dir),
            "--steps", "6", "--world-size", "2", "--tp", "1", "--ep", "2", "--num-experts", "4",
            "--hidden", "64", "--heads", "4", "--seq-len", "64", "--micro-batch", "2",
            "--global-batch", "8", "--lr", "1e-2", "--vocab-size", "1024", "--log-interval", "1",
            "--polycom-activation", "polynorm", "--polycom-gated", "--polycom-order", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "polynorm-glu" in done.stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_iteration"] == 6
    assert summary["activation"] == "polynorm-glu" and summary["ffn_hidden"] == 128
    assert list(summary["validation"]) == ["6"]
    assert "validation loss at iteration     6 | lm loss value: " in done.stdout


# Megatron-LM's TensorBoard tags (megatron/training/training.py: training_log and
# evaluate_and_print_results with --log-validation-ppl-to-tensorboard).
MEGATRON_SCALARS = [
    "lm loss", "lm loss vs samples", "learning-rate", "learning-rate vs samples",
    "grad-norm", "grad-norm vs samples", "batch-size", "batch-size vs samples",
    "iteration-time", "lm loss validation", "lm loss validation vs samples",
    "lm loss validation ppl", "lm loss validation ppl vs samples",
]


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(run_dir / "tensorboard"),
                                   size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator, found


def scalars(accumulator, tag: str) -> dict:
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def test_tensorboard_events_carry_megatron_tags_and_the_summary_values(straight):
    pytest.importorskip("tensorboard")
    from tensorboard.util.tensor_util import make_ndarray

    run_dir = Path(straight.checkpoint_path).parents[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tensorboard_dir"] == str(run_dir / "tensorboard")
    accumulator, files = events(run_dir)
    assert len(files) == 1, "one writer (the last rank)"
    assert sorted(accumulator.Tags()["scalars"]) == sorted(MEGATRON_SCALARS)

    def approx(values):
        return pytest.approx(values, rel=1e-6)  # event files hold float32

    steps = list(range(1, STEPS + 1))
    assert scalars(accumulator, "lm loss") == approx({int(k): v for k, v in summary["losses"].items()})
    assert scalars(accumulator, "grad-norm") == approx({int(k): v for k, v in summary["grad_norms"].items()})
    assert scalars(accumulator, "learning-rate") == approx(
        {int(k): v for k, v in summary["learning_rates"].items()})
    assert scalars(accumulator, "lm loss vs samples") == approx(
        {8 * s: summary["losses"][str(s)] for s in steps})
    validation = {int(k): v for k, v in summary["validation"].items()}
    assert scalars(accumulator, "lm loss validation") == approx({s: v["loss"] for s, v in validation.items()})
    assert scalars(accumulator, "lm loss validation ppl") == approx({s: v["ppl"] for s, v in validation.items()})
    assert scalars(accumulator, "lm loss validation ppl vs samples") == approx(
        {8 * s: v["ppl"] for s, v in validation.items()})
    times = scalars(accumulator, "iteration-time")
    assert list(times) == [STEPS] and times[STEPS] > 0  # --log-interval 100: at the end

    texts = {tag[: -len("/text_summary")]: make_ndarray(accumulator.Tensors(tag)[0].tensor_proto)
             .item().decode() for tag in accumulator.Tags()["tensors"]}
    expected = dict(
        seq_length="64", global_batch_size="8", micro_batch_size="2", ffn_hidden_size="128",
        hidden_size="64", num_layers="2", num_experts="4", swiglu="False",
        polycom_activation="polynorm", polycom_gated="False", seed="1234", world_size="2",
        tensor_model_parallel_size="1", expert_model_parallel_size="2", split="90,10,0",
        eval_iters="2", eval_interval="2", train_iters=str(STEPS),
    )
    assert {k: texts.get(k) for k in expected} == expected


def test_a_resumed_run_appends_to_the_same_tensorboard_dir(straight, halves):
    pytest.importorskip("tensorboard")
    run_dir, _, _ = halves
    accumulator, files = events(run_dir)
    assert len(files) == 2, "a new events file per run, in the same directory"
    losses = scalars(accumulator, "lm loss")
    assert list(losses) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(straight.losses, rel=1e-6)
    assert sorted(scalars(accumulator, "lm loss validation")) == [STEPS // 2, STEPS]
