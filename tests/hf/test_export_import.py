"""Out of Megatron and back, end to end on CPU ranks.

Three trained fixtures, one per model kind, each a real distributed checkpoint:

* dense PolyNorm, trained by ``train-cpu`` at TP=2 x PP=2;
* dense PolyReLU, trained by ``train-cpu`` at TP=2 x DP=2;
* MoE PolyNorm (a dense layer, then an MoE layer with 4 experts top-2 and a shared expert,
  grouped-query attention), in both coefficient modes and in the gated form without a0,
  trained at TP=2 (SP) x EP=2 by the MoE harness and saved as Megatron-LM's ``pretrain``
  saves (its ``args`` in the checkpoint's common state).

For each, the installed ``polycom-megatron export-hf`` writes a transformers directory;
its logits equal the Megatron model's (run at the training layout through Megatron's
pipeline schedule) to 1e-5 relative in fp32, and 20 greedy tokens are identical.
Round trip: ``import-hf`` at another layout, ``export-hf`` again: bit-exact.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt_harness as h
import moe_harness as mh
from distributed import run_distributed
from megatron_reference import logits_and_greedy
from polycom_megatron.config import PolyComConfig
from polycom_megatron.training import cpu_loop
from polycom_megatron.training.cpu_job import CpuJob

pytestmark = pytest.mark.timeout(1200)

EXE = shutil.which("polycom-megatron") or str(Path(sys.executable).parent / "polycom-megatron")
RTOL = 1e-5
NEW_TOKENS = 20
PROMPT = [5, 17, 42, 9, 33, 7]
DEADLINE_S = 400


def cli(*args, ok=True):
    run = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def hf_logits_and_greedy(model_dir, tokens, prompt):
    from polycom_megatron.hf.sample import load

    model, _ = load(model_dir)
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return logits, out[0].tolist()


def safetensors_state(model_dir):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# --------------------------------------------------------------------------------------
# Fixtures: one trained checkpoint per model kind
# --------------------------------------------------------------------------------------


def small_job(output_dir, data_dir, **changes) -> CpuJob:
    fields = dict(
        output_dir=output_dir, data=data_dir, steps=3, world_size=4, tp=2, ep=1,
        num_experts=0, layers=2, hidden=64, heads=4, seq_len=64, micro_batch=2,
        # A low rate: a few steps at a high one collapse the model to repeating one token,
        # which would make the greedy comparison trivial.
        global_batch=8, lr=1e-3, vocab_size=1024, log_interval=100,
    )
    fields.update(changes)
    return CpuJob(**fields).validate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    cpu_loop.prepare_data(small_job(path.parent / "unused", path), quiet=True)
    return path


def _train_cpu(tmp_path_factory, data_dir, name, **changes):
    job = small_job(tmp_path_factory.mktemp(name), data_dir, **changes)
    cpu_loop.run(job, prepare_quietly=True, deadline_s=DEADLINE_S)
    return job


@pytest.fixture(scope="module")
def dense_polynorm_pp(tmp_path_factory, data_dir):
    return _train_cpu(tmp_path_factory, data_dir, "polynorm_pp", pp=2)


@pytest.fixture(scope="module")
def dense_polyrelu(tmp_path_factory, data_dir):
    return _train_cpu(tmp_path_factory, data_dir, "polyrelu",
                      polycom=PolyComConfig(activation="polyrelu"))


MOE_LAYOUT = h.Layout(tp=2, sp=True, ep=2)
MOE_OVERRIDES = dict(num_query_groups=2)
MOE_KINDS = {
    "layer": PolyComConfig(activation="polynorm", coeff_mode="layer"),
    "expert": PolyComConfig(activation="polynorm", coeff_mode="expert"),
    # The gated form (fc1 = [gate; up], sharded over TP as Megatron's GLU), no a0 term.
    "gated": PolyComConfig(activation="polynorm", coeff_mode="expert", gated=True, bias=False),
}


def megatron_lm_args(config, polycom, vocab_size, seq):
    """The ``args`` Megatron-LM's pretrain keeps in a checkpoint, for this model."""
    from polycom_megatron.config import add_polycom_args
    from polycom_megatron.hf.megatron_io import _ARG_NAMES, MODEL_FIELDS

    args = add_polycom_args(argparse.ArgumentParser()).parse_args([
        "--polycom-activation", polycom.activation, "--polycom-coeff-mode", polycom.coeff_mode,
        *(["--polycom-gated"] if polycom.gated else []),
        *(["--polycom-no-bias"] if not polycom.bias else []),
    ])
    for name in MODEL_FIELDS:
        setattr(args, _ARG_NAMES.get(name, name), getattr(config, name))
    args.swiglu = False  # refused with PolyCom; --polycom-gated sets the gated unit
    args.group_query_attention = config.num_query_groups is not None
    args.padded_vocab_size = vocab_size
    args.max_position_embeddings = seq
    args.untie_embeddings_and_output_weights = True
    args.position_embedding_type = "rope"
    args.rotary_base, args.rotary_percent = 10000, 1.0
    args.tokenizer_model = None
    return args


