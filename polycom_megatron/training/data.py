"""Data preparation for pretraining: text -> SentencePiece tokenizer -> Megatron indexed dataset.

The pieces, in the order a fresh machine needs them:

* ``pydoc_corpus``: writes real English text (CPython's bundled help topics) as JSONL, so
  there is something to train on without a network.
* ``train_tokenizer``: trains a SentencePiece BPE (or unigram) model, ``<prefix>.model``.
* ``build_indexed_dataset``: tokenizes JSONL or plain-text files into Megatron-Core's
  ``<prefix>.bin`` / ``<prefix>.idx`` pair, which ``--data-path <prefix>`` reads.
* ``validate_indexed_dataset``: refuses a damaged ``.bin``/``.idx`` pair with a clear
  ``CorruptDatasetError`` before training reads garbage from it.
* ``prepare``: all of the above into one directory.
* ``main``: the command line (``python -m polycom_megatron.training.data --help``).

Input formats
-------------
Files ending in ``.jsonl``, ``.ndjson`` or ``.json`` are read as JSON Lines: one JSON object
per line, the document text under ``json_key`` (default ``"text"``); blank lines are ignored.
Any other file is plain UTF-8 text where documents are separated by one or more blank lines
(``text_split="paragraph"``), or where every non-blank line is a document
(``text_split="line"``). ``input_format`` overrides the guess from the file name.

Bad records never stop a build halfway: each is skipped and counted under one of
``BAD_RECORD_REASONS`` with the first few ``file:line`` locations. Only a file in which no
record at all is usable stops the build (``NoValidRecordsError``), because that almost always
means a wrong ``json_key`` or a wrong file, not a few dirty lines.

Megatron-Core is imported lazily (only by the functions that read or write indexed datasets)
because importing it pulls in all of ``megatron.core`` and takes several seconds.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
INPUT_FORMATS = ("auto", "jsonl", "text")
TEXT_SPLITS = ("paragraph", "line")
MODEL_TYPES = ("bpe", "unigram")

# Why a record was skipped -> what that means, for summaries and error messages.
BAD_RECORD_REASONS: Dict[str, str] = {
    "invalid_utf8": "not valid UTF-8 (raw bytes, or a lone \\uD800-style surrogate escape)",
    "invalid_json": "not parseable as JSON",
    "not_object": "JSON value is not an object",
    "missing_field": "the text field is missing",
    "non_string_field": "the text field is not a string",
    "empty_text": "the text is empty or only whitespace",
    "no_tokens": "the tokenizer produced no tokens for the text",
}

# How many "file:line" locations to remember per reason; enough to find the pattern.
MAX_EXAMPLE_LOCATIONS = 5

# Megatron's own prefix convention for tokenized text (tools/preprocess_data.py).
DEFAULT_DATASET_NAME = "corpus_text_document"

# Special pieces get fixed ids so every model trained here agrees with Megatron's
# SentencePiece wrappers, which use eos as the end-of-document (EOD) token.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Byte layout of the .idx header written by megatron.core.datasets.indexed_dataset:
# 9-byte magic, uint64 version (1), uint8 dtype code, uint64 sequence count,
# uint64 document count. The three arrays follow: int32 lengths, int64 pointers,
# int64 document indices (then int8 modes for multimodal datasets).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")

REBUILD_HINT = (
    "Rebuild it with `polycom-megatron data build --tokenizer TOKENIZER.model "
    "--output-prefix PREFIX INPUT...` (or `python -m polycom_megatron.training.data build ...`)."
)


class DataError(ValueError):
    """Something about the data (not the code) is wrong; the message says what and how to fix it."""


class CorruptDatasetError(DataError):
    """An indexed dataset (.bin/.idx pair) is missing, damaged or inconsistent."""


class NoValidRecordsError(DataError):
    """An input file yielded no usable document at all."""


class TokenizerError(DataError):
    """A tokenizer could not be trained or loaded."""


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


@dataclass
class BadRecordStats:
    """How often one reason occurred, and where the first few occurrences are."""

    reason: str
    count: int = 0
    first_locations: List[str] = field(default_factory=list)

    def describe(self) -> str:
        where = ", ".join(self.first_locations)
        more = ", ..." if self.count > len(self.first_locations) else ""
        return f"{self.reason}: {self.count} ({BAD_RECORD_REASONS[self.reason]}; at {where}{more})"


class BadRecordLog:
    """Counts skipped records per reason, keeping the first few locations of each."""

    def __init__(self) -> None:
        self.by_reason: Dict[str, BadRecordStats] = {}

    def add(self, reason: str, location: str) -> None:
        stats = self.by_reason.setdefault(reason, BadRecordStats(reason))
        stats.count += 1
        if len(stats.first_locations) < MAX_EXAMPLE_LOCATIONS:
            stats.first_locations.append(location)

    def merge(self, other: "BadRecordLog") -> None:
        for reason, theirs in other.by_reason.items():
            mine = self.by_reason.setdefault(reason, BadRecordStats(reason))
            mine.count += theirs.count
            room = MAX_EXAMPLE_LOCATIONS - len(mine.first_locations)
            mine.first_locations.extend(theirs.first_locations[:room])

    @property
    def total(self) -> int:
        return sum(stats.count for stats in self.by_reason.values())

    def most_common(self) -> Optional[BadRecordStats]:
        return max(self.by_reason.values(), key=lambda stats: stats.count, default=None)

    def describe_lines(self) -> List[str]:
        ordered = sorted(self.by_reason.values(), key=lambda stats: -stats.count)
        return [stats.describe() for stats in ordered]


@dataclass
class TokenizerSummary:
    """What ``train_tokenizer`` produced."""

    model_path: Path
    vocab_path: Path
    vocab_size: int
    model_type: str
    documents: int
    sentences: int
    bad_records: Dict[str, BadRecordStats]
    elapsed_s: float

    def describe(self) -> str:
        lines = [
            f"Trained a {self.model_type} tokenizer with {self.vocab_size} pieces on "
            f"{self.documents:,} documents ({self.sentences:,} lines) in {self.elapsed_s:.1f} s",
            f"  model: {self.model_path}",
            f"  vocab: {self.vocab_path}",
        ]
        lines += _describe_bad_records(self.bad_records)
        return "\n".join(lines)


@dataclass
class BuildSummary:
    """What ``build_indexed_dataset`` wrote."""

    output_prefix: Path
    input_files: List[Path]
    documents: int
    tokens: int
    dtype: str
    eod_id: Optional[int]
    bad_records: Dict[str, BadRecordStats]
    elapsed_s: float

    @property
    def bad_record_count(self) -> int:
        return sum(stats.count for stats in self.bad_records.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def describe(self) -> str:
        eod = f", EOD id {self.eod_id} appended" if self.eod_id is not None else ", no EOD"
        lines = [
            f"Wrote {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}{eod}) "
            f"from {len(self.input_files)} file(s) to {self.output_prefix}.bin/.idx",
            f"  elapsed {self.elapsed_s:.1f} s, {self.tokens_per_s:,.0f} tokens/s",
        ]
        lines += _describe_bad_records(self.bad_records)
        return "\n".join(lines)


@dataclass
class DatasetInfo:
    """What ``validate_indexed_dataset`` found in a healthy dataset."""

    prefix: Path
    dtype: str
    sequences: int
    documents: int
    tokens: int
    max_token_id: Optional[int]

    def describe(self) -> str:
        largest = "" if self.max_token_id is None else f", largest token id {self.max_token_id}"
        return (
            f"OK {self.prefix}.bin/.idx: {self.documents:,} documents, {self.sequences:,} "
            f"sequences, {self.tokens:,} tokens ({self.dtype}{largest})"
        )


@dataclass
class PrepareSummary:
    """What ``prepare`` left in its output directory."""

    output_dir: Path
    corpus_path: Optional[Path]
    tokenizer: TokenizerSummary
    build: BuildSummary
    check: DatasetInfo

    @property
    def data_prefix(self) -> Path:
        return self.build.output_prefix

    def describe(self) -> str:
        parts = []
        if self.corpus_path is not None:
            parts.append(f"Corpus: {self.corpus_path}")
        parts += [self.tokenizer.describe(), self.build.describe(), self.check.describe()]
        parts.append(
            "Use it for training with:\n"
            f"  --data-path {self.data_prefix} --tokenizer-model {self.tokenizer.model_path}"
        )
        return "\n".join(parts)


def _describe_bad_records(bad_records: Dict[str, BadRecordStats]) -> List[str]:
    total = sum(stats.count for stats in bad_records.values())
    if total == 0:
        return ["  bad records skipped: 0"]
    ordered = sorted(bad_records.values(), key=lambda stats: -stats.count)
    return [f"  bad records skipped: {total:,}"] + [f"    {s.describe()}" for s in ordered]


# --------------------------------------------------------------------------------------
# Reading input files
# --------------------------------------------------------------------------------------


@dataclass
class Record:
    """One usable document. ``offset`` is how far into the file reading has got (for progress)."""

    text: str
    location: str
    offset: int


@dataclass
class BadRecord:
    """One skipped record and why."""

    reason: str
    location: str
    offset: int


def resolve_input_files(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Turn one path or a list of paths into checked ``Path`` objects.

    Checking everything up front means a typo in the last file name fails at once
    rather than after an hour of tokenizing the first files.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise FileNotFoundError("no input files were given")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    not_files = [str(p) for p in paths if not p.is_file()]
    if not_files:
        raise FileNotFoundError(f"input path(s) are not regular files: {', '.join(not_files)}")
    return paths


def iter_records(
    path: PathLike,
    json_key: str = "text",
    input_format: str = "auto",
    text_split: str = "paragraph",
) -> Iterator[Union[Record, BadRecord]]:
    """Yield every record of one file, usable (``Record``) or not (``BadRecord``), in order."""
    path = Path(path)
    _check_choice("input_format", input_format, INPUT_FORMATS)
    _check_choice("text_split", text_split, TEXT_SPLITS)
    is_jsonl = input_format == "jsonl" or (
        input_format == "auto" and path.suffix.lower() in JSONL_SUFFIXES
    )
    if is_jsonl:
        return _iter_jsonl(path, json_key)
    return _iter_plain_text(path, text_split)


def _iter_jsonl(path: Path, json_key: str) -> Iterator[Union[Record, BadRecord]]:
    # Read bytes, not text: a single undecodable line must cost one record, whereas a
    # text-mode file object would raise and end the whole file.
    with open(path, "rb") as stream:
        offset = 0
        for line_no, raw in enumerate(stream, start=1):
            offset += len(raw)
            location = f"{path}:{line_no}"
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # editors on Windows like to add one
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRecord("invalid_utf8", location, offset)
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSONL; they are not records
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                yield BadRecord("invalid_json", location, offset)
                continue
            if not isinstance(obj, dict):
                yield BadRecord("not_object", location, offset)
            elif json_key not in obj:
                yield BadRecord("missing_field", location, offset)
            else:
                yield _text_record(obj[json_key], location, offset)


def _iter_plain_text(path: Path, text_split: str) -> Iterator[Union[Record, BadRecord]]:
    with open(path, "rb") as stream:
        offset = 0
        block: List[str] = []  # lines of the paragraph being collected
        block_start = 0
        bad_line = 0  # first undecodable line of the current paragraph, 0 if none
        for line_no, raw in enumerate(stream, start=1):
            offset += len(raw)
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line: Optional[str] = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                line = None
            if text_split == "line":
                if line is None:
                    yield BadRecord("invalid_utf8", f"{path}:{line_no}", offset)
                elif line.strip():
                    yield Record(line, f"{path}:{line_no}", offset)
                continue
            if line is not None and not line.strip():  # a blank line ends a paragraph
                if block or bad_line:
                    yield _paragraph_record(path, block, block_start, bad_line, offset)
                block, bad_line = [], 0
                continue
            if not block and not bad_line:
                block_start = line_no
            if line is None:
                bad_line = bad_line or line_no
            else:
                block.append(line)
        if block or bad_line:
            yield _paragraph_record(path, block, block_start, bad_line, offset)


def _paragraph_record(
    path: Path, block: List[str], start: int, bad_line: int, offset: int
) -> Union[Record, BadRecord]:
    # One bad line spoils its paragraph: keeping the rest would silently glue together
    # text that was never adjacent.
    if bad_line:
        return BadRecord("invalid_utf8", f"{path}:{bad_line}", offset)
    return Record("\n".join(block), f"{path}:{start}", offset)


def _text_record(value: object, location: str, offset: int) -> Union[Record, BadRecord]:
    if not isinstance(value, str):
        return BadRecord("non_string_field", location, offset)
    try:
        # JSON may spell lone surrogates ("\ud800"), which are not encodable text and make
        # SentencePiece fail for the whole batch they are in.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return BadRecord("invalid_utf8", location, offset)
    if not value.strip():
        return BadRecord("empty_text", location, offset)
    return Record(value, location, offset)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


# --------------------------------------------------------------------------------------
# An offline corpus
# --------------------------------------------------------------------------------------


def pydoc_corpus(output_path: PathLike, max_docs: Optional[int] = None) -> int:
    """Write CPython's help topics (``pydoc_data.topics``) as JSONL; return the number written.

    Every CPython install carries this ~0.5 MB of English prose and code examples, so a
    machine without network access still has real text to train a tokenizer and a small
    model on. One document per topic, ``{"id": "pydoc/<topic>", "text": ...}``, sorted by
    topic so the file is the same on every run.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data from "minimal" Pythons
        raise DataError(
            "this Python has no pydoc_data module (a stripped-down install?); "
            "pass your own text files instead"
        ) from exc
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, not {max_docs}")
    names = sorted(topics)[:max_docs]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as stream:
        for name in names:
            stream.write(json.dumps({"id": f"pydoc/{name}", "text": topics[name]}) + "\n")
    return len(names)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer(
    text_files_or_iterable: Union[PathLike, Sequence[PathLike], Iterable[str]],
    output_prefix: PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    json_key: str = "text",
    input_format: str = "auto",
    text_split: str = "paragraph",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    max_sentence_bytes: int = 16384,
    num_threads: Optional[int] = None,
) -> TokenizerSummary:
    """Train a SentencePiece tokenizer and write ``<output_prefix>.model`` and ``.vocab``.

    ``text_files_or_iterable`` is either a path, a list/tuple of paths (read as described in
    the module docstring; bad records are skipped and counted), or any other iterable of
    document strings (e.g. a generator). A list of strings is taken as paths, never as texts:
    pass ``iter(texts)`` for in-memory documents.

    The settings aim at a pretraining tokenizer that loses nothing: no Unicode normalization
    and no whitespace collapsing (so code indentation survives and ``decode(encode(t)) == t``),
    byte fallback (so no text ever becomes ``<unk>``), and digits split one per piece.
    Special ids are fixed: unk=0, bos=1, eos=2 (the EOD token), pad=3.

    Documents are fed line by line, and lines longer than ``max_sentence_bytes`` are cut,
    because SentencePiece silently drops over-long "sentences". At most ``max_sentences``
    lines, sampled at random, are used, which bounds memory on large corpora.
    """
    import sentencepiece as spm

    _check_choice("model_type", model_type, MODEL_TYPES)
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be at least 16, not {vocab_size}")
    documents, bad = _document_source(text_files_or_iterable, json_key, input_format, text_split)
    counter = _DocumentCounter(documents)
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(counter, max_sentence_bytes),
            model_prefix=str(output_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_bytes,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # SentencePiece's INFO log is hundreds of lines per run
        )
    except RuntimeError as exc:
        if counter.error is not None:
            raise counter.error from None
        if counter.documents == 0:
            raise NoValidRecordsError(
                "no usable text to train the tokenizer on" + _bad_suffix(bad)
            ) from exc
        raise TokenizerError(
            f"SentencePiece training failed: {exc}\n(vocab_size={vocab_size} needs enough "
            "distinct text; use a smaller --vocab-size or give more text)"
        ) from exc
    if counter.error is not None:  # SentencePiece trained on what came before the failure
        raise counter.error
    return TokenizerSummary(
        model_path=output_prefix.with_name(output_prefix.name + ".model"),
        vocab_path=output_prefix.with_name(output_prefix.name + ".vocab"),
        vocab_size=vocab_size,
        model_type=model_type,
        documents=counter.documents,
        sentences=counter.lines,
        bad_records=bad.by_reason,
        elapsed_s=time.perf_counter() - started,
    )


