"""Shared fixtures for the data tests: one pydoc corpus, one tokenizer, one small dataset
built from a file with every kind of bad record, and helpers to run the installed command."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from polycom_megatron.data import build_indexed_dataset, pydoc_corpus, train_tokenizer

VOCAB_SIZE = 1000
# The installed console script, next to the interpreter running the tests.
EXECUTABLE = str(Path(sys.executable).with_name("polycom-megatron"))

GOOD_TEXTS = [
    "The first good document.",
    "Second one, with Unicode: naïve café 你好 🙂.",
    "def f(x):\n    return x + 1\n",
]

# (raw line, what the reader must make of it). The reasons are the point of the test, so
# each kind of damage appears on a known line.
DIRTY_LINES = [
    (json.dumps({"text": GOOD_TEXTS[0]}).encode(), "good"),  # line 1
    (b'{"text": "caf\xe9 in latin-1"}', "invalid_utf8"),  # line 2
    (b'{"text": "unterminated', "invalid_json"),  # line 3
    (b"", "blank"),  # line 4: not a record at all
    (b'{"body": "text under the wrong key"}', "missing_field"),  # line 5
    (json.dumps({"text": GOOD_TEXTS[1]}).encode(), "good"),  # line 6
    (b'{"text": "   \\n\\t "}', "empty_text"),  # line 7
    (b'{"text": 42}', "non_string_field"),  # line 8
    (b'{"text": null}', "non_string_field"),  # line 9
    (b'["text", "a list, not an object"]', "not_object"),  # line 10
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),  # line 11
    (json.dumps({"text": GOOD_TEXTS[2], "id": 7}).encode(), "good"),  # line 12
    (b'{"text": ""}', "empty_text"),  # line 13
]


def expected_bad_lines():
    by_reason = {}
    for line_no, (_, kind) in enumerate(DIRTY_LINES, start=1):
        if kind not in ("good", "blank"):
            by_reason.setdefault(kind, []).append(line_no)
    return by_reason


def read_back(prefix):
    """Tokens, document boundaries and dtype, read through Megatron-Core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    try:
        # .tolist() copies: the dataset closes its memory maps when it is deleted.
        sequences = [dataset[i].tolist() for i in range(len(dataset))]
        return sequences, dataset.document_indices.tolist(), dataset.index.dtype
    finally:
        del dataset


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus(workdir):
    path = workdir / "pydoc.jsonl"
    pydoc_corpus(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(workdir, corpus):
    return train_tokenizer(corpus, workdir / "tokenizer", VOCAB_SIZE)


@pytest.fixture(scope="session")
def sp(tokenizer):
    return spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))


@pytest.fixture(scope="session")
def dirty_jsonl(workdir):
    path = workdir / "dirty.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in DIRTY_LINES) + b"\n")
    return path


class Terminal(io.StringIO):
    """A stream that says it is a terminal, where the progress bar is drawn."""

    def isatty(self):
        return True


@pytest.fixture(scope="session")
def dirty_build(workdir, dirty_jsonl, tokenizer):
    progress = Terminal()
    summary = build_indexed_dataset(
        dirty_jsonl, tokenizer.model_path, workdir / "dirty_text_document",
        progress_stream=progress, workers=1,
    )
    return summary, progress.getvalue()


@pytest.fixture
def damaged_copy(dirty_build, tmp_path):
    """A private copy of the good dataset, for tests that damage it."""
    summary, _ = dirty_build
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{summary.output_prefix}{suffix}", f"{prefix}{suffix}")
    return prefix



def truncate(path, nbytes):
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - nbytes)


def patch_bytes(path, offset, raw):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(raw)



def run_cli(*args, timeout=300, **kwargs):
    """``polycom-megatron ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [EXECUTABLE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def one_error_line(result):
    """The stderr of a failed command: exactly one line, starting with ``error:``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if not line.startswith("note:")]
    assert len(errors) == 1 and "error: " in errors[0], result.stderr
    return errors[0]


def sha256s(directory):
    """sha256 of every file under ``directory`` (relative name -> hex)."""
    import hashlib

    directory = Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
    """A small directory made by `data prepare` (pydoc corpus, 40 topics, vocab 1000)."""
    out = tmp_path_factory.mktemp("prepared") / "mydata"
    result = run_cli("data", "prepare", "--output-dir", out, "--vocab-size", VOCAB_SIZE,
                     "--max-docs", 40, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def prepared_copy(prepared_dir, tmp_path):
    """A private copy of ``prepared_dir``, for tests that damage or re-run it."""
    copy = tmp_path / "mydata"
    shutil.copytree(prepared_dir, copy)
    return copy
