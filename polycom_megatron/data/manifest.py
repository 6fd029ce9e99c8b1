"""What a built dataset is: ``<prefix>.manifest.json`` beside ``<prefix>.bin``/``.idx``.

The manifest says what made the dataset (inputs and their sha256, reading options, the
tokenizer's sha256 and vocabulary size, the ``data prepare`` settings when it made it), what
it holds (documents, sequences, tokens, dtype) and a checksum of every file it covers: the
.bin and .idx, and for a prepared directory also the tokenizer and the corpus. Checksums
are sha256 per chunk (and of the whole file), so a damaged file is named with the byte
range that changed. A manifest is written last, after the files it describes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from polycom_megatron.data.errors import CorruptDatasetError

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "polycom-megatron dataset manifest"
VERSION = 1

# Chunks of at least 64 KiB and at most this many per file: fine enough to say where a file
# is damaged, small enough that a terabyte dataset's manifest stays a few hundred KB.
MIN_CHUNK_BYTES = 1 << 16
MAX_CHUNKS = 4096
_READ_BYTES = 1 << 22


def manifest_path(prefix: Path) -> Path:
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


def chunk_bytes_for(size: int) -> int:
    chunk = MIN_CHUNK_BYTES
    while size > chunk * MAX_CHUNKS:
        chunk *= 2
    return chunk


@dataclass
class FileDigest:
    """A file's size, sha256, and sha256 of each ``chunk_bytes`` chunk."""

    bytes: int
    sha256: str
    chunk_bytes: int
    chunks: List[str]

    def first_difference(self, other: "FileDigest") -> Optional[str]:
        """Where ``other`` (what is on disk now) differs from this (what was recorded)."""
        if other.bytes != self.bytes:
            cut = "truncated" if other.bytes < self.bytes else "longer"
            return f"{other.bytes:,} bytes instead of {self.bytes:,} ({cut})"
        if other.sha256 == self.sha256:
            return None
        bad = [i for i, (a, b) in enumerate(zip(self.chunks, other.chunks)) if a != b]
        if not bad:
            return "its sha256 differs"
        first = bad[0]
        start, end = first * self.chunk_bytes, min((first + 1) * self.chunk_bytes, self.bytes)
        more = f" and {len(bad) - 1} more chunk(s)" if len(bad) > 1 else ""
        return f"bytes {start:,}-{end - 1:,} changed{more}"


class Hasher:
    """Feeds bytes to a whole-file sha256 and to per-chunk sha256s."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.whole = hashlib.sha256()
        self.chunks: List[str] = []
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self.size = 0

    def update(self, data: memoryview) -> None:
        self.whole.update(data)
        self.size += len(data)
        while len(data):
            take = min(len(data), self.chunk_bytes - self._in_chunk)
            self._chunk.update(data[:take])
            self._in_chunk += take
            data = data[take:]
            if self._in_chunk == self.chunk_bytes:
                self._end_chunk()

    def digest(self) -> FileDigest:
        if self._in_chunk or not self.chunks:
            self._end_chunk()
        return FileDigest(self.size, self.whole.hexdigest(), self.chunk_bytes, self.chunks)

    def _end_chunk(self) -> None:
        self.chunks.append(self._chunk.hexdigest())
        self._chunk = hashlib.sha256()
        self._in_chunk = 0


def read_blocks(path: Path, block_bytes: int = _READ_BYTES):
    """The file's bytes in blocks (memoryviews), without holding the file in memory."""
    buffer = bytearray(block_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while True:
            count = stream.readinto(buffer)
            if not count:
                return
            yield view[:count]


def digest_file(path: Path, chunk_bytes: Optional[int] = None) -> FileDigest:
    path = Path(path)
    hasher = Hasher(chunk_bytes or chunk_bytes_for(path.stat().st_size))
    for block in read_blocks(path):
        hasher.update(block)
    return hasher.digest()


def sha256_file(path: Path) -> str:
    return digest_file(path, chunk_bytes=1 << 30).sha256


@dataclass
class Manifest:
    """The parsed ``<prefix>.manifest.json``. File names in ``files`` are relative to the
    manifest's directory; ``tokenizer["file"]`` is too when the tokenizer lives there."""

    dataset: Dict[str, Any]  # name, dtype, documents, sequences, tokens, eod_id
    tokenizer: Dict[str, Any]  # file, sha256, vocab_size, model_type
    inputs: List[Dict[str, Any]]  # path, bytes, sha256 (None for a pipe)
    reading: Dict[str, Any]  # json_key, input_format, text_split, append_eod
    files: Dict[str, FileDigest]
    prepare: Optional[Dict[str, Any]] = None  # the `data prepare` settings, if it made this
    created_by: str = ""
    created: str = ""
    format: str = FORMAT
    version: int = VERSION
    path: Optional[Path] = field(default=None, compare=False)

    def to_json(self) -> bytes:
        body = asdict(self)
        body.pop("path")
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            body = json.loads(Path(path).read_text(encoding="utf-8"))
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, not {FORMAT!r}")
            if body.get("version") != VERSION:
                raise ValueError(f"version {body.get('version')}; this build reads {VERSION}")
            body["files"] = {name: FileDigest(**d) for name, d in body["files"].items()}
            return cls(**body, path=Path(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptDatasetError(
                f"{path} is not a readable dataset manifest ({exc}); restore it, or rebuild "
                "the dataset with --overwrite"
            ) from None

    def file_path(self, name: str) -> Path:
        assert self.path is not None
        return self.path.parent / name

    def tokenizer_path(self) -> Optional[Path]:
        """The tokenizer file when it lives beside the manifest (a prepared directory)."""
        name = self.tokenizer.get("file")
        return self.file_path(name) if name and name in self.files else None


def new_manifest(**fields) -> Manifest:
    from polycom_megatron import __version__

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return Manifest(created_by=f"polycom-megatron {__version__}", created=now.isoformat(), **fields)


def input_sha256(path: Path) -> Optional[str]:
    """SHA-256 of an input file; of a directory (a datasets ``save_to_disk`` folder), one
    over every file's relative name and SHA-256, so a change to any file shows; None for a
    pipe or a device."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    listing = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        listing.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return listing.hexdigest()


def describe_input(path: Path, name: Optional[str] = None) -> Dict[str, Any]:
    """An input as the manifest records it: ``name`` (default: its absolute path), size
    (all files, for a directory) and sha256 (``input_sha256``)."""
    path = Path(path)
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        size = path.stat().st_size if path.is_file() else None
    return dict(path=name or os.path.abspath(path), bytes=size, sha256=input_sha256(path))
