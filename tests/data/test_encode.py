"""Tokenizing: sliced encoding gives the whole-text ids; N workers give the 1-worker
dataset, in input order, with the same bad-record report; a huge record costs bounded memory."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polycom_megatron.data import build_indexed_dataset
from polycom_megatron.data.sources import pydoc_corpus_bytes
from polycom_megatron.data.encode import Encoder

from conftest import Terminal, read_back


def _awkward_text(length, seed=0):
    """Runs of spaces, tabs, newlines, multi-byte characters: where a bad cut would show."""
    rng = random.Random(seed)
    parts = ["  ", " ", "word", "é", "你好", "\n", "\t", " x", "🙂", "   b", "12345", "--"]
    return "".join(rng.choice(parts) for _ in range(length))


def test_sliced_encoding_gives_the_whole_text_ids(sp, tokenizer):
    proto = Path(tokenizer.model_path).read_bytes()
    texts = [_awkward_text(3000), " leading space", "  two leading", "x " * 800,
             "nospaceatall" * 100, pydoc_corpus_bytes(3)[0].decode()]
    for slice_chars in (1, 7, 256):
        encoder = Encoder(proto, "text", None, np.uint16, slice_chars=slice_chars)
        assert encoder.sliceable and encoder.dummy_prefix
        for text in texts:
            assert encoder.encode_batch([text])[0].tolist() == sp.encode(text), (slice_chars,
                                                                               text[:20])


def test_workers_give_the_one_worker_dataset(dirty_jsonl, corpus, tokenizer, sp, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_bytes(b"Para one\n\n\xff bad line\n\nPara three\n")
    inputs = [dirty_jsonl, corpus, text_file, dirty_jsonl]
    summaries = {}
    for workers in (1, 2):
        # Small batches: many in flight at once, finishing out of order across workers.
        summaries[workers] = build_indexed_dataset(
            inputs, tokenizer.model_path, tmp_path / f"w{workers}", progress=False,
            workers=workers, batch_size=5,
        )
    one, two = summaries[1], summaries[2]
    for suffix in (".bin", ".idx"):
        assert (Path(f"{one.output_prefix}{suffix}").read_bytes()
                == Path(f"{two.output_prefix}{suffix}").read_bytes()), suffix
    assert two.describe().splitlines()[2:] == one.describe().splitlines()[2:]  # bad records
    assert {r: (s.count, s.first_locations) for r, s in two.bad_records.items()} == {
        r: (s.count, s.first_locations) for r, s in one.bad_records.items()}
    # Input order: the pydoc topics come back as the corpus lists them.
    sequences, _, _ = read_back(two.output_prefix)
    topics = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert [sp.decode(ids[:-1]) for ids in sequences[3:3 + len(topics)]] == topics


def test_progress_bar_only_on_a_terminal(dirty_jsonl, tokenizer, tmp_path):
    import io

    log, terminal = io.StringIO(), Terminal()
    for stream, name in ((log, "log"), (terminal, "tty")):
        build_indexed_dataset(dirty_jsonl, tokenizer.model_path, tmp_path / name, workers=1,
                              progress_stream=stream)
    assert log.getvalue() == ""
    assert "data build: 100%" in terminal.getvalue()


MEASURE_PEAK = """
import json, resource, sys
from polycom_megatron.data import build
build._import_indexed_dataset()  # megatron.core's own footprint is not the record's
from polycom_megatron.data.tokenizer import load_tokenizer
load_tokenizer(sys.argv[2]).encode("warm up")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
build.build_indexed_dataset(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before}))
"""


def test_huge_record_costs_bounded_memory(tokenizer, tmp_path):
    # One 3 MB JSONL line of prose. Encoding it whole costs ~45x its size here (a 50 MB
    # record: 2.7 GB): SentencePiece's per-character state and Python's list of ids. Sliced,
    # the text and its few copies dominate (~4x): the bound leaves room either way.
    texts = [json.loads(line)["text"] for line in pydoc_corpus_bytes()[0].decode().splitlines()]
    text = "\n\n".join(texts)
    text = (text * (3_000_000 // len(text) + 1))[:3_000_000]
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    size_kib = path.stat().st_size / 1024
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, str(path), str(tokenizer.model_path),
         str(tmp_path / "ds")], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.splitlines()[-1])["growth_kib"]
    assert growth < 15 * size_kib, f"peak RSS grew {growth / size_kib:.1f}x the record's size"


def test_the_default_worker_count_follows_cores_and_input_size():
    from polycom_megatron.data.build import SMALL_INPUT_BYTES, resolve_workers

    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(None, SMALL_INPUT_BYTES - 1) == 1  # a pool would cost more
    assert resolve_workers(None, SMALL_INPUT_BYTES) == cores
    assert resolve_workers(None, None) == cores  # a pipe: size unknown
    assert resolve_workers(2, 10) == 2  # asked for explicitly
    with pytest.raises(ValueError, match="at least 1"):
        resolve_workers(0)
