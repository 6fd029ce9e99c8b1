"""Prepared data as the commands that need it see it: train-cpu's --data-dir (used as it is,
never replaced) and pretrain's --data-path (verified before Megatron starts)."""

import shutil

import pytest

from polycom_megatron.data import DataError, SettingsMismatchError
from polycom_megatron.data.pretrain_inputs import dataset_prefixes, tokenizer_for_check
from polycom_megatron.training.cpu_job import CpuJob
from polycom_megatron.training.cpu_loop import prepare_data

from conftest import VOCAB_SIZE, one_error_line, run_cli, sha256s, truncate

PREFIX = "corpus_text_document"

# The smallest real train-cpu run: one rank, one tiny layer, one step.
TINY_TRAIN = ["--steps", 1, "--world-size", 1, "--tp", 1, "--num-experts", 0, "--layers", 1,
              "--hidden", 32, "--heads", 2, "--seq-len", 32, "--micro-batch", 1,
              "--global-batch", 1, "--log-interval", 1]


def test_train_cpu_trains_on_the_users_prepared_dir_and_keeps_it(prepared_copy, tmp_path):
    """Finding 1: `train-cpu --data-dir mydata` (no --vocab-size) uses mydata as it is."""
    before = sha256s(prepared_copy)
    result = run_cli("train-cpu", "--output-dir", tmp_path / "run", "--data-dir", prepared_copy,
                     *TINY_TRAIN, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: using OK {prepared_copy / PREFIX}" in result.stdout
    assert f"vocab {VOCAB_SIZE} (padded" in result.stdout
    assert sha256s(prepared_copy) == before


def test_train_cpu_refuses_a_conflicting_vocab_size_by_name(prepared_copy, tmp_path):
    before = sha256s(prepared_copy)
    result = run_cli("train-cpu", "--output-dir", tmp_path / "run", "--data-dir", prepared_copy,
                     "--vocab-size", 4096, *TINY_TRAIN)
    line = one_error_line(result)
    assert "--vocab-size 4096" in line and f"has {VOCAB_SIZE} pieces" in line
    assert sha256s(prepared_copy) == before
    assert not (tmp_path / "run").exists()


def test_prepare_data_never_replaces_what_is_there(prepared_copy, tmp_path):
    job = CpuJob(output_dir=tmp_path / "run", data=prepared_copy)
    assert prepare_data(job, quiet=True).vocab_size == VOCAB_SIZE
    with pytest.raises(SettingsMismatchError, match="--vocab-size 2048"):
        prepare_data(job.replace(vocab_size=2048), quiet=True)

    before = sha256s(prepared_copy)
    truncate(prepared_copy / f"{PREFIX}.bin", 10)
    damaged = sha256s(prepared_copy)
    with pytest.raises(DataError, match="damaged, so it is not used"):
        prepare_data(job, quiet=True)
    assert sha256s(prepared_copy) == damaged != before

    partial = tmp_path / "only_a_tokenizer"
    partial.mkdir()
    shutil.copy(prepared_copy / "tokenizer.model", partial)
    with pytest.raises(DataError, match="no complete dataset"):
        prepare_data(job.replace(data=partial), quiet=True)
    assert sorted(p.name for p in partial.iterdir()) == ["tokenizer.model"]


def test_pretrain_verifies_its_data_before_megatron(prepared_copy, tmp_path):
    prefix, tok = prepared_copy / PREFIX, prepared_copy / "tokenizer.model"
    sp_flags = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tok]
    healthy = run_cli("pretrain", "--data-path", 1.0, prefix, *sp_flags)
    assert f"data: OK {prefix}" in healthy.stdout, healthy.stdout + healthy.stderr

    null = run_cli("pretrain", "--data-path", prefix, "--tokenizer-type", "NullTokenizer",
                   "--vocab-size", 100)
    assert "contains token id 999, but the tokenizer has only 101 pieces" in one_error_line(null)

    truncate(prefix.with_suffix(".bin"), 2)
    damaged = run_cli("pretrain", "--data-path", prefix, *sp_flags)
    line = one_error_line(damaged)
    assert damaged.returncode == 2 and f"--data-path {prefix}" in line and ".bin" in line


def test_pretrain_reads_blends_like_megatron(tmp_path):
    assert dataset_prefixes(["--data-path", "0.3", "a", "0.7", "b", "--split", "99,1,0"]) == ["a", "b"]
    assert dataset_prefixes(["--data-path", "a", "b", "c"]) == ["a", "b", "c"]
    assert dataset_prefixes(["--train-data-path", "a", "--valid-data-path", "1", "v"]) == ["a", "v"]
    assert dataset_prefixes(["--data-path", "a", "--mock-data"]) == []
    args_file = tmp_path / "blend.txt"
    args_file.write_text("0.5 x\n0.5 y\n")
    assert dataset_prefixes(["--data-args-path", str(args_file)]) == ["x", "y"]
    assert tokenizer_for_check(["--tokenizer-type", "NullTokenizer", "--vocab-size", "7"])[1] == 8
    assert tokenizer_for_check(["--tokenizer-type", "HuggingFaceTokenizer"])[:2] == (None, None)
