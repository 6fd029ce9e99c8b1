"""Is a ``<prefix>.bin``/``.idx`` dataset intact, and was it made by this tokenizer?

Two levels, both run by ``verify_dataset`` (``data check``, ``pretrain --data-path``):

* structure, for any Megatron indexed dataset: the ``.idx`` header and size, document
  boundaries and sequence pointers in range and back to back, the ``.bin`` size exactly
  what the index describes, and no token id outside the vocabulary;
* contents, where a manifest is there (``manifest.py``): the sha256 of every chunk of the
  ``.bin`` and ``.idx`` (so damage anywhere is found and its byte range named), of the
  tokenizer and the other files of a prepared directory, and the tokenizer a check is given
  must be the one the dataset was made with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from polycom_megatron.data.errors import REBUILD_HINT, CorruptDatasetError, TokenizerError
from polycom_megatron.data.files import stale_partials
from polycom_megatron.data.manifest import (
    FileDigest,
    Hasher,
    Manifest,
    chunk_bytes_for,
    digest_file,
    manifest_path,
    read_blocks,
)
from polycom_megatron.data.sources import PathLike

# Byte layout of the .idx header written by megatron.core.datasets.indexed_dataset:
# 9-byte magic, uint64 version (1), uint8 dtype code, uint64 sequence count,
# uint64 document count. The three arrays follow: int32 lengths, int64 pointers,
# int64 document indices (then int8 modes for multimodal datasets).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
# The header's dtype codes (megatron.core.datasets.indexed_dataset.DType; a test keeps the
# two equal). Written out so that checking a dataset needs neither torch nor megatron-core.
IDX_DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}


@dataclass
class DatasetInfo:
    """What a check found in a healthy dataset."""

    prefix: Path
    dtype: str
    sequences: int
    documents: int
    tokens: int
    max_token_id: Optional[int]
    vocab_size: Optional[int] = None
    manifest: Optional[Path] = None  # the manifest whose checksums matched, if any
    files_checked: int = 0  # files whose checksums matched
    tokenizer: Optional[Path] = None  # the tokenizer that was matched against the manifest

    def describe(self) -> str:
        largest = "" if self.max_token_id is None else f", largest token id {self.max_token_id}"
        vocab = "" if self.vocab_size is None else f" < vocab {self.vocab_size}"
        text = (
            f"OK {self.prefix}.bin/.idx: {self.documents:,} documents, {self.sequences:,} "
            f"sequences, {self.tokens:,} tokens ({self.dtype}{largest}{vocab})"
        )
        if self.manifest is not None:
            text += f"; checksums of {self.files_checked} file(s) match {self.manifest.name}"
            if self.tokenizer is not None:
                text += f"; made with tokenizer {self.tokenizer}"
        else:
            text += "; no manifest, so the structure was checked but not the contents"
        return text


def dataset_prefix(path: PathLike) -> Path:
    """The dataset prefix for a path, forgiving a ``.bin``/``.idx`` typed out of habit."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def verify_dataset(
    prefix: PathLike,
    vocab_size: Optional[int] = None,
    tokenizer: Optional[PathLike] = None,
    multimodal: bool = False,
) -> DatasetInfo:
    """Check ``<prefix>.bin``/``.idx`` (and its manifest's files, if it has one); raise
    ``CorruptDatasetError`` or ``TokenizerError`` naming what is wrong.

    ``tokenizer`` (a SentencePiece ``.model``) must be the one the manifest records, and
    gives the vocabulary every token id must be below; ``vocab_size`` gives it directly
    (for a tokenizer that is not a SentencePiece file). Without either, the manifest's
    vocabulary size is used where there is one.
    """
    from polycom_megatron.data.tokenizer import load_tokenizer

    prefix = dataset_prefix(prefix)
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise CorruptDatasetError(f"{path} does not exist. {REBUILD_HINT}")
    manifest = Manifest.load(manifest_path(prefix)) if manifest_path(prefix).is_file() else None
    checked = 0
    if manifest is not None:
        checked = _check_manifest_files(manifest, skip=(bin_path.name,))
    if tokenizer is not None:
        if manifest is not None:
            _check_tokenizer_pairing(manifest, Path(tokenizer), prefix)
        vocab_size = vocab_size or load_tokenizer(tokenizer).get_piece_size()
    elif manifest is not None and vocab_size is None:
        vocab_size = manifest.tokenizer.get("vocab_size")
    recorded = manifest.files.get(bin_path.name) if manifest is not None else None
    info, digest = check_structure(
        idx_path, bin_path, prefix, multimodal,
        chunk_bytes=recorded.chunk_bytes if recorded else None,
    )
    if recorded is not None:
        _compare(bin_path, recorded, digest, manifest)
        checked += 1
    if vocab_size is not None:
        check_vocabulary(bin_path, info.max_token_id, vocab_size)
    info.vocab_size = vocab_size
    if manifest is not None:
        info.manifest, info.files_checked = manifest.path, checked
        info.tokenizer = Path(tokenizer) if tokenizer is not None else manifest.tokenizer_path()
    return info