def _train_moe_and_reference(rank, world_size, root, tokens):
    """Train both coefficient modes 2 steps at TP=2 x EP=2, save as Megatron-LM does,
    then run the saved Megatron model on the test tokens at the same layout."""
    from megatron.core import dist_checkpointing

    from polycom_megatron.hf import megatron_io
    from polycom_megatron.training.checkpoint import TRACKER_FILE, iteration_dir

    out = {}
    for mode, polycom in MOE_KINDS.items():
        overrides = dict(MOE_OVERRIDES, gated_linear_unit=polycom.gated)
        config, ddp, optimizer = mh.build(MOE_LAYOUT, polycom, **overrides)
        for step in range(2):
            mh.train_step(ddp, optimizer, step)
        path = iteration_dir(os.path.join(root, mode), 2)
        if rank == 0:
            path.mkdir(parents=True)
        dist_checkpointing_state = {
            "model": ddp.module.sharded_state_dict(),
            "args": megatron_lm_args(config, polycom, h.VOCAB, h.SEQ),
            "iteration": 2,
            "checkpoint_version": 3.0,
        }
        torch.distributed.barrier()
        dist_checkpointing.save(dist_checkpointing_state, str(path))
        if rank == 0:
            (path.parent / TRACKER_FILE).write_text("2\n")
        spec, _ = megatron_io.describe_checkpoint(path)
        out[mode] = logits_and_greedy(path, spec, 2, 1, 2, tokens, PROMPT, NEW_TOKENS)
        mh._current_layout = None  # logits_and_greedy re-initialised the layout
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tokens = torch.randint(0, h.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    refs = run_distributed(_train_moe_and_reference, 4, str(root), tokens, timeout_s=DEADLINE_S)
    return root, tokens, refs


def _reference(rank, world_size, path, tp, pp, ep, tokens):
    from polycom_megatron.hf import megatron_io

    spec, _ = megatron_io.describe_checkpoint(megatron_io.iteration_path(path))
    return logits_and_greedy(megatron_io.iteration_path(path), spec, tp, pp, ep, tokens,
                             PROMPT, NEW_TOKENS)


def dense_tokens():
    return torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def _check_exact(model_dir, tokens, ref, label):
    ref_logits, ref_greedy = ref
    logits, greedy = hf_logits_and_greedy(model_dir, tokens, PROMPT)
    err = max_relative_error(logits, ref_logits)
    print(f"{label}: logits max relative error {err:.3e}; greedy {greedy[len(PROMPT):]}")
    assert err <= RTOL, f"{label}: logits differ by {err:.3e} relative"
    assert greedy == ref_greedy, f"{label}: greedy tokens differ\n{greedy}\n{ref_greedy}"
    assert len(greedy) == len(PROMPT) + NEW_TOKENS


def _round_trip(model_dir, tmp_path, layout, label):
    """import-hf at ``layout`` (tp, pp, ep), export-hf again: the same tensors, bit for bit."""
    tp, pp, ep = layout
    ckpt = tmp_path / f"{label}-reimported" / "checkpoints"
    cli("import-hf", model_dir, ckpt, "--tp", tp, "--pp", pp, "--ep", ep)
    again = tmp_path / f"{label}-again"
    no_tokenizer = not (Path(model_dir) / "tokenizer.json").is_file()
    cli("export-hf", ckpt, again, *(["--no-tokenizer"] if no_tokenizer else []))
    first, second = safetensors_state(model_dir), safetensors_state(again)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{label}: {name} changed in the round trip"
    a = json.loads((Path(model_dir) / "config.json").read_text())
    b = json.loads((again / "config.json").read_text())
    drop = {"transformers_version"}
    assert {k: v for k, v in a.items() if k not in drop} == (
        {k: v for k, v in b.items() if k not in drop})
    return ckpt


def test_dense_polynorm_tp2_pp2_exports_exactly_and_round_trips(dense_polynorm_pp, tmp_path):
    job = dense_polynorm_pp
    out = tmp_path / "hf"
    run = cli("export-hf", job.output_dir, out)
    assert "polynorm GPT, 2 layers" in run.stdout
    for name in ("config.json", "model.safetensors", "modeling.py", "configuration.py",
                 "tokenizer.json", "tokenizer.model", "generation_config.json"):
        assert (out / name).is_file(), name
    tokens = dense_tokens()
    _check_exact(out, tokens, run_distributed(_reference, 4, job.checkpoint_dir, 2, 2, 1, tokens,
                                              timeout_s=DEADLINE_S), "dense polynorm TP2xPP2")


def test_dense_polyrelu_tp2_exports_exactly_and_resumes_after_import(
    dense_polyrelu, data_dir, tmp_path
):
    job = dense_polyrelu
    out = tmp_path / "hf"
    cli("export-hf", job.checkpoint_dir, out)
    tokens = dense_tokens()
    _check_exact(out, tokens, run_distributed(_reference, 4, job.checkpoint_dir, 2, 1, 1, tokens,
                                              timeout_s=DEADLINE_S), "dense polyrelu TP2")
    # Perplexity on held-out text and on the indexed dataset, through the installed command.
    text = tmp_path / "held_out.txt"
    last = (data_dir / "pydoc_corpus.jsonl").read_text().splitlines()[-1]
    text.write_text(json.loads(last)["text"])
    run = cli("perplexity", out, "--text", text, "--seq-len", 32, "--max-tokens", 256)
    from polycom_megatron.hf import perplexity
    from polycom_megatron.hf.sample import load

    model, tokenizer = load(out)
    want = perplexity.evaluate(model, perplexity.text_tokens(tokenizer, text)[:256], 32)
    assert run.stdout.startswith("perplexity ")
    assert float(run.stdout.split()[1]) == pytest.approx(want.perplexity, rel=1e-4)
    run = cli("perplexity", out, "--data-prefix", data_dir / "corpus_text_document",
              "--seq-len", 32, "--max-tokens", 256)
    assert "over 248 predicted tokens in 8 windows" in run.stdout
    # Back into Megatron at TP=2 on 2 ranks, and train-cpu continues from it.
    run = cli("import-hf", out, tmp_path / "resumed" / "checkpoints", "--tp", "2")
    assert "continue with: polycom-megatron train-cpu --resume" in run.stdout
    flags = run.stdout.split("--resume", 1)[1].split("--steps N")[0].split()
    resumed = subprocess.run(
        [EXE, "train-cpu", "--resume", *flags, "--steps", "2", "--data-dir", str(data_dir),
         "--vocab-size", "1024", "--seq-len", "64", "--micro-batch", "2", "--global-batch", "8"],
        capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_0000000" in resumed.stdout
    assert "iter     2/2" in resumed.stdout
    assert "sample:" in resumed.stdout, "train-cpu ends with a sample from the exported model"


@pytest.fixture(scope="module")
def moe_exports(moe, tmp_path_factory):
    root, _, _ = moe
    out = {}
    for mode in MOE_KINDS:
        out[mode] = tmp_path_factory.mktemp(f"hf-{mode}")
        run = cli("export-hf", Path(root) / mode, out[mode], "--no-tokenizer", "--overwrite")
        assert "MoE 4 experts top-2 (1 of 2 layers)" in run.stdout
    return out


@pytest.mark.parametrize("mode", list(MOE_KINDS))
def test_moe_tp2_ep2_exports_exactly(moe, moe_exports, mode, tmp_path):
    root, tokens, refs = moe
    out = moe_exports[mode]
    config = json.loads((out / "config.json").read_text())
    polycom = MOE_KINDS[mode]
    assert config["moe_shared_expert_intermediate_size"] == 16
    assert config["num_key_value_heads"] == 2
    assert config["polycom_coeff_mode"] == polycom.coeff_mode
    assert (config["polycom_gated"], config["polycom_bias"]) == (polycom.gated, polycom.bias)
    _check_exact(out, tokens, refs[mode], f"MoE polynorm {mode} TP2xEP2")
    if mode == "gated":
        _round_trip(out, tmp_path, (1, 1, 2), "moe-gated")


# What an exported directory must not need: this package, Megatron, the tokenizer
# converter's dependencies.
NOT_NEEDED = ("polycom_megatron", "megatron", "megatron_core", "sentencepiece", "google",
              "protobuf", "triton")


def _site_without(blocked, target: Path) -> Path:
    """A copy (by symlinks) of this environment's site-packages without the blocked
    distributions, so that they are as absent as in an environment that never had them."""
    target.mkdir()
    for site in {p for p in sys.path if p.endswith("site-packages")}:
        for entry in Path(site).iterdir():
            top = entry.name.split(".")[0].split("-")[0].lower()
            if top in blocked or entry.suffix == ".pth" or top.startswith("__editable__"):
                continue
            if not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return target


def test_exported_dir_loads_with_only_torch_and_transformers(moe, moe_exports, tmp_path):
    """A fresh interpreter (-I -S: no site module, so no site-packages, no .pth files, no
    environment variables) whose only library directory is
    this environment's site-packages minus polycom_megatron, megatron-core, sentencepiece,
    protobuf and triton loads the gated MoE export with trust_remote_code and generates:
    the same logits and greedy tokens as the Megatron model."""
    root, tokens, refs = moe
    out = moe_exports["gated"]
    site = _site_without(NOT_NEEDED, tmp_path / "site")
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys
assert not any(p.endswith("site-packages") for p in sys.path), sys.path
sys.path[:0] = [{str(site)!r}]
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
tokens = torch.load({str(tmp_path / "tokens.pt")!r})
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits
    greedy = model.generate(torch.tensor([{PROMPT}]), max_new_tokens={NEW_TOKENS},
                            min_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id=0)
torch.save((logits, greedy[0].tolist()), {str(tmp_path / "out.pt")!r})
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({NOT_NEEDED!r}))
print(type(model).__module__, "not-needed modules loaded:", loaded)
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "transformers_modules" in run.stdout, "the model came from the directory's own code"
    assert "not-needed modules loaded: []" in run.stdout
    logits, greedy = torch.load(tmp_path / "out.pt")
    ref_logits, ref_greedy = refs["gated"]
    assert max_relative_error(logits, ref_logits) <= RTOL
    assert greedy == ref_greedy


def test_bad_input_is_refused_with_a_clear_message(tmp_path, moe):
    root, _, _ = moe
    run = cli("export-hf", tmp_path / "nope", tmp_path / "out", ok=False)
    assert run.returncode == 2 and "does not exist" in run.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    run = cli("export-hf", Path(root) / "layer", tmp_path / "taken", "--no-tokenizer", ok=False)
    assert run.returncode == 2 and "not empty" in run.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    run = cli("export-hf", Path(root) / "layer", tmp_path / "o2", ok=False)
    assert run.returncode == 2 and "--no-tokenizer" in run.stderr
    run = cli("import-hf", tmp_path, tmp_path / "ck", ok=False)
    assert run.returncode == 2 and "no config.json" in run.stderr
