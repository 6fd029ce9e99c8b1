"""Input formats -> raw records, streamed: JSON Lines (plain, .gz, .zst), plain text,
Parquet and a Hugging Face ``datasets`` directory (``save_to_disk``).

A reader yields ``RawRecord``s: a JSONL line still as bytes (parsing it is the expensive
part, so it happens where the tokenizing does: in the worker processes), or a value already
taken out of a column (Parquet, datasets), or a finished ``Record``/``BadRecord`` (plain
text, whose paragraphs cost nothing to split). ``sources.to_text`` turns any of them into a
document text or a bad-record reason. Everything streams: one line, one paragraph or one
batch of rows is in memory at a time.

zstandard, pyarrow and datasets are optional extras; a missing one is named in a one-line
error with the ``pip install`` that brings it.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional

from polycom_megatron.data.errors import DataError

INPUT_FORMATS = ("auto", "jsonl", "text", "parquet", "hf")
TEXT_SPLITS = ("paragraph", "line")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
PARQUET_SUFFIXES = (".parquet", ".pq")
ROW_BATCH = 1024  # rows per Parquet / datasets batch: small, whatever the row size


@dataclass
class RawRecord:
    """One record as read: ``payload`` is JSONL bytes, a column value, or already a
    ``Record``/``BadRecord``; ``offset`` is how far into the input reading has got (bytes)."""

    payload: object
    location: str
    offset: int


def input_format_of(path: Path, input_format: str = "auto") -> str:
    """The format ``path`` is read as: ``input_format``, or guessed from its name."""
    if input_format != "auto":
        return input_format
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def input_size(path: Path) -> int:
    """Bytes of ``path``, or of all files under it (a datasets directory)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def missing_extra(module: str, extra: str, what: str) -> DataError:
    return DataError(
        f"reading {what} needs the Python package {module!r}, which is not installed: "
        f"pip install 'polycom-megatron[{extra}]'"
    )


# --------------------------------------------------------------------------------------
# Byte streams: plain, gzip, zstd
# --------------------------------------------------------------------------------------


