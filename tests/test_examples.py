"""The launch scripts in examples/: their --dry-run resolves the intended Megatron command,
and a layout or knob that cannot work stops them with a message naming the knob.

The scripts run for real (bash, and the layout check in this interpreter); only torchrun
is never reached, which is what --dry-run promises.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A plausible cluster: 2 nodes of 8 GPUs, synthetic data so no dataset is needed.
CLUSTER = dict(NNODES="2", GPUS_PER_NODE="8", NODE_RANK="1", MASTER_ADDR="node-a",
               MASTER_PORT="29400", MOCK_DATA="1")


def run(script, *args, **env):
    """Run an example with a clean knob environment plus ``env``; (returncode, out, err)."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    base.update(PYTHON=sys.executable, PYTHONPATH=str(EXAMPLES.parent), **CLUSTER)
    base.update(env)
    result = subprocess.run(["bash", str(EXAMPLES / script), *args], env=base,
                            capture_output=True, text=True, cwd=env.get("CWD", EXAMPLES.parent))
    return result.returncode, result.stdout, result.stderr


def command(stdout):
    """The resolved command printed by --dry-run, as an argv list."""
    lines = stdout.splitlines()
    return shlex.split(lines[lines.index("command:") + 1])


def value(argv, flag):
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times"
    return argv[argv.index(flag) + 1]


def megatron_args(argv):
    """What follows ``polycom-megatron pretrain`` in the command."""
    start = argv.index("pretrain")
    assert argv[start - 1] == "polycom-megatron"
    return argv[start + 1:]


@pytest.mark.parametrize(
    "script, activation, ffn, gated",
    [("dense_1b_polynorm.sh", "polynorm", "8256", False),
     ("dense_1b_polyrelu.sh", "polyrelu", "8256", False),
     # The gated form keeps its SwiGLU twin's width (same parameter count).
     ("dense_1b_polynorm_glu.sh", "polynorm", "5504", True),
     ("dense_1b_swiglu.sh", None, "5504", False)],
)
def test_dense_dry_run_resolves_the_reference_config(script, activation, ffn, gated):
    code, out, err = run(script, "--dry-run", "--seed", "7")
    assert code == 0, err
    argv = command(out)
    assert argv[:2] == ["env", "CUDA_DEVICE_MAX_CONNECTIONS=1"]
    for flag, expected in [("--nnodes", "2"), ("--nproc-per-node", "8"), ("--node-rank", "1"),
                           ("--master-addr", "node-a"), ("--master-port", "29400")]:
        assert value(argv, flag) == expected
    args = megatron_args(argv)
    for flag, expected in [("--num-layers", "24"), ("--hidden-size", "2048"),
                           ("--num-attention-heads", "16"), ("--ffn-hidden-size", ffn),
                           ("--seq-length", "4096"), ("--micro-batch-size", "2"),
                           ("--global-batch-size", "64"), ("--lr", "3e-4"), ("--min-lr", "3e-5"),
                           ("--tensor-model-parallel-size", "1"),
                           ("--recompute-granularity", "selective"), ("--normalization", "RMSNorm")]:
        assert value(args, flag) == expected
    assert "--use-distributed-optimizer" in args and "--bf16" in args
    assert "--num-experts" not in args and "--sequence-parallel" not in args
    if activation:
        assert value(args, "--polycom-activation") == activation and "--swiglu" not in args
    else:
        assert "--swiglu" in args and "--polycom-activation" not in args
    assert ("--polycom-gated" in args) == gated
    assert args[-2:] == ["--seed", "7"]  # extra arguments reach Megatron last
    assert "layout ok: DP=16" in out


@pytest.mark.parametrize(
    "script, expert_ffn, polycom, gated",
    [("moe_1b7b_polynorm.sh", "1536", True, False),
     ("moe_1b7b_polynorm_glu.sh", "1024", True, True),
     ("moe_1b7b_swiglu.sh", "1024", False, False)],
)
def test_moe_dry_run_resolves_the_reference_config(script, expert_ffn, polycom, gated):
    code, out, err = run(script, "--dry-run")
    assert code == 0, err
    args = megatron_args(command(out))
    for flag, expected in [("--num-layers", "16"), ("--num-experts", "64"),
                           ("--moe-router-topk", "8"), ("--moe-ffn-hidden-size", expert_ffn),
                           ("--expert-model-parallel-size", "8"), ("--moe-aux-loss-coeff", "1e-2"),
                           ("--moe-z-loss-coeff", "1e-3"), ("--global-batch-size", "1024"),
                           ("--lr", "4e-4"),
                           # 200B tokens / (1024 x 4096 tokens per step), rounded up
                           ("--train-iters", "47684")]:
        assert value(args, flag) == expected
    assert "--moe-expert-capacity-factor" not in args  # dropless
    assert ("--polycom-activation" in args) == polycom and ("--swiglu" in args) != polycom
    assert ("--polycom-gated" in args) == gated
    assert "expert-DP=2" in out