def validate_indexed_dataset(
    prefix: PathLike, vocab_size: Optional[int] = None, multimodal: bool = False
) -> DatasetInfo:
    """The structural check alone (no manifest), for any Megatron indexed dataset."""
    prefix = dataset_prefix(prefix)
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise CorruptDatasetError(f"{path} does not exist. {REBUILD_HINT}")
    info, _ = check_structure(idx_path, bin_path, prefix, multimodal)
    if vocab_size is not None:
        check_vocabulary(bin_path, info.max_token_id, vocab_size)
        info.vocab_size = vocab_size
    return info


def check_vocabulary(bin_path: Path, max_token_id: Optional[int], vocab_size: int) -> None:
    if max_token_id is not None and max_token_id >= vocab_size:
        raise CorruptDatasetError(
            f"{bin_path} contains token id {max_token_id}, but the tokenizer has only "
            f"{vocab_size} pieces: the dataset was built with a different tokenizer (or is "
            f"damaged). {REBUILD_HINT}"
        )


def stale_partial_note(prefix: Path) -> Optional[str]:
    stale = stale_partials([Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), manifest_path(prefix)])
    if not stale:
        return None
    them = "it" if len(stale) == 1 else "them"
    return (
        f"{', '.join(map(str, stale))}: left by an interrupted build, not part of the "
        f"dataset; the next build of this prefix removes {them} (or delete {them})"
    )


# --------------------------------------------------------------------------------------
# Contents (manifest)
# --------------------------------------------------------------------------------------


def _check_manifest_files(manifest: Manifest, skip: Tuple[str, ...]) -> int:
    """Compare every file the manifest lists (but ``skip``) with its checksums."""
    checked = 0
    for name, recorded in manifest.files.items():
        if name in skip:
            continue
        path = manifest.file_path(name)
        if not path.is_file():
            raise CorruptDatasetError(
                f"{path} is missing, but {manifest.path.name} lists it. {_restore_hint(manifest)}"
            )
        _compare(path, recorded, digest_file(path, recorded.chunk_bytes), manifest)
        checked += 1
    return checked


def _compare(path: Path, recorded: FileDigest, found: FileDigest, manifest: Manifest) -> None:
    difference = recorded.first_difference(found)
    if difference is not None:
        raise CorruptDatasetError(
            f"{path} is damaged or was replaced: {difference} since {manifest.path.name} "
            f"recorded it. {_restore_hint(manifest)}"
        )


def _restore_hint(manifest: Manifest) -> str:
    if manifest.prepare is not None:
        return (
            f"Restore it from a copy, or prepare the directory again: `polycom-megatron data "
            f"prepare --output-dir {manifest.path.parent} --overwrite ...`."
        )
    return f"Restore it from a copy, or rebuild: {REBUILD_HINT[len('Rebuild it with '):]}"