def _document_source(
    source: Union[PathLike, Sequence[PathLike], Iterable[str]],
    json_key: str,
    input_format: str,
    text_split: str,
) -> "tuple[Iterator[str], BadRecordLog]":
    """Texts to train on, plus the log that bad records are counted into while reading."""
    bad = BadRecordLog()
    if isinstance(source, (str, os.PathLike, list, tuple)):
        paths = resolve_input_files(source)  # type: ignore[arg-type]

        def from_files() -> Iterator[str]:
            for path in paths:
                for item in iter_records(path, json_key, input_format, text_split):
                    if isinstance(item, BadRecord):
                        bad.add(item.reason, item.location)
                    else:
                        yield item.text

        return from_files(), bad

    def from_texts() -> Iterator[str]:
        for number, text in enumerate(source, start=1):  # type: ignore[arg-type]
            record = _text_record(text, f"<text #{number}>", 0)
            if isinstance(record, BadRecord):
                bad.add(record.reason, record.location)
            else:
                yield record.text

    return from_texts(), bad


class _DocumentCounter:
    """Passes documents through, counting them and the lines fed to SentencePiece.

    It also catches a failure while reading (a vanished file, say): raised inside
    SentencePiece's C++ loop it would come back as an opaque RuntimeError, so it is kept in
    ``error`` and re-raised as itself once training returns.
    """

    def __init__(self, documents: Iterator[str]) -> None:
        self._documents = documents
        self.documents = 0
        self.lines = 0
        self.error: Optional[Exception] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._documents:
                self.documents += 1
                yield text
        except Exception as exc:
            self.error = exc