class _Counted(io.RawIOBase):
    """A file whose ``consumed`` says how many (compressed) bytes were read from it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        self.consumed += count or 0
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_lines(path: Path) -> "tuple[Iterator[bytes], _Counted]":
    """The lines of ``path`` as bytes, decompressed by its suffix, and the counter of input
    bytes read so far (for progress). Corrupt compressed data raises a one-line DataError."""
    counted = _Counted(open(path, "rb"))
    name = path.name.lower()
    if name.endswith(".gz"):
        stream: BinaryIO = gzip.GzipFile(fileobj=io.BufferedReader(counted), mode="rb")
        kind = "gzip"
    elif name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            counted.close()
            raise missing_extra("zstandard", "zstd", f"{path} (zstd-compressed)") from None
        reader = zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True)
        stream = io.BufferedReader(reader)
        kind = "zstd"
    else:
        stream = io.BufferedReader(counted, buffer_size=1 << 20)
        kind = None
    return _lines_checked(path, stream, kind), counted


def _lines_checked(path: Path, stream: BinaryIO, kind: Optional[str]) -> Iterator[bytes]:
    errors: tuple = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    with stream:
        try:
            yield from stream
        except errors as exc:
            if kind is None:
                raise
            raise DataError(
                f"{path}: the {kind} data is corrupt or cut short ({exc}); "
                f"check the file (e.g. `{'gzip -t' if kind == 'gzip' else 'zstd -t'} {path}`) "
                "or fetch it again"
            ) from None


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    # Bytes, not text: a single undecodable line must cost one record, whereas a text-mode
    # file object would raise and end the whole file.
    lines, counted = open_lines(path)
    for line_no, raw in enumerate(lines, start=1):
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]  # editors on Windows like to add one
        if not raw.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        yield RawRecord(raw, f"{path}:{line_no}", counted.consumed)


def read_text(path: Path, text_split: str) -> Iterator[RawRecord]:
    from polycom_megatron.data.sources import BadRecord, Record

    lines, counted = open_lines(path)
    block: List[str] = []  # lines of the paragraph being collected
    block_start = 0
    bad_line = 0  # first undecodable line of the current paragraph, 0 if none

    def paragraph() -> RawRecord:
        # One bad line spoils its paragraph: keeping the rest would silently glue together
        # text that was never adjacent.
        if bad_line:
            item: object = BadRecord("invalid_utf8", f"{path}:{bad_line}", counted.consumed)
        else:
            item = Record("\n".join(block), f"{path}:{block_start}", counted.consumed)
        return RawRecord(item, item.location, counted.consumed)  # type: ignore[attr-defined]

    for line_no, raw in enumerate(lines, start=1):
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            line: Optional[str] = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            line = None
        location = f"{path}:{line_no}"
        if text_split == "line":
            if line is None:
                yield RawRecord(BadRecord("invalid_utf8", location, counted.consumed),
                                location, counted.consumed)
            elif line.strip():
                yield RawRecord(Record(line, location, counted.consumed), location,
                                counted.consumed)
            continue
        if line is not None and not line.strip():  # a blank line ends a paragraph
            if block or bad_line:
                yield paragraph()
            block, bad_line = [], 0
            continue
        if not block and not bad_line:
            block_start = line_no
        if line is None:
            bad_line = bad_line or line_no
        else:
            block.append(line)
    if block or bad_line:
        yield paragraph()


def read_parquet(path: Path, json_key: str) -> Iterator[RawRecord]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", "parquet", f"{path} (Parquet)") from None
    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({_first_line(exc)})") from None
    _check_column(path, json_key, columns)
    size, rows = path.stat().st_size, max(1, table.metadata.num_rows)
    row = 0
    try:
        for batch in table.iter_batches(batch_size=ROW_BATCH, columns=[json_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield RawRecord(value, f"{path}:{row}", size * row // rows)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: Parquet data is corrupt at row {row + 1} "
                        f"({_first_line(exc)})") from None


def read_hf_dataset(path: Path, json_key: str) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets", "hf-datasets", f"{path} (a datasets directory)") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{path} is not a Hugging Face datasets directory written by save_to_disk "
            f"({_first_line(exc)}); pass JSONL, text or Parquet files, or such a directory"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"{path} holds several splits ({splits}): pass one split's directory, "
                        f"e.g. {path / next(iter(dataset))}")
    _check_column(path, json_key, dataset.column_names)
    size, rows = input_size(path), max(1, len(dataset))
    row = 0
    for batch in dataset.select_columns([json_key]).iter(batch_size=ROW_BATCH):
        for value in batch[json_key]:
            row += 1
            yield RawRecord(value, f"{path}:{row}", size * row // rows)


def _check_column(path: Path, json_key: str, columns: List[str]) -> None:
    if json_key not in columns:
        raise DataError(
            f"{path} has no column {json_key!r} (its columns: {', '.join(columns) or 'none'}); "
            "pass the text column with --json-key"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_readable(path: Path, json_key: str, input_format: str, text_split: str) -> None:
    """Read the first record of ``path``: a missing column or extra, a file that is not the
    format it claims, fails here, before hours of work on the inputs before it."""
    records = read_raw_records(path, json_key, input_format, text_split)
    try:
        next(records, None)
    finally:
        records.close()


def read_raw_records(
    path: Path, json_key: str, input_format: str, text_split: str
) -> Iterator[RawRecord]:
    """Every raw record of one input, in order."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, "
                         f"not {input_format!r}")
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {', '.join(TEXT_SPLITS)}, "
                         f"not {text_split!r}")
    yield from _read(path, json_key, input_format, text_split)


def _read(path: Path, json_key: str, input_format: str, text_split: str) -> Iterator[RawRecord]:
    fmt = input_format_of(path, input_format)
    if fmt == "hf":
        return read_hf_dataset(path, json_key)
    if path.is_dir():
        raise DataError(f"{path} is a directory: only --input-format hf (a datasets directory "
                        "written by save_to_disk) reads directories")
    if fmt == "parquet":
        return read_parquet(path, json_key)
    if fmt == "jsonl":
        return read_jsonl(path)
    return read_text(path, text_split)