def _check_tokenizer_pairing(manifest: Manifest, tokenizer: Path, prefix: Path) -> None:
    from polycom_megatron.data.manifest import sha256_file

    if not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer}")
    recorded = manifest.tokenizer.get("sha256")
    found = sha256_file(tokenizer)
    if recorded and found != recorded:
        raise TokenizerError(
            f"{tokenizer} is not the tokenizer {prefix} was made with (sha256 {found[:12]}..., "
            f"its manifest records {recorded[:12]}... for {manifest.tokenizer.get('file')}); "
            "use that tokenizer, or rebuild the dataset with this one (data build --overwrite)"
        )


# --------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------


@dataclass
class _IdxHeader:
    dtype: "type[np.number]"
    itemsize: int
    sequences: int
    documents: int  # number of document boundaries, i.e. documents + 1


def check_structure(
    idx_path: Path, bin_path: Path, prefix: Path, multimodal: bool = False,
    chunk_bytes: Optional[int] = None,
) -> Tuple[DatasetInfo, FileDigest]:
    """Check a .bin/.idx pair (any names: the partial files of a build too); return what it
    holds and the .bin's digest, computed in the same pass that finds the largest token id."""
    header = _read_idx_header(idx_path, multimodal)
    lengths, pointers, doc_indices = _read_idx_arrays(idx_path, header)
    _check_document_indices(idx_path, doc_indices, header.sequences)
    tokens = _check_sequence_pointers(idx_path, lengths, pointers, header.itemsize)
    _check_bin_size(bin_path, tokens, header.itemsize, header.sequences)
    max_token, digest = _scan_bin(bin_path, header.dtype, chunk_bytes)
    info = DatasetInfo(
        prefix=prefix,
        dtype=np.dtype(header.dtype).name,
        sequences=header.sequences,
        documents=header.documents - 1,  # the index stores a leading 0 boundary
        tokens=tokens,
        max_token_id=max_token,
    )
    return info, digest


def _read_idx_header(idx_path: Path, multimodal: bool) -> _IdxHeader:
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
    dtype = IDX_DTYPE_CODES.get(code)
    if dtype is None:
        raise CorruptDatasetError(
            f"{idx_path} names an unknown token dtype (code {code}). {REBUILD_HINT}"
        )
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


def _read_idx_arrays(idx_path: Path, header: _IdxHeader):
    # The same three arrays Megatron-Core's IndexedDataset maps, read into memory (the
    # index is small: 20 bytes per document).
    with open(idx_path, "rb") as stream:
        stream.seek(_IDX_HEADER.size)
        lengths = np.fromfile(stream, dtype=np.int32, count=header.sequences)
        pointers = np.fromfile(stream, dtype=np.int64, count=header.sequences)
        doc_indices = np.fromfile(stream, dtype=np.int64, count=header.documents)
    return lengths, pointers, doc_indices


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
    if size == 0 and expected:
        raise CorruptDatasetError(f"{bin_path} is empty (0 bytes). {REBUILD_HINT}")
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


def _scan_bin(bin_path: Path, dtype, chunk_bytes: Optional[int]) -> Tuple[Optional[int], FileDigest]:
    """One read of the .bin: its digest and its largest token id (None when empty)."""
    hasher = Hasher(chunk_bytes or chunk_bytes_for(bin_path.stat().st_size))
    itemsize = np.dtype(dtype).itemsize
    largest: Optional[int] = None
    carry = b""  # a token split across two reads
    for block in read_blocks(bin_path):
        hasher.update(block)
        data = carry + bytes(block) if carry else block
        usable = len(data) - len(data) % itemsize
        if usable:
            value = int(np.frombuffer(data[:usable], dtype=dtype).max())
            largest = value if largest is None else max(largest, value)
        carry = bytes(data[usable:])
    return largest, hasher.digest()