def _training_lines(counter: _DocumentCounter, max_bytes: int) -> Iterator[str]:
    # A UTF-8 character takes at most 4 bytes, so this many characters always fit.
    chunk_chars = max(1, max_bytes // 4)
    for text in counter:
        for line in text.splitlines():
            if not line.strip():
                continue
            for start in range(0, len(line), chunk_chars):
                counter.lines += 1
                yield line[start : start + chunk_chars]


def _bad_suffix(bad: BadRecordLog) -> str:
    if bad.total == 0:
        return " (the input is empty)"
    return f"; all {bad.total} records were bad:\n  " + "\n  ".join(bad.describe_lines())


def load_tokenizer(model_path: PathLike):
    """Load a SentencePiece model, with a clear error for a missing or invalid file."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{model_path} is not a SentencePiece model: {exc}") from exc


# --------------------------------------------------------------------------------------
# Building the indexed dataset
# --------------------------------------------------------------------------------------


def token_dtype_for_vocab(vocab_size: int) -> "type[np.number]":
    """The narrowest token dtype for a vocabulary: uint16 below 65500 pieces, else int32.

    The 65500 threshold is Megatron-Core's own (``DType.optimal_dtype``, used by its
    ``tools/preprocess_data.py``); using the same rule keeps our files identical to theirs.
    """
    return np.uint16 if vocab_size < 65500 else np.int32


def build_indexed_dataset(
    inputs: Union[PathLike, Sequence[PathLike]],
    tokenizer_model: PathLike,
    output_prefix: PathLike,
    json_key: str = "text",
    append_eod: bool = True,
    *,
    input_format: str = "auto",
    text_split: str = "paragraph",
    batch_size: int = 256,
    num_threads: Optional[int] = None,
    progress: bool = True,
    progress_stream: Optional[TextIO] = None,
) -> BuildSummary:
    """Tokenize text files into a Megatron indexed dataset ``<output_prefix>.bin``/``.idx``.

    Each document becomes one sequence (plus the tokenizer's eos id when ``append_eod``),
    which is what Megatron's GPT dataset expects. Files are read as described in the module
    docstring; bad records are skipped and counted, and a file with no usable record raises
    ``NoValidRecordsError``. Output is written under temporary names and renamed at the end,
    so an interrupted or failed build never leaves a half-written dataset behind.
    """
    indexed = _import_indexed_dataset()
    paths = resolve_input_files(inputs)
    tokenizer = load_tokenizer(tokenizer_model)
    eod_id = _eod_id(tokenizer, tokenizer_model) if append_eod else None
    dtype = token_dtype_for_vocab(tokenizer.get_piece_size())
    output_prefix = dataset_prefix(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    partial_prefix = str(output_prefix) + ".partial"
    partial_bin, partial_idx = partial_prefix + ".bin", partial_prefix + ".idx"

    started = time.perf_counter()
    bad = BadRecordLog()
    documents = tokens = 0
    progress_bar = _Progress(paths, enabled=progress, stream=progress_stream or sys.stderr)
    builder = indexed.IndexedDatasetBuilder(partial_bin, dtype=dtype)
    try:
        for path in paths:
            writer = _FileWriter(path, tokenizer, builder, eod_id, batch_size, num_threads)
            writer.run(iter_records(path, json_key, input_format, text_split), progress_bar)
            if writer.documents == 0:
                raise NoValidRecordsError(_no_valid_records_message(path, writer.bad, json_key))
            documents += writer.documents
            tokens += writer.tokens
            bad.merge(writer.bad)
        progress_bar.finish()
        builder.finalize(partial_idx)
    except BaseException:
        progress_bar.finish()  # so an error message starts on a line of its own
        _discard(builder, partial_bin, partial_idx)
        raise
    # .bin first: if we die between the two renames, an old .idx next to a new .bin fails
    # validation on size instead of silently pairing up.
    os.replace(partial_bin, str(output_prefix) + ".bin")
    os.replace(partial_idx, str(output_prefix) + ".idx")
    return BuildSummary(
        output_prefix=output_prefix,
        input_files=paths,
        documents=documents,
        tokens=tokens,
        dtype=np.dtype(dtype).name,
        eod_id=eod_id,
        bad_records=bad.by_reason,
        elapsed_s=time.perf_counter() - started,
    )


class _FileWriter:
    """Tokenizes the records of one file in batches and appends them to the builder."""

    def __init__(
        self,
        path: Path,
        tokenizer,  # sentencepiece.SentencePieceProcessor
        builder,  # megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder
        eod_id: Optional[int],
        batch_size: int,
        num_threads: Optional[int],
    ) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.builder = builder
        self.eod_id = eod_id
        self.batch_size = max(1, batch_size)
        self.num_threads = num_threads or os.cpu_count() or 1
        self.bad = BadRecordLog()
        self.documents = 0
        self.tokens = 0

    def run(self, records: Iterable[Union[Record, BadRecord]], progress: "_Progress") -> None:
        batch: List[Record] = []
        for item in records:
            if isinstance(item, BadRecord):
                self.bad.add(item.reason, item.location)
                continue
            batch.append(item)
            if len(batch) >= self.batch_size:
                self._write(batch)
                progress.update(self.path, batch[-1].offset, self.documents, self.tokens)
                batch = []
        if batch:
            self._write(batch)
        progress.file_done(self.path, self.documents, self.tokens)

    def _write(self, batch: List[Record]) -> None:
        # One call for the whole batch lets SentencePiece tokenize on several threads.
        encoded = self.tokenizer.encode([r.text for r in batch], num_threads=self.num_threads)
        for record, ids in zip(batch, encoded):
            if not ids:
                self.bad.add("no_tokens", record.location)
                continue
            if self.eod_id is not None:
                ids.append(self.eod_id)
            # A plain list, as Megatron's own tools/preprocess_data.py passes it: every
            # megatron-core version's add_document does numpy.array(ids, dtype=its dtype).
            self.builder.add_document(ids, [len(ids)])
            self.documents += 1
            self.tokens += len(ids)


def _eod_id(tokenizer, model_path: PathLike) -> int:
    eod_id = tokenizer.eos_id()
    if eod_id < 0:
        raise TokenizerError(
            f"{model_path} has no end-of-sentence piece to use as end-of-document; "
            "retrain it with train_tokenizer, or build with append_eod=False (--no-eod)"
        )
    return eod_id


def _no_valid_records_message(path: Path, bad: BadRecordLog, json_key: str) -> str:
    worst = bad.most_common()
    if worst is None:
        return f"{path} contains no documents (it is empty or only blank lines)"
    hints = {
        "missing_field": f"Is the text stored under another key? Pass --json-key "
        f"(now {json_key!r}).",
        "non_string_field": f"The {json_key!r} field holds no strings; pass the key of the text.",
        "invalid_json": "Is this really JSON Lines? For plain text, use a .txt file name or "
        "--input-format text.",
        "not_object": "Each line must be a JSON object like {\"text\": \"...\"}.",
        "invalid_utf8": "The file is not UTF-8; convert it first (e.g. iconv -f latin1 -t utf-8).",
        "empty_text": "Every document is empty.",
    }
    message = (
        f"{path}: no usable documents, all {bad.total} records were skipped. Most common "
        f"reason: {worst.describe()}. {hints.get(worst.reason, '')}".rstrip()
    )
    if len(bad.by_reason) > 1:
        message += "\n  all reasons:\n    " + "\n    ".join(bad.describe_lines())
    return message


def _discard(builder, *paths: str) -> None:
    # IndexedDatasetBuilder opens its .bin at construction and closes it only in finalize().
    data_file = getattr(builder, "data_file", None)
    if data_file is not None and not data_file.closed:
        data_file.close()
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


class _Progress:
    """A one-line progress report on stderr: percent of input bytes, documents, tokens/s.

    Redraws in place a few times a second on a terminal; in a log file it writes a new line
    every 30 s instead, so logs stay short.
    """

    def __init__(self, paths: List[Path], enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self.total_bytes = sum(p.stat().st_size for p in paths) or 1
        self.done_bytes = 0  # bytes of files already finished
        self.documents = self.tokens = 0  # of files already finished
        self.started = time.perf_counter()
        self.is_tty = hasattr(stream, "isatty") and stream.isatty()
        self.interval = 0.25 if self.is_tty else 30.0
        self.last_draw = 0.0
        self.drawn = False

    def update(self, path: Path, offset: int, documents: int, tokens: int, force=False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last_draw < self.interval):
            return
        self.last_draw = now
        self.drawn = True
        fraction = min(1.0, (self.done_bytes + offset) / self.total_bytes)
        docs, toks = self.documents + documents, self.tokens + tokens
        rate = toks / max(now - self.started, 1e-9)
        line = (
            f"[data build] {fraction:6.1%} {path.name}: {docs:,} docs, {toks:,} tokens, "
            f"{rate:,.0f} tokens/s"
        )
        self.stream.write(("\r" + line) if self.is_tty else (line + "\n"))
        self.stream.flush()

    def file_done(self, path: Path, documents: int, tokens: int) -> None:
        size = path.stat().st_size
        self.update(path, size, documents, tokens, force=True)
        self.done_bytes += size
        self.documents += documents
        self.tokens += tokens

    def finish(self) -> None:
        if self.drawn and self.is_tty:  # end the line that was being redrawn in place
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _import_indexed_dataset():
    """Import megatron.core's indexed_dataset module, quietly.

    Importing it imports all of megatron.core, which warns about optional CUDA packages
    (Transformer Engine, Apex) that data preparation never uses.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# --------------------------------------------------------------------------------------
# Validating an indexed dataset
# --------------------------------------------------------------------------------------


def dataset_prefix(path: PathLike) -> Path:
    """The dataset prefix for a path, forgiving a ``.bin``/``.idx`` typed out of habit."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def validate_indexed_dataset(
    prefix: PathLike, vocab_size: Optional[int] = None, multimodal: bool = False
) -> DatasetInfo:
    """Check that ``<prefix>.idx`` and ``<prefix>.bin`` are a consistent pair; raise if not.

    Megatron reads tokens straight out of a memory map at the offsets stored in the index,
    so a truncated ``.bin`` or a damaged ``.idx`` would feed garbage (or crash deep inside a
    data loader worker). This checks, in order: both files exist; the header is readable;
    the ``.idx`` size matches its header; Megatron-Core's ``IndexedDataset`` opens the pair;
    document boundaries and sequence pointers are in range and contiguous; the ``.bin`` size
    is exactly what the index describes; and, with ``vocab_size``, that no token id is out of
    the vocabulary (a dataset built with another tokenizer). Raises ``CorruptDatasetError``.
    """
    prefix = dataset_prefix(prefix)
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise CorruptDatasetError(f"{path} does not exist. {REBUILD_HINT}")
    header = _read_idx_header(idx_path, multimodal)
    dataset = _open_with_megatron(prefix, multimodal)
    try:
        # Copies, not views: Megatron-Core closes its memory maps when the dataset object
        # dies, and touching a view into a closed map crashes the interpreter (segfault).
        lengths = np.array(dataset.index.sequence_lengths)
        pointers = np.array(dataset.index.sequence_pointers)
        doc_indices = np.array(dataset.index.document_indices)
        _check_document_indices(idx_path, doc_indices, header.sequences)
        tokens = _check_sequence_pointers(idx_path, lengths, pointers, header.itemsize)
        _check_bin_size(bin_path, tokens, header.itemsize, header.sequences)
        max_token = _max_token_id(dataset.bin_reader, header.dtype, tokens) if tokens else None
    finally:
        del dataset  # closes the memory maps now rather than whenever GC gets to it
    if vocab_size is not None and max_token is not None and max_token >= vocab_size:
        raise CorruptDatasetError(
            f"{bin_path} contains token id {max_token}, but the tokenizer has only {vocab_size} "
            f"pieces: the dataset was built with a different tokenizer. {REBUILD_HINT}"
        )
    return DatasetInfo(
        prefix=prefix,
        dtype=np.dtype(header.dtype).name,
        sequences=header.sequences,
        documents=header.documents - 1,  # the index stores a leading 0 boundary
        tokens=tokens,
        max_token_id=max_token,
    )


@dataclass
class _IdxHeader:
    dtype: "type[np.number]"
    itemsize: int
    sequences: int
    documents: int  # number of document boundaries, i.e. documents + 1


def _read_idx_header(idx_path: Path, multimodal: bool) -> _IdxHeader:
    indexed = _import_indexed_dataset()
    size = idx_path.stat().st_size
    if size < _IDX_HEADER.size:
        raise CorruptDatasetError(
            f"{idx_path} is truncated: {size} bytes, but the header alone takes "
            f"{_IDX_HEADER.size}. {REBUILD_HINT}"
        )
    with open(idx_path, "rb") as stream:
        magic, version, code, sequences, documents = _IDX_HEADER.unpack(
            stream.read(_IDX_HEADER.size)
        )
    if magic != _IDX_MAGIC:
        raise CorruptDatasetError(
            f"{idx_path} is not a Megatron indexed-dataset index (its first bytes are "
            f"{magic!r}, expected {_IDX_MAGIC!r}). {REBUILD_HINT}"
        )
    if version != 1:
        raise CorruptDatasetError(
            f"{idx_path} has index version {version}, expected 1. {REBUILD_HINT}"
        )
    try:
        dtype = indexed.DType.dtype_from_code(code)
    except ValueError:
        raise CorruptDatasetError(
            f"{idx_path} names an unknown token dtype (code {code}). {REBUILD_HINT}"
        ) from None
    # lengths int32 + pointers int64 per sequence, int64 per document boundary,
    # and an int8 mode per sequence for multimodal data.
    per_sequence = 4 + 8 + (1 if multimodal else 0)
    expected = _IDX_HEADER.size + per_sequence * sequences + 8 * documents
    if size != expected:
        raise CorruptDatasetError(
            f"{idx_path} has {size} bytes, but its header announces {sequences} sequences and "
            f"{documents} document boundaries, which take {expected} bytes: the index is "
            f"{'truncated' if size < expected else 'overwritten or has trailing bytes'}. "
            f"{REBUILD_HINT}"
        )
    if documents < 1:
        raise CorruptDatasetError(f"{idx_path} has no document boundaries at all. {REBUILD_HINT}")
    return _IdxHeader(dtype, np.dtype(dtype).itemsize, sequences, documents)


def _open_with_megatron(prefix: Path, multimodal: bool):
    indexed = _import_indexed_dataset()
    if os.path.getsize(f"{prefix}.bin") == 0:
        # numpy cannot memory-map an empty file; say so plainly instead.
        raise CorruptDatasetError(f"{prefix}.bin is empty (0 bytes). {REBUILD_HINT}")
    try:
        return indexed.IndexedDataset(str(prefix), multimodal=multimodal, mmap=True)
    except (AssertionError, ValueError, OSError, IndexError, struct.error) as exc:
        raise CorruptDatasetError(
            f"Megatron-Core cannot read {prefix}.idx/.bin: {exc or type(exc).__name__}. "
            f"{REBUILD_HINT}"
        ) from exc


def _check_document_indices(idx_path: Path, doc_indices: np.ndarray, sequences: int) -> None:
    # Megatron-Core asserts some of this itself, but asserts vanish under `python -O`.
    if doc_indices[0] != 0:
        raise CorruptDatasetError(
            f"{idx_path}: the first document starts at sequence {doc_indices[0]}, not 0. "
            f"{REBUILD_HINT}"
        )
    steps = np.diff(doc_indices)
    if steps.size and steps.min() < 0:
        where = int(np.argmax(steps < 0)) + 1
        raise CorruptDatasetError(
            f"{idx_path}: document boundary {where} ({doc_indices[where]}) is before the "
            f"previous one ({doc_indices[where - 1]}). {REBUILD_HINT}"
        )
    if doc_indices[-1] != sequences:
        raise CorruptDatasetError(
            f"{idx_path}: the last document ends at sequence {doc_indices[-1]}, but there are "
            f"{sequences} sequences. {REBUILD_HINT}"
        )


def _check_sequence_pointers(
    idx_path: Path, lengths: np.ndarray, pointers: np.ndarray, itemsize: int
) -> int:
    """Check that sequences are laid out back to back from offset 0; return the token count.

    Megatron writes them that way, and its slice reads rely on it: ``dataset[a:b]`` reads
    ``sum(lengths)`` tokens starting at the pointer of sequence ``a``.
    """
    if lengths.size and lengths.min() < 0:
        where = int(np.argmax(lengths < 0))
        raise CorruptDatasetError(
            f"{idx_path}: sequence {where} has negative length {lengths[where]}. {REBUILD_HINT}"
        )
    ends = np.cumsum(lengths.astype(np.int64)) * itemsize
    expected = np.concatenate(([0], ends[:-1])) if lengths.size else ends
    wrong = np.flatnonzero(pointers != expected)
    if wrong.size:
        where = int(wrong[0])
        raise CorruptDatasetError(
            f"{idx_path}: sequence {where} points to byte {pointers[where]}, but the sequence "
            f"lengths put it at byte {expected[where]}: the index is damaged. {REBUILD_HINT}"
        )
    return int(lengths.astype(np.int64).sum())


def _check_bin_size(bin_path: Path, tokens: int, itemsize: int, sequences: int) -> None:
    size = bin_path.stat().st_size
    expected = tokens * itemsize
    if size < expected:
        raise CorruptDatasetError(
            f"{bin_path} is truncated: {size:,} bytes, but its index describes {sequences:,} "
            f"sequences with {tokens:,} tokens = {expected:,} bytes (an interrupted build or "
            f"copy?). {REBUILD_HINT}"
        )
    if size > expected:
        raise CorruptDatasetError(
            f"{bin_path} has {size - expected:,} bytes more than its index describes "
            f"({expected:,}): the .bin and .idx come from different builds. {REBUILD_HINT}"
        )


def _max_token_id(bin_reader, dtype, tokens: int, chunk: int = 1 << 24) -> int:
    # Chunked so a multi-GB dataset is scanned without loading it into memory at once.
    itemsize = np.dtype(dtype).itemsize
    largest = 0
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        values = bin_reader.read(dtype=dtype, count=count, offset=start * itemsize)
        largest = max(largest, int(values.max()))
    return largest


# --------------------------------------------------------------------------------------
# One-shot preparation
# --------------------------------------------------------------------------------------


def prepare(
    output_dir: PathLike,
    inputs: Optional[Sequence[PathLike]] = None,
    vocab_size: int = 4096,
    *,
    model_type: str = "bpe",
    json_key: str = "text",
    input_format: str = "auto",
    text_split: str = "paragraph",
    max_docs: Optional[int] = None,
    dataset_name: str = DEFAULT_DATASET_NAME,
    progress: bool = True,
) -> PrepareSummary:
    """Corpus -> tokenizer -> indexed dataset -> check, all inside ``output_dir``.

    Without ``inputs`` the corpus is ``pydoc_corpus`` (``output_dir/pydoc_corpus.jsonl``,
    ``max_docs`` topics at most). The tokenizer is trained on the same files it then
    tokenizes, and lands in ``output_dir/tokenizer.model``; the dataset is
    ``output_dir/<dataset_name>.bin/.idx``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = None
    if inputs:
        input_paths = resolve_input_files(inputs)
    else:
        corpus_path = output_dir / "pydoc_corpus.jsonl"
        pydoc_corpus(corpus_path, max_docs=max_docs)
        input_paths = [corpus_path]
    reading = dict(json_key=json_key, input_format=input_format, text_split=text_split)
    tokenizer = train_tokenizer(
        input_paths, output_dir / "tokenizer", vocab_size, model_type=model_type, **reading
    )
    build = build_indexed_dataset(
        input_paths, tokenizer.model_path, output_dir / dataset_name, progress=progress, **reading
    )
    check = validate_indexed_dataset(build.output_prefix, vocab_size=vocab_size)
    return PrepareSummary(output_dir, corpus_path, tokenizer, build, check)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser(prog: str = "polycom-megatron data") -> argparse.ArgumentParser:
    """A stand-alone parser with the data subcommands (used by ``main``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prepare pretraining data: corpus, tokenizer, Megatron indexed dataset.",
    )
    add_subparsers(parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True))
    return parser


def add_subparsers(subparsers: "argparse._SubParsersAction") -> None:
    """Register the subcommands on an existing subparsers action.

    Each subcommand sets ``func``; call ``run_command(args)`` to run it with the clear
    error handling of ``main``. Mount under a parent command like this::

        data = top_level_subparsers.add_parser("data", help="prepare training data")
        add_subparsers(data.add_subparsers(dest="data_command", required=True))
    """
    pydoc = subparsers.add_parser("pydoc", help="write the offline pydoc corpus as JSONL")
    pydoc.add_argument("output", type=Path, help="JSONL file to write")
    pydoc.add_argument("--max-docs", type=int, default=None, help="keep only the first N topics")
    pydoc.set_defaults(func=_cmd_pydoc)

    tokenizer = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    tokenizer.add_argument("inputs", nargs="+", type=Path, help="JSONL or text files")
    tokenizer.add_argument("--output-prefix", type=Path, required=True,
                           help="writes PREFIX.model and PREFIX.vocab")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    _add_reading_arguments(tokenizer)
    tokenizer.set_defaults(func=_cmd_tokenizer)

    build = subparsers.add_parser("build", help="tokenize files into PREFIX.bin/.idx")
    build.add_argument("inputs", nargs="+", type=Path, help="JSONL or text files")
    build.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    build.add_argument("--output-prefix", type=Path, required=True,
                       help="writes PREFIX.bin and PREFIX.idx (Megatron's --data-path)")
    build.add_argument("--no-eod", dest="append_eod", action="store_false",
                       help="do not append the end-of-document token to each document")
    build.add_argument("--quiet", action="store_true", help="no progress line")
    _add_reading_arguments(build)
    build.set_defaults(func=_cmd_build)

    check = subparsers.add_parser("check", help="validate PREFIX.bin/.idx before training")
    check.add_argument("prefix", type=Path, help="dataset prefix (without .bin/.idx)")
    check.add_argument("--tokenizer", type=Path, default=None,
                       help="also check that every token id is in this tokenizer's vocabulary")
    check.set_defaults(func=_cmd_check)

    prep = subparsers.add_parser(
        "prepare", help="corpus -> tokenizer -> dataset -> check, into one directory"
    )
    prep.add_argument("--output-dir", type=Path, required=True)
    prep.add_argument("--inputs", nargs="+", type=Path, default=None,
                      help="JSONL or text files (default: the offline pydoc corpus)")
    prep.add_argument("--vocab-size", type=int, default=4096)
    prep.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    prep.add_argument("--max-docs", type=int, default=None,
                      help="pydoc corpus only: keep the first N topics")
    prep.add_argument("--name", default=DEFAULT_DATASET_NAME, help="dataset file name prefix")
    prep.add_argument("--quiet", action="store_true", help="no progress line")
    _add_reading_arguments(prep)
    prep.set_defaults(func=_cmd_prepare)


def _add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="auto: .jsonl/.ndjson/.json are JSON Lines, anything else text")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph",
                        help="plain text: documents are blank-line separated paragraphs, "
                        "or single lines")


def _reading_kwargs(args: argparse.Namespace) -> dict:
    return dict(json_key=args.json_key, input_format=args.input_format, text_split=args.text_split)


def _cmd_pydoc(args: argparse.Namespace) -> int:
    count = pydoc_corpus(args.output, max_docs=args.max_docs)
    print(f"Wrote {count} pydoc topics to {args.output}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    summary = train_tokenizer(
        args.inputs, args.output_prefix, args.vocab_size, model_type=args.model_type,
        **_reading_kwargs(args),
    )
    print(summary.describe())
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    summary = build_indexed_dataset(
        args.inputs, args.tokenizer, args.output_prefix, append_eod=args.append_eod,
        progress=not args.quiet, **_reading_kwargs(args),
    )
    print(summary.describe())
    # Checking right away costs little and catches a full disk or a flaky filesystem now.
    print(validate_indexed_dataset(summary.output_prefix).describe())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    vocab_size = None
    if args.tokenizer is not None:
        vocab_size = load_tokenizer(args.tokenizer).get_piece_size()
    print(validate_indexed_dataset(args.prefix, vocab_size=vocab_size).describe())
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    summary = prepare(
        args.output_dir, args.inputs, args.vocab_size, model_type=args.model_type,
        max_docs=args.max_docs, dataset_name=args.name, progress=not args.quiet,
        **_reading_kwargs(args),
    )
    print(summary.describe())
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; expected failures become one clear message and exit code 1."""
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # DataError is a ValueError; so are bad arguments
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``python -m polycom_megatron.training.data COMMAND ...``."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
