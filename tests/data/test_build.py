"""Building indexed datasets: bad records counted, round trip through Megatron-Core's reader."""

import os

import numpy as np
import pytest

from polycom_megatron import data
from polycom_megatron.data import NoValidRecordsError, build_indexed_dataset

from conftest import GOOD_TEXTS, expected_bad_lines, read_back


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
    assert "data build: 100%" in progress and "3 docs" in progress
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


