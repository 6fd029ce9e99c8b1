"""Fault injection: the installed ``polycom-megatron data`` commands, run as a user runs them,
against damaged files, a full disk, kill -9, Ctrl-C and re-runs over existing output.

Every test asserts the exit code, the one-line message, and the sha256 of every file the
user had before (unchanged) and of what is left after (no partial files).
"""

import os
import resource
import signal
import subprocess
import time

import pytest

from conftest import (
    EXECUTABLE,
    VOCAB_SIZE,
    one_error_line,
    patch_bytes,
    run_cli,
    sha256s,
    truncate,
)

PREFIX = "corpus_text_document"


def partials(directory):
    return sorted(p.name for p in directory.rglob("*.partial*"))


def middle_4k(path, fill=None):
    """Flip (or set to ``fill``) 4 KB in the middle of a file."""
    size = os.path.getsize(path)
    start = max(0, size // 2 - 2048)
    with open(path, "rb") as stream:
        stream.seek(start)
        old = stream.read(min(4096, size - start))
    patch_bytes(path, start, bytes(fill for _ in old) if fill is not None else bytes(b ^ 0xFF for b in old))


def fsize_limit(nbytes):
    """A preexec_fn: the child may not grow any file past ``nbytes`` (a full disk, as the
    process sees it). SIGXFSZ ignored, so a write past the limit fails with EFBIG."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, prepared_dir):
    """Some MB of JSONL (the pydoc corpus, repeated): tokenizing it takes seconds, long
    enough to interrupt a run in the middle."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    text = (prepared_dir / "pydoc_corpus.jsonl").read_bytes()
    path.write_bytes(text * max(1, (6 << 20) // len(text)))
    return path


# ----- damaged artefacts -------------------------------------------------------------------

DAMAGES = {
    "flipped": lambda p: middle_4k(p),
    "zeroed": lambda p: middle_4k(p, fill=0),
    "truncated": lambda p: truncate(p, 100),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("artefact", [f"{PREFIX}.bin", f"{PREFIX}.idx", "tokenizer.model"])
def test_check_refuses_damage_anywhere(prepared_copy, artefact, damage):
    prefix = prepared_copy / PREFIX
    assert run_cli("data", "check", prefix).returncode == 0
    DAMAGES[damage](prepared_copy / artefact)
    result = run_cli("data", "check", prefix, "--tokenizer", prepared_copy / "tokenizer.model")
    line = one_error_line(result)
    assert result.returncode == 1
    assert artefact in line
    if damage != "truncated" and artefact != f"{PREFIX}.idx":
        assert "changed" in line or "not the tokenizer" in line  # named region or pairing


def test_check_refuses_another_tokenizer(prepared_copy, tmp_path):
    other = tmp_path / "other"
    made = run_cli("data", "tokenizer", prepared_copy / "pydoc_corpus.jsonl",
                   "--output-prefix", other, "--vocab-size", VOCAB_SIZE + 24)
    assert made.returncode == 0, made.stderr  # (the same settings would train the same bytes)
    result = run_cli("data", "check", prepared_copy / PREFIX, "--tokenizer", f"{other}.model")
    assert "is not the tokenizer" in one_error_line(result)


# ----- full disk ---------------------------------------------------------------------------


def test_tokenizer_disk_full_leaves_nothing_or_the_old_model(prepared_dir, tmp_path):
    corpus = prepared_dir / "pydoc_corpus.jsonl"
    fresh = run_cli("data", "tokenizer", corpus, "--output-prefix", tmp_path / "tok",
                    "--vocab-size", VOCAB_SIZE, preexec_fn=fsize_limit(4096))
    line = one_error_line(fresh)
    assert "File too large" in line and "no existing file was replaced" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    assert run_cli("data", "tokenizer", corpus, "--output-prefix", tmp_path / "tok",
                   "--vocab-size", VOCAB_SIZE).returncode == 0
    before = sha256s(tmp_path)
    again = run_cli("data", "tokenizer", corpus, "--output-prefix", tmp_path / "tok",
                    "--vocab-size", 500, "--overwrite", preexec_fn=fsize_limit(4096))
    one_error_line(again)
    assert sha256s(tmp_path) == before


def test_build_and_prepare_disk_full_keep_the_old_dataset(prepared_copy):
    before = sha256s(prepared_copy)
    build = run_cli("data", "build", prepared_copy / "pydoc_corpus.jsonl", "--tokenizer",
                    prepared_copy / "tokenizer.model", "--output-prefix", prepared_copy / PREFIX,
                    "--overwrite", "--quiet", preexec_fn=fsize_limit(64 << 10))
    assert "File too large" in one_error_line(build)
    prepare = run_cli("data", "prepare", "--output-dir", prepared_copy, "--vocab-size", 500,
                      "--overwrite", "--quiet", preexec_fn=fsize_limit(64 << 10))
    assert "File too large" in one_error_line(prepare)
    assert sha256s(prepared_copy) == before  # no partial files either


# ----- interrupted runs --------------------------------------------------------------------


def start_and_wait_for_partial(args, directory, partial_name, timeout=240):
    """Start ``polycom-megatron ARGS``; return it once ``partial_name`` in ``directory`` has
    bytes in it (the run is writing), still running."""
    process = subprocess.Popen([EXECUTABLE, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    partial = directory / partial_name
    while not (partial.exists() and partial.stat().st_size > 0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"{partial} never appeared while the run was going: {err[-2000:]}")
        time.sleep(0.005)
    assert process.poll() is None, "the run must still be writing when it is interrupted"
    return process


def test_kill_9_during_build_keeps_the_old_dataset_and_the_next_run_cleans_up(
    prepared_copy, big_corpus
):
    before = sha256s(prepared_copy)
    args = ["data", "build", big_corpus, "--tokenizer", prepared_copy / "tokenizer.model",
            "--output-prefix", prepared_copy / PREFIX, "--overwrite", "--quiet"]
    process = start_and_wait_for_partial(args, prepared_copy, f"{PREFIX}.partial.bin")
    process.kill()
    process.wait(timeout=60)
    left = sha256s(prepared_copy)
    assert {k: v for k, v in left.items() if ".partial" not in k} == before
    assert f"{PREFIX}.partial.bin" in partials(prepared_copy)  # kill -9 leaves it ...

    check = run_cli("data", "check", prepared_copy / PREFIX)
    assert check.returncode == 0 and "interrupted build" in check.stderr  # ... check says so
    small = run_cli("data", "build", prepared_copy / "pydoc_corpus.jsonl", "--tokenizer",
                    prepared_copy / "tokenizer.model", "--output-prefix", prepared_copy / PREFIX,
                    "--overwrite", "--quiet")
    assert small.returncode == 0, small.stderr
    assert "left by an interrupted run" in small.stderr  # ... and the next run removes it
    assert partials(prepared_copy) == []


def test_ctrl_c_during_prepare_rerun_keeps_the_old_directory(prepared_copy, big_corpus):
    """Finding 6: Ctrl-C while a re-run of `data prepare` builds its dataset (its new
    tokenizer already trained) leaves the old tokenizer and dataset, which still check OK."""
    before = sha256s(prepared_copy)
    args = ["data", "prepare", "--output-dir", prepared_copy, "--inputs", big_corpus,
            "--vocab-size", VOCAB_SIZE, "--overwrite", "--quiet"]
    process = start_and_wait_for_partial(args, prepared_copy, f"{PREFIX}.partial.bin")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert sha256s(prepared_copy) == before  # nothing replaced, no partial files
    check = run_cli("data", "check", prepared_copy / PREFIX,
                    "--tokenizer", prepared_copy / "tokenizer.model")
    assert check.returncode == 0, check.stderr


# ----- re-runs over existing output --------------------------------------------------------


def test_reruns_refuse_without_overwrite_and_replace_with_it(prepared_copy):
    before = sha256s(prepared_copy)
    corpus, tok = prepared_copy / "pydoc_corpus.jsonl", prepared_copy / "tokenizer"
    refused = {
        "pydoc": run_cli("data", "pydoc", corpus),
        "tokenizer": run_cli("data", "tokenizer", corpus, "--output-prefix", tok,
                             "--vocab-size", 500),
        "build": run_cli("data", "build", corpus, "--tokenizer", f"{tok}.model",
                         "--output-prefix", prepared_copy / PREFIX, "--quiet"),
    }
    for name, result in refused.items():
        line = one_error_line(result)
        assert result.returncode == 1 and "--overwrite" in line and "already exist" in line, name
    other = run_cli("data", "prepare", "--output-dir", prepared_copy, "--vocab-size", 500,
                    "--max-docs", 40, "--quiet")
    line = one_error_line(other)
    assert f"--vocab-size {VOCAB_SIZE}" in line and "--vocab-size 500" in line
    same = run_cli("data", "prepare", "--output-dir", prepared_copy, "--vocab-size", VOCAB_SIZE,
                   "--max-docs", 40, "--quiet")
    assert same.returncode == 0 and "reusing it" in same.stdout
    assert sha256s(prepared_copy) == before

    replaced = run_cli("data", "prepare", "--output-dir", prepared_copy, "--vocab-size", 500,
                       "--max-docs", 40, "--quiet", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    after = sha256s(prepared_copy)
    assert after["tokenizer.model"] != before["tokenizer.model"]
    assert after["pydoc_corpus.jsonl"] == before["pydoc_corpus.jsonl"]  # same text, same bytes
    check = run_cli("data", "check", prepared_copy / PREFIX,
                    "--tokenizer", prepared_copy / "tokenizer.model")
    assert check.returncode == 0 and "< vocab 500" in check.stdout


def test_bad_numbers_and_unwritable_outputs_are_refused_before_any_work(prepared_dir, tmp_path):
    for args in (["prepare", "--output-dir", tmp_path / "x", "--vocab-size", "-3"],
                 ["prepare", "--output-dir", tmp_path / "x", "--max-docs", "0"],
                 ["tokenizer", "in.jsonl", "--output-prefix", tmp_path / "t", "--vocab-size", "ten"]):
        result = run_cli("data", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli("data", "build", prepared_dir / "pydoc_corpus.jsonl", "--tokenizer",
                     prepared_dir / "tokenizer.model", "--output-prefix", blocker / "ds")
    assert "not writable" in one_error_line(result)
    assert not (tmp_path / "x").exists()
