"""Tests for polycom_megatron.training.data: corpus, tokenizer, indexed dataset, validation, CLI."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics as PYDOC_TOPICS

from polycom_megatron.training import data
from polycom_megatron.training.data import (
    CorruptDatasetError,
    NoValidRecordsError,
    build_indexed_dataset,
    main,
    pydoc_corpus,
    train_tokenizer,
    validate_indexed_dataset,
)

VOCAB_SIZE = 1000
REPO_ROOT = Path(__file__).resolve().parents[2]

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def corpus(workdir):
    path = workdir / "pydoc.jsonl"
    pydoc_corpus(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(workdir, corpus):
    return train_tokenizer(corpus, workdir / "tokenizer", VOCAB_SIZE)


@pytest.fixture(scope="module")
def sp(tokenizer):
    return spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))


@pytest.fixture(scope="module")
def dirty_jsonl(workdir):
    path = workdir / "dirty.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in DIRTY_LINES) + b"\n")
    return path


@pytest.fixture(scope="module")
def dirty_build(workdir, dirty_jsonl, tokenizer):
    progress = io.StringIO()
    summary = build_indexed_dataset(
        dirty_jsonl, tokenizer.model_path, workdir / "dirty_text_document",
        progress_stream=progress,
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


# ----- corpus and tokenizer -----------------------------------------------------------


def test_pydoc_corpus_writes_one_document_per_topic(corpus, tmp_path):
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == len(PYDOC_TOPICS)
    assert {doc["id"] for doc in docs} == {f"pydoc/{name}" for name in PYDOC_TOPICS}
    assert all(doc["text"] == PYDOC_TOPICS[doc["id"][len("pydoc/"):]] for doc in docs)

    assert pydoc_corpus(tmp_path / "few.jsonl", max_docs=5) == 5
    assert len((tmp_path / "few.jsonl").read_text(encoding="utf-8").splitlines()) == 5


def test_tokenizer_trains_on_pydoc_corpus(tokenizer, sp, corpus):
    assert tokenizer.model_path.is_file() and tokenizer.vocab_path.is_file()
    assert tokenizer.documents == len(PYDOC_TOPICS)
    assert sp.get_piece_size() == VOCAB_SIZE
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)

    text = json.loads(corpus.read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # no normalization, no whitespace collapsing
    assert len(ids) < len(text.encode("utf-8")) / 2  # it learned merges, not just bytes


def test_tokenizer_byte_fallback_never_produces_unk(sp):
    text = "naïve café 你好 🙂\tand a tab"
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_tokenizer_from_iterable_counts_bad_texts(tmp_path):
    texts = list(PYDOC_TOPICS.values()) + ["", "   ", 5]
    summary = train_tokenizer(iter(texts), tmp_path / "tok", 600)
    assert summary.documents == len(PYDOC_TOPICS)
    assert {r: s.count for r, s in summary.bad_records.items()} == {
        "empty_text": 2,
        "non_string_field": 1,
    }
    assert spm.SentencePieceProcessor(model_file=str(summary.model_path)).get_piece_size() == 600


def test_tokenizer_treats_a_list_of_strings_as_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file name"):
        train_tokenizer(["not a file name"], tmp_path / "tok", 500)


def test_tokenizer_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(data.TokenizerError, match="smaller --vocab-size"):
        train_tokenizer(iter(["a tiny corpus"] * 20), tmp_path / "tok", 5000)


# ----- building -----------------------------------------------------------------------


def test_build_counts_each_bad_record_reason(dirty_build):
    summary, progress = dirty_build
    assert summary.documents == len(GOOD_TEXTS)
    found = {reason: stats.count for reason, stats in summary.bad_records.items()}
    assert found == {reason: len(lines) for reason, lines in expected_bad_lines().items()}
    for reason, lines in expected_bad_lines().items():
        locations = summary.bad_records[reason].first_locations
        assert [int(loc.rsplit(":", 1)[1]) for loc in locations] == lines
    assert summary.bad_record_count == 9
    assert "[data build] 100.0%" in progress
    text = summary.describe()
    assert "3 documents" in text and "invalid_utf8: 2" in text and "tokens/s" in text


def test_build_round_trips_through_megatron_reader(dirty_build, sp):
    summary, _ = dirty_build
    sequences, document_indices, dtype = read_back(summary.output_prefix)
    expected = [sp.encode(text) + [sp.eos_id()] for text in GOOD_TEXTS]
    assert sequences == expected
    assert document_indices == [0, 1, 2, 3]
    assert dtype == np.uint16
    assert summary.tokens == sum(len(ids) for ids in expected)
    assert [sp.decode(ids[:-1]) for ids in sequences] == GOOD_TEXTS


def test_build_without_eod(dirty_jsonl, tokenizer, sp, tmp_path):
    summary = build_indexed_dataset(
        dirty_jsonl, tokenizer.model_path, tmp_path / "noeod", append_eod=False, progress=False
    )
    sequences, _, _ = read_back(summary.output_prefix)
    assert sequences == [sp.encode(text) for text in GOOD_TEXTS]
    assert summary.eod_id is None


def test_plain_text_paragraphs_and_lines(tokenizer, sp, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(
        b"Para one, line 1\nline 2\r\n\n\n   \nPara two\n\xff\xfe not UTF-8\nrest\n\nPara three"
    )
    by_paragraph = build_indexed_dataset(path, tokenizer.model_path, tmp_path / "p", progress=False)
    sequences, _, _ = read_back(by_paragraph.output_prefix)
    assert [sp.decode(ids[:-1]) for ids in sequences] == ["Para one, line 1\nline 2", "Para three"]
    assert by_paragraph.bad_records["invalid_utf8"].first_locations == [f"{path}:7"]

    by_line = build_indexed_dataset(
        path, tokenizer.model_path, tmp_path / "l", text_split="line", progress=False
    )
    sequences, _, _ = read_back(by_line.output_prefix)
    assert [sp.decode(ids[:-1]) for ids in sequences] == [
        "Para one, line 1", "line 2", "Para two", "rest", "Para three",
    ]
    assert by_line.bad_record_count == 1


def test_all_bad_file_fails_clearly_and_writes_nothing(dirty_jsonl, tokenizer, tmp_path):
    all_bad = tmp_path / "wrong_key.jsonl"
    all_bad.write_text('{"body": "a"}\n{"body": "b"}\n[1]\n', encoding="utf-8")
    out = tmp_path / "out" / "ds"
    # The good file comes first, so this also checks that nothing half-built survives.
    with pytest.raises(NoValidRecordsError) as caught:
        build_indexed_dataset([dirty_jsonl, all_bad], tokenizer.model_path, out, progress=False)
    message = str(caught.value)
    assert str(all_bad) in message
    assert "Most common reason: missing_field: 2" in message
    assert "--json-key" in message
    assert os.listdir(out.parent) == []


def test_empty_file_fails_clearly(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(NoValidRecordsError, match="empty.txt contains no documents"):
        build_indexed_dataset(empty, tokenizer.model_path, tmp_path / "ds", progress=False)


def test_missing_input_fails_before_any_work(tokenizer, dirty_jsonl, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_indexed_dataset(
            [dirty_jsonl, tmp_path / "nope.jsonl"], tokenizer.model_path, tmp_path / "ds"
        )
    assert not list(tmp_path.glob("ds*"))


def test_token_dtype_follows_megatron_rule():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab_size in (1000, 65499, 65500, 200_000):
        assert data.token_dtype_for_vocab(vocab_size) is DType.optimal_dtype(vocab_size)
    assert data.token_dtype_for_vocab(65499) is np.uint16
    assert data.token_dtype_for_vocab(65500) is np.int32


# ----- validation ---------------------------------------------------------------------


def test_validate_accepts_a_healthy_dataset(dirty_build):
    summary, _ = dirty_build
    info = validate_indexed_dataset(summary.output_prefix, vocab_size=VOCAB_SIZE)
    assert (info.documents, info.sequences, info.tokens) == (3, 3, summary.tokens)
    assert info.dtype == "uint16"
    assert 0 < info.max_token_id < VOCAB_SIZE


def _truncate(path, nbytes):
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - nbytes)


def _patch(path, offset, raw):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(raw)


# Offsets into the .idx: a 34-byte header, then int32 lengths, int64 pointers and int64
# document boundaries. The dataset under test has 3 sequences and 4 boundaries.
_POINTERS = 34 + 3 * 4
_BOUNDARIES = _POINTERS + 3 * 8

DAMAGE = {
    "bin truncated": (lambda p: _truncate(f"{p}.bin", 2), r"\.bin is truncated"),
    "bin emptied": (lambda p: _truncate(f"{p}.bin", os.path.getsize(f"{p}.bin")), "is empty"),
    "bin too long": (
        lambda p: open(f"{p}.bin", "ab").write(b"\0\0"), "different builds"),
    "bin missing": (lambda p: os.remove(f"{p}.bin"), r"\.bin does not exist"),
    "idx bad magic": (lambda p: _patch(f"{p}.idx", 0, b"XX"), "not a Megatron"),
    "idx truncated": (lambda p: _truncate(f"{p}.idx", 8), r"\.idx has .* truncated"),
    "idx header only": (lambda p: _truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 20),
                        r"\.idx is truncated"),
    "idx unknown dtype": (lambda p: _patch(f"{p}.idx", 17, b"\x63"), "unknown token dtype"),
    "idx pointer": (
        lambda p: _patch(f"{p}.idx", _POINTERS + 8, struct.pack("<q", 1 << 40)),
        "sequence 1 points to byte",
    ),
    "idx length": (lambda p: _patch(f"{p}.idx", 34, struct.pack("<i", 10_000)), "points to byte"),
    "idx boundary": (
        lambda p: _patch(f"{p}.idx", _BOUNDARIES + 3 * 8, struct.pack("<q", 9)), "rebuild|Rebuild"
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_validate_refuses_damage(damaged_copy, damage):
    validate_indexed_dataset(damaged_copy)  # the copy is healthy before the damage
    corrupt, message = DAMAGE[damage]
    corrupt(damaged_copy)
    with pytest.raises(CorruptDatasetError, match=message) as caught:
        validate_indexed_dataset(damaged_copy)
    assert "polycom-megatron data build" in str(caught.value)


def test_validate_refuses_tokens_outside_the_vocabulary(dirty_build):
    summary, _ = dirty_build
    with pytest.raises(CorruptDatasetError, match="different tokenizer"):
        validate_indexed_dataset(summary.output_prefix, vocab_size=10)


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

    _truncate(f"{damaged_copy}.bin", 4)
    assert main(["check", str(damaged_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err


def test_module_is_runnable():
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-m", "polycom_megatron.training.data", "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for command in ("pydoc", "tokenizer", "build", "check", "prepare"):
        assert command in result.stdout