def test_knobs_reach_the_command(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1200")
    code, out, err = run(
        "moe_1b7b_polynorm.sh", "--dry-run", TP="2", ETP="1", EP="4", PP="2", PRECISION="fp8",
        FP8_FORMAT="e4m3", FP8_RECIPE="mxfp8", RECOMPUTE="full", CKPT_DIR=str(ckpt),
        TENSORBOARD_DIR=str(tmp_path / "tb"), WANDB_PROJECT="polycom", MICRO_BATCH="2",
        TRAIN_ITERS="10")
    assert code == 0, err
    args = megatron_args(command(out))
    for flag, expected in [("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "2"),
                           ("--expert-model-parallel-size", "4"), ("--expert-tensor-parallel-size", "1"),
                           ("--fp8-format", "e4m3"), ("--fp8-recipe", "mxfp8"),
                           ("--recompute-granularity", "full"), ("--save", str(ckpt)),
                           ("--load", str(ckpt)), ("--tensorboard-dir", str(tmp_path / "tb")),
                           ("--wandb-project", "polycom"), ("--train-iters", "10"),
                           ("--micro-batch-size", "2")]:
        assert value(args, flag) == expected
    assert "--sequence-parallel" in args  # SP=auto turns on with TP > 1
    assert f"resume: from iteration 1200 in {ckpt}" in out

    code, out, err = run("dense_1b_polynorm.sh", "--dry-run", RESUME="0", CKPT_DIR=str(ckpt))
    assert code == 0, err
    assert "--load" not in megatron_args(command(out)) and "resume:" not in out


@pytest.mark.parametrize(
    "script, env, named",
    [
        ("dense_1b_polynorm.sh", dict(TP="3"), "NUM_HEADS=16 is not divisible by TP=3"),
        ("dense_1b_swiglu.sh", dict(GLOBAL_BATCH="60"), "GLOBAL_BATCH=60"),
        ("moe_1b7b_polynorm.sh", dict(EP="6", GPUS_PER_NODE="6"), "NUM_EXPERTS=64 is not divisible by EP=6"),
        ("dense_1b_polyrelu.sh", dict(PRECISION="fp16"), "PRECISION=fp16 is not one of"),
        ("dense_1b_polyrelu.sh", dict(NODE_RANK="2"), "NODE_RANK=2 must be in 0..1"),
        ("dense_1b_polyrelu.sh", dict(MOCK_DATA="0"), "set DATA_PATH"),
    ],
)
def test_bad_configuration_fails_before_launch_naming_the_knob(script, env, named):
    code, out, err = run(script, "--dry-run", **env)
    assert code != 0
    assert named in err
    assert "command:" not in out


def test_slurm_dry_run_runs_one_torchrun_per_node():
    slurm = dict(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_GPUS_ON_NODE="8",
                 NNODES="", NODE_RANK="", MASTER_ADDR="")
    code, out, err = run("slurm.sbatch", "examples/dense_1b_polynorm.sh", "--dry-run", **slurm)
    assert code == 0, err
    srun = shlex.split(out.splitlines()[out.splitlines().index("srun command:") + 1])
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[4:6] == ["bash", "-c"] and "NODE_RANK=$SLURM_NODEID" in srun[6] and "--dry-run" not in srun
    argv = command(out)
    assert value(argv, "--nnodes") == "2" and value(argv, "--master-addr") == "gpu-a"

    code, _, err = run("slurm.sbatch", "examples/dense_1b_polynorm.sh", "--dry-run",
                       **dict(slurm, TP="3"))
    assert code != 0 and "TP=3" in err

    code, _, err = run("slurm.sbatch", "examples/dense_1b_polynorm.sh", "--dry-run")
    assert code != 0 and "not inside a SLURM job" in err
