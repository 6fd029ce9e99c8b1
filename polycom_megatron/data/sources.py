"""Reading input files into documents: JSON Lines and plain text, bad records counted.

Files ending in ``.jsonl``, ``.ndjson`` or ``.json`` are read as JSON Lines: one JSON object
per line, the document text under ``json_key`` (default ``"text"``); blank lines are ignored.
Any other file is plain UTF-8 text where documents are separated by one or more blank lines
(``text_split="paragraph"``), or where every non-blank line is a document
(``text_split="line"``). ``input_format`` overrides the guess from the file name.

Bad records never stop a build halfway: each is skipped and counted under one of
``BAD_RECORD_REASONS`` with the first few ``file:line`` locations. Only a file in which no
record at all is usable stops the build (``NoValidRecordsError``), because that almost always
means a wrong ``json_key`` or a wrong file, not a few dirty lines.

``pydoc_corpus`` writes real English text (CPython's bundled help topics) as JSONL, so there
is something to train on without a network.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from polycom_megatron.data.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
INPUT_FORMATS = ("auto", "jsonl", "text")
TEXT_SPLITS = ("paragraph", "line")

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


def describe_bad_records(bad_records: Dict[str, BadRecordStats]) -> List[str]:
    total = sum(stats.count for stats in bad_records.values())
    if total == 0:
        return ["  bad records skipped: 0"]
    ordered = sorted(bad_records.values(), key=lambda stats: -stats.count)
    return [f"  bad records skipped: {total:,}"] + [f"    {s.describe()}" for s in ordered]



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
    check_choice("input_format", input_format, INPUT_FORMATS)
    check_choice("text_split", text_split, TEXT_SPLITS)
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
                yield text_record(obj[json_key], location, offset)


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


def text_record(value: object, location: str, offset: int) -> Union[Record, BadRecord]:
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


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")



# --------------------------------------------------------------------------------------
# An offline corpus
# --------------------------------------------------------------------------------------


def pydoc_corpus_bytes(max_docs: Optional[int] = None) -> "tuple[bytes, int]":
    """CPython's help topics (``pydoc_data.topics``) as JSONL bytes, and how many topics.

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
    lines = [json.dumps({"id": f"pydoc/{name}", "text": topics[name]}) + "\n" for name in names]
    return "".join(lines).encode("utf-8"), len(names)


def pydoc_corpus(output_path: PathLike, max_docs: Optional[int] = None, overwrite: bool = False) -> int:
    """Write ``pydoc_corpus_bytes`` to ``output_path`` (atomically); return the topic count."""
    from polycom_megatron.data.files import refuse_existing, write_file_atomically

    output_path = Path(output_path)
    if not overwrite:
        refuse_existing([output_path], "output file")
    payload, count = pydoc_corpus_bytes(max_docs)
    write_file_atomically(output_path, payload)
    return count
