"""The layout changes README's "What is never lost" claims reshard (model and optimizer
state), each resumed from a checkpoint and compared step by step with the run that saved
it and went on; and the changes it claims are refused before loading.

One base run per family (4 steps, checkpoint at 2 and 4, dropout off so the RNG state
does not matter when the world size changes); each resume starts from iteration 2.
"""

import shutil
from pathlib import Path

import pytest

from polycom_megatron.training import checkpoint_integrity, cpu_loop
from polycom_megatron.training.checkpoint_integrity import CheckpointError
from polycom_megatron.training.cpu_job import CpuJob

STEPS = 4
DEADLINE_S = 300

pytestmark = pytest.mark.timeout(900)

FAMILIES = {
    "dense": dict(world_size=4, tp=2, num_experts=0, ep=1),
    "moe": dict(world_size=2, tp=1, num_experts=4, ep=2),
}


def job(output_dir: Path, data_dir: Path, **layout) -> CpuJob:
    fields = dict(
        output_dir=output_dir, data=data_dir, steps=STEPS, save_interval=2, layers=2,
        hidden=32, heads=4, seq_len=32, micro_batch=1, global_batch=4, vocab_size=512,
        lr=1e-2, lr_decay_steps=STEPS, dropout=0.0, log_interval=100, eval_iters=2,
    )
    fields.update(layout)
    return CpuJob(**fields).validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    cpu_loop.prepare_data(job(path.parent / "unused", path, **FAMILIES["moe"]), quiet=True)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """family -> (run dir, summary) of its 4-step run."""
    runs = {}
    for family, layout in FAMILIES.items():
        out = tmp_path_factory.mktemp(family)
        runs[family] = out, cpu_loop.run(job(out, data_dir, **layout), prepare_quietly=True,
                                         deadline_s=DEADLINE_S)
    return runs


def from_iteration_2(base_dir: Path, tmp_path: Path) -> Path:
    """A copy of the base run whose newest checkpoint is iteration 2."""
    shutil.copytree(base_dir, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "iter_0000004")
    checkpoint_integrity.write_tracker(ckpts, 2)
    return tmp_path / "run"


@pytest.mark.parametrize(
    "family, change",
    [
        ("dense", dict(world_size=4, tp=1, pp=2)),  # TP 2 -> 1, PP 1 -> 2
        ("dense", dict(world_size=2, tp=1)),  # TP 2 -> 1, world 4 -> 2 (DP 2)
        ("moe", dict(world_size=4, tp=2)),  # TP 1 -> 2, world 2 -> 4
        ("moe", dict(world_size=4, ep=4)),  # EP 2 -> 4, DP 2 -> 4
    ],
    ids=["dense-tp-pp", "dense-tp-dp", "moe-tp-world", "moe-ep-dp"],
)
def test_layout_change_reshards_model_and_optimizer(base, data_dir, tmp_path, family, change):
    base_dir, straight = base[family]
    run_dir = from_iteration_2(base_dir, tmp_path)
    layout = dict(FAMILIES[family], **change)
    resumed = cpu_loop.run(job(run_dir, data_dir, resume=True, **layout), prepare_quietly=True,
                           deadline_s=DEADLINE_S)
    assert resumed.start_iteration == 2 and list(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-5), step
        assert resumed.grad_norms[step] == pytest.approx(straight.grad_norms[step], rel=1e-4), step
    # Validation at the end, from the last stage, token-weighted over DP: layout-independent.
    assert resumed.validation[4]["loss"] == pytest.approx(straight.validation[4]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ep=1), "saved at --ep 2, this run asks for --ep 1"),
        (dict(ep=1, tp=2), "does not reshard between EP = 1 and EP > 1"),
    ],
)
def test_layout_changes_that_do_not_reshard_are_refused_before_loading(base, data_dir, change, message):
    base_dir, _ = base["moe"]
    layout = dict(FAMILIES["moe"], **change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cpu_loop.run(job(base_dir, data_dir, resume=True, steps=6, **layout), deadline_s=DEADLINE_S)


def test_a_tp_change_that_repads_the_vocabulary_is_refused():
    from polycom_megatron.training.cpu_reshard import layout_problems

    saved = dict(world_size=2, tp=1, pp=1, ep=1, dp=2, padded_vocab_size=640)
    now = dict(saved, tp=2, dp=1, padded_vocab_size=768)
    [problem] = layout_problems(saved, now, Path("ckpt"))
    assert "padded to 640 (--tp 1), this run pads it to 768 (--tp 2)" in problem
    assert layout_problems(saved, dict(saved, world_size=4, dp=4), Path("ckpt")) == []
