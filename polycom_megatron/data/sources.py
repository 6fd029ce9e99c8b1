"""Reading inputs into documents, bad records counted.

Files ending in ``.jsonl``, ``.ndjson`` or ``.json`` (also ``.gz``/``.zst`` compressed) are
read as JSON Lines: one JSON object per line, the document text under ``json_key`` (default
``"text"``); blank lines are ignored. ``.parquet`` files and Hugging Face ``datasets``
directories (``save_to_disk``) give one document per row of the ``json_key`` column. Any
other file is plain UTF-8 text where documents are separated by one or more blank lines
(``text_split="paragraph"``), or where every non-blank line is a document
(``text_split="line"``). ``input_format`` overrides the guess from the name; ``readers``
holds the formats.

Bad records never stop a build halfway: each is skipped and counted under one of
``BAD_RECORD_REASONS`` with the first few ``file:line`` locations. Only a file in which no
record at all is usable stops the build (``NoValidRecordsError``), because that almost always
means a wrong ``json_key`` or a wrong file, not a few dirty lines.

``pydoc_corpus`` writes real English text (CPython's bundled help topics) as JSONL, so there
is something to train on without a network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from polycom_megatron.data.errors import DataError
from polycom_megatron.data.readers import read_raw_records

PathLike = Union[str, "os.PathLike[str]"]


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
    # A directory is a Hugging Face datasets directory; readers says so if it is not one.
    not_files = [str(p) for p in paths if not (p.is_file() or p.is_dir())]
    if not_files:
        raise FileNotFoundError(f"input path(s) are not regular files: {', '.join(not_files)}")
    return paths


def iter_records(
    path: PathLike,
    json_key: str = "text",
    input_format: str = "auto",
    text_split: str = "paragraph",
) -> Iterator[Union[Record, BadRecord]]:
    """Yield every record of one input, usable (``Record``) or not (``BadRecord``), in order."""
    for raw in read_raw_records(Path(path), json_key, input_format, text_split):
        text = to_text(raw.payload, json_key)
        if isinstance(text, str):
            yield Record(text, raw.location, raw.offset)
        elif isinstance(text, BadReason):
            yield BadRecord(text.reason, raw.location, raw.offset)
        else:
            yield text


@dataclass
class BadReason:
    """Why a raw record is not a document (one of ``BAD_RECORD_REASONS``)."""

    reason: str


def to_text(payload: object, json_key: str) -> "Union[str, BadReason, Record, BadRecord]":
    """The document text of a raw record (``readers.RawRecord.payload``), or why there is
    none. A JSONL line (bytes) is decoded and parsed here; a column value is checked; a
    plain-text record comes back as it is. Runs in the tokenizing worker processes."""
    if isinstance(payload, (Record, BadRecord)):
        return payload
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError:
            return BadReason("invalid_utf8")
        del payload  # a huge line: keep one copy, not three
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return BadReason("invalid_json")
        del line
        if not isinstance(obj, dict):
            return BadReason("not_object")
        if json_key not in obj:
            return BadReason("missing_field")
        payload = obj.pop(json_key)
        del obj
    return _checked_text(payload)


def _checked_text(value: object) -> "Union[str, BadReason]":
    if not isinstance(value, str):
        return BadReason("non_string_field")
    try:
        # JSON may spell lone surrogates ("\ud800"), which are not encodable text and make
        # SentencePiece fail for the whole batch they are in.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return BadReason("invalid_utf8")
    if not value.strip():
        return BadReason("empty_text")
    return value


def text_record(value: object, location: str, offset: int) -> Union[Record, BadRecord]:
    checked = _checked_text(value)
    if isinstance(checked, BadReason):
        return BadRecord(checked.reason, location, offset)
    return Record(checked, location, offset)


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
