"""The data command line, in process (main) and as the installed executable."""

import json
import subprocess
import sys

import sentencepiece as spm

from polycom_megatron import data
from polycom_megatron.data import validate_indexed_dataset
from polycom_megatron.data.cli import main

from conftest import read_back, truncate


# ----- command line -------------------------------------------------------------------


def test_cli_prepare_end_to_end(tmp_path, capsys):
    out = tmp_path / "prepared"
    code = main(["prepare", "--output-dir", str(out), "--vocab-size", "800",
                 "--max-docs", "30", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    prefix = out / data.DEFAULT_DATASET_NAME
    assert f"--data-path {prefix}" in printed and "OK " in printed
    info = validate_indexed_dataset(prefix, vocab_size=800)
    assert info.documents == 30

    first = json.loads((out / "pydoc_corpus.jsonl").read_text(encoding="utf-8").splitlines()[0])
    tok = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    sequences, _, _ = read_back(prefix)
    assert sequences[0] == tok.encode(first["text"]) + [tok.eos_id()]


def test_cli_step_by_step(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    assert main(["pydoc", str(corpus), "--max-docs", "20"]) == 0
    assert main(["tokenizer", str(corpus), "--output-prefix", str(tmp_path / "tok"),
                 "--vocab-size", "600"]) == 0
    assert main(["build", str(corpus), "--tokenizer", str(tmp_path / "tok.model"),
                 "--output-prefix", str(tmp_path / "ds"), "--quiet"]) == 0
    assert main(["check", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok.model")]) == 0
    assert "20 documents" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "ds.bin")]) == 0  # a habitual .bin is forgiven


def test_cli_reports_errors_without_traceback(tmp_path, tokenizer, damaged_copy, capsys):
    code = main(["build", str(tmp_path / "missing.jsonl"), "--tokenizer",
                 str(tokenizer.model_path), "--output-prefix", str(tmp_path / "ds")])
    assert code == 1
    assert "input file(s) not found" in capsys.readouterr().err

    truncate(f"{damaged_copy}.bin", 4)
    assert main(["check", str(damaged_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err


def test_module_is_runnable():
    result = subprocess.run(
        [sys.executable, "-m", "polycom_megatron.data", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for command in ("pydoc", "tokenizer", "build", "check", "prepare"):
        assert command in result.stdout
