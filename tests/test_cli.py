"""Every ``polycom-megatron`` subcommand, run once as a user runs it: the installed
executable in a subprocess, its exit status asserted, on a success path with the smallest
settings and on one bad input each (non-zero, one line on stderr, no traceback).

The commands chain like a user's session: ``data tokenizer`` -> ``data build`` ->
``data check``; ``data prepare`` -> ``train-cpu``. ``pretrain`` and ``patch apply|check``
also run against a real Megatron-LM tree when ``POLYCOM_MEGATRON_LM_TREES`` names some
(tests/megatron_lm.py).
"""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import megatron_lm
from polycom_megatron import cli

EXE = str(Path(sys.executable).parent / "polycom-megatron")
REPO = Path(__file__).resolve().parents[1]
# A real corpus that ships with the repository: the README, one document per paragraph.
CORPUS = REPO / "README.md"
VOCAB = 512


def run(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.args, done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def refused(done: subprocess.CompletedProcess, *words: str, status=None) -> str:
    """A failure as a user should see it: non-zero, no traceback, and a last stderr line
    (argparse prints its usage above it) that names the problem. Returns that line."""
    assert done.returncode != 0, (done.args, done.stdout[-2000:])
    if status is not None:
        assert done.returncode == status, (done.args, done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, done.args
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


# --- the router -----------------------------------------------------------------------


def test_top_level_usage_and_unknown_command(work):
    assert "bench-kernels" in ok(run("--help", cwd=work)).stdout
    assert run(cwd=work).returncode == 2
    done = run("no-such-command", cwd=work)
    assert done.returncode == 2 and "unknown command 'no-such-command'" in done.stderr


@pytest.fixture
def failing_subcommand(tmp_path, monkeypatch):
    """A subcommand module whose main fails the way a bug would (registered for one test)."""
    (tmp_path / "broken_command.py").write_text(textwrap.dedent("""
        def main(argv):
            if argv == ["interrupt"]:
                raise KeyboardInterrupt
            return {}["missing key"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("broken_command", "fails"))
    importlib.invalidate_caches()


def test_unexpected_errors_are_one_line_with_a_hint(failing_subcommand, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    assert cli.main(["broken"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError: 'missing key'" in err
    assert f"{cli.DEBUG_VARIABLE}=1" in err
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(KeyError):
        cli.main(["broken"])
    assert cli.main(["broken", "interrupt"]) == cli.INTERRUPTED
    assert capsys.readouterr().err.strip() == "polycom-megatron broken: interrupted"


def test_ctrl_c_is_one_line_and_status_130(work):
    process = subprocess.Popen(
        [EXE, "bench", "--smoke", "--only", "moe", "--kernels", "torch", "--rounds", "50",
         "--out-dir", work / "interrupted"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in process.stdout:  # wait until it is at work
            if line.startswith("[moe layer]"):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "polycom-megatron bench: interrupted"
    assert not (work / "interrupted" / "throughput.json").exists()


# --- data -----------------------------------------------------------------------------


def test_data_tokenizer_build_check(work):
    tok, data = work / "tok", work / "ds"
    ok(run("data", "tokenizer", CORPUS, "--output-prefix", tok, "--vocab-size", VOCAB, cwd=work))
    assert (work / "tok.model").stat().st_size > 0
    ok(run("data", "build", CORPUS, "--tokenizer", work / "tok.model", "--output-prefix", data,
           "--quiet", cwd=work))
    assert (work / "ds.bin").stat().st_size > 0 and (work / "ds.idx").stat().st_size > 0
    ok(run("data", "check", data, "--tokenizer", work / "tok.model", cwd=work))

    refused(run("data", "tokenizer", CORPUS, "--output-prefix", work / "t2", "--vocab-size",
                "x", cwd=work), "--vocab-size", status=2)
    refused(run("data", "build", CORPUS, "--tokenizer", work / "missing.model",
                "--output-prefix", work / "d2", cwd=work), "missing.model")
    refused(run("data", "check", work / "no-such-dataset", cwd=work), "no-such-dataset")


@pytest.fixture(scope="module")
def prepared(work) -> Path:
    ok(run("data", "prepare", "--output-dir", work / "prepared", "--inputs", CORPUS,
           "--vocab-size", VOCAB, "--quiet", cwd=work))
    return work / "prepared"


def test_data_prepare(work, prepared):
    assert any(prepared.glob("*.bin")) and any(prepared.glob("*.model"))
    refused(run("data", "prepare", "--output-dir", work / "p2", "--inputs",
                work / "no-such-input.jsonl", "--vocab-size", VOCAB, cwd=work),
            "no-such-input.jsonl")


# --- training -------------------------------------------------------------------------

TINY_CPU_RUN = ["--world-size", "1", "--tp", "1", "--num-experts", "0", "--layers", "1",
                "--hidden", "32", "--heads", "2", "--seq-len", "32", "--micro-batch", "2",
                "--global-batch", "2", "--vocab-size", str(VOCAB), "--log-interval", "1"]


def test_train_cpu(work, prepared):
    out = work / "run"
    done = ok(run("train-cpu", "--output-dir", out, "--data-dir", prepared, "--steps", "2",
                  *TINY_CPU_RUN, cwd=work, timeout=600))
    assert "iteration" in done.stdout.lower() or any(out.rglob("*")), done.stdout[-2000:]
    refused(run("train-cpu", "--output-dir", work / "run2", "--world-size", "9", cwd=work),
            "--world-size 9")


def test_pretrain_help_and_refusals(work):
    help_ = ok(run("pretrain", "--help", cwd=work)).stdout
    assert "--polycom-activation" in help_ and "--cpu" in help_
    line = refused(run("pretrain", "--squared-relu", "--polycom-activation", "polynorm",
                       cwd=work), status=2)
    assert line.startswith("error: --squared-relu and --polycom-activation polynorm")


@megatron_lm.needs_trees
def test_pretrain_trains_on_a_megatron_lm_tree(work):
    """One tiny real run of Megatron-LM's loop through the installed command, and the
    conflict refused there too (the loop on every tree is tests/training/test_pretrain.py's)."""
    tree = megatron_lm.trees()[0]
    env = megatron_lm.tree_env(tree)
    done = ok(run("pretrain", "--cpu", *megatron_lm.TINY_GPT, "--train-iters", "2",
                  "--polycom-activation", "polynorm", cwd=work, env=env, timeout=600))
    assert "decoder MLPs: 2 x PolyComMLP" in done.stdout, done.stdout[-3000:]
    assert "iteration        2/       2" in done.stdout
    line = refused(run("pretrain", "--cpu", *megatron_lm.TINY_GPT, "--swiglu",
                       "--polycom-activation", "polyrelu", cwd=work, env=env), status=2)
    assert line.startswith("error: --swiglu cannot be combined with --polycom-activation polyrelu")


# --- patch ----------------------------------------------------------------------------


def test_patch_list_and_a_tree_that_is_not_one(work):
    assert "megatron-core 0.19" in ok(run("patch", "list", cwd=work)).stdout
    (work / "not-a-checkout").mkdir()
    refused(run("patch", "check", work / "not-a-checkout", cwd=work), "not a Megatron-LM checkout",
            status=2)


@megatron_lm.needs_trees
def test_patch_apply_then_check_on_a_copy_of_a_tree(work):
    from polycom_megatron import patching

    tree = megatron_lm.trees()[-1]
    key = patching.resolve(tree)
    copy = work / "patched" / tree.name
    for name in [*patching.patched_files(patching.patch_path(key)), str(patching.PACKAGE_INFO)]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / name, copy / name)
    assert run("patch", "check", copy, cwd=work).returncode == 1  # not patched yet
    ok(run("patch", "apply", copy, cwd=work))
    ok(run("patch", "check", copy, cwd=work))
    refused(run("patch", "apply", copy, cwd=work), "already patched", status=2)


# --- benchmarks -----------------------------------------------------------------------


def test_bench(work):
    out = work / "bench"
    ok(run("bench", "--smoke", "--only", "mlp", "--activations", "swiglu,polynorm",
           "--kernels", "torch", "--rounds", "1", "--out-dir", out, cwd=work))
    payload = json.loads((out / "throughput.json").read_text())
    assert {c["name"] for c in payload["cases"]} == {"swiglu", "polynorm[torch]"}
    assert all(c["tokens_per_s"] for c in payload["cases"])
    refused(run("bench", "--rounds", "-3", cwd=work), "--rounds", status=2)
    # The results already there are not replaced unasked, and it says so before any work.
    refused(run("bench", "--smoke", "--out-dir", out, cwd=work), "--overwrite", status=1)


def test_bench_kernels(work):
    out = work / "kernels.json"
    done = ok(run("bench-kernels", "--rows", "8", "--cols", "64", "--impls", "naive,torch,triton",
                  "--reps", "1", "--warmup", "0", "--json", out, cwd=work))
    impls = {r["impl"] for r in json.loads(out.read_text())["results"]}
    assert impls == {"naive", "torch", "triton"}, done.stdout[-2000:]
    if torch.cuda.is_available():
        refused(run("bench-kernels", "--rows", "0", cwd=work), "--rows", status=2)
    else:
        refused(run("bench-kernels", "--device", "cuda", cwd=work), "CUDA is not available",
                status=1)


def test_a_missing_optional_package_names_its_extra(tmp_path, monkeypatch, capsys):
    from polycom_megatron import cli

    (tmp_path / "needs_transformers_cmd.py").write_text(
        "def main(argv):\n"
        "    raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "needs-hf", ("needs_transformers_cmd", "a test"))
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    assert cli.run("needs-hf", []) == 1
    assert capsys.readouterr().err == (
        "polycom-megatron needs-hf: error: needs the optional package transformers, which is "
        "not installed: pip install 'polycom-megatron[hf]'\n")
