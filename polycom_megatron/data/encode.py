"""Raw records -> token ids, in this process or in a pool of worker processes.

``Encoder`` turns a batch of raw records (``readers.RawRecord.payload``) into token-id
arrays or bad-record reasons; ``encode_batches`` runs it over a stream of batches, either
here (``workers=1``) or in ``workers`` spawned processes, each loading the SentencePiece
model once. Batches come back in input order and at most ``2 * workers`` are in flight, so
memory stays bounded however large the input.

Long documents are encoded in slices of about ``SLICE_CHARS`` characters: SentencePiece
keeps some 30 bytes per character of its input while encoding (a 50 MB document took
2.7 GB) and Python's list of ids another 36 bytes per token. A slice boundary is put only
where no piece of the vocabulary can cross it, right before a space that follows a
non-space, so the ids are the ones encoding the whole text gives, as Megatron-LM's tools/preprocess_data.py does. That holds when the
model normalizes character by character (checked on every slice with SentencePiece's own
normalizer) and no piece has the space symbol after another character (checked once per
model); otherwise the document is encoded whole.
"""

from __future__ import annotations

import collections
import multiprocessing
from dataclasses import dataclass, field
from typing import Deque, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from polycom_megatron.data.sources import BadReason, BadRecord, Record, to_text

SPACE = "\u2581"  # SentencePiece's whitespace symbol
SLICE_CHARS = 1 << 16  # documents longer than this are encoded in slices of about this size

Encoded = Union[np.ndarray, BadReason, BadRecord]


class Encoder:
    """Token ids for documents, with one SentencePiece model (see the module docstring)."""

    def __init__(self, model_proto: bytes, json_key: str, eod_id: Optional[int], dtype,
                 slice_chars: int = SLICE_CHARS) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.json_key = json_key
        self.eod_id = eod_id
        self.dtype = np.dtype(dtype)
        self.slice_chars = max(1, slice_chars)
        size = self.sp.get_piece_size()
        # A piece like "a▁b" could straddle a cut before a space; then never cut.
        self.sliceable = hasattr(self.sp, "normalize") and not any(
            SPACE in self.sp.id_to_piece(i).lstrip(SPACE) for i in range(size)
        )
        self.dummy_prefix = self.sliceable and self.sp.normalize("a") == SPACE + "a"

    def encode_batch(self, payloads: Sequence[object]) -> List[Encoded]:
        """One result per payload: the document's ids (EOD appended) or why it is skipped."""
        results: List[Encoded] = [None] * len(payloads)  # type: ignore[list-item]
        short, short_at = [], []
        for i, payload in enumerate(payloads):
            text = to_text(payload, self.json_key)
            if isinstance(text, Record):
                text = text.text
            if not isinstance(text, str):
                results[i] = text  # a BadReason or a plain-text BadRecord
            elif len(text) > self.slice_chars:
                results[i] = self._finish(self._encode_long(text))
            else:
                short.append(text)
                short_at.append(i)
        # One call for the short ones: less per-call overhead in SentencePiece. One thread:
        # the parallelism is the worker processes (SentencePiece's own default is all cores).
        for i, ids in zip(short_at, self.sp.encode(short, num_threads=1)):
            results[i] = self._finish(np.array(ids, dtype=self.dtype))
        return results

    def _finish(self, ids: np.ndarray) -> Encoded:
        if ids.size == 0:
            return BadReason("no_tokens")
        if self.eod_id is not None:
            ids = np.append(ids, np.array([self.eod_id], dtype=self.dtype))
        return ids

    def _encode_long(self, text: str) -> np.ndarray:
        parts = []
        for start, stop in self._slices(text) if self.sliceable else [(0, len(text))]:
            piece = text[start:stop]
            if start > 0 and self.dummy_prefix:
                piece = piece[1:]  # the dummy prefix SentencePiece adds is this space
            if start > 0 or stop < len(text):
                if not self._normalizes_locally(piece):
                    return np.array(self.sp.encode(text), dtype=self.dtype)
            parts.append(np.array(self.sp.encode(piece), dtype=self.dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def _slices(self, text: str) -> Iterator["tuple[int, int]"]:
        start = 0
        while len(text) - start > self.slice_chars:
            cut = text.find(" ", start + self.slice_chars)
            while cut > 0 and text[cut - 1] == " ":
                cut = text.find(" ", cut + 1)
            if cut <= 0:
                break
            yield start, cut
            start = cut
        yield start, len(text)

    def _normalizes_locally(self, piece: str) -> bool:
        # What SentencePiece sees must be exactly this slice's share of the whole text.
        expected = piece.replace(" ", SPACE)
        if self.dummy_prefix:
            expected = SPACE + expected
        return self.sp.normalize(piece) == expected


# --------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------

_worker_encoder: Optional[Encoder] = None


def _init_worker(model_proto: bytes, json_key: str, eod_id: Optional[int], dtype: str,
                 slice_chars: int) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(model_proto, json_key, eod_id, dtype, slice_chars)


def _encode_in_worker(payloads: Sequence[object]) -> List[Encoded]:
    assert _worker_encoder is not None, "worker started without _init_worker"
    return _worker_encoder.encode_batch(payloads)


@dataclass
class Batch:
    """Raw records of one input file, split into what workers need and what stays here."""

    file_index: int
    locations: List[str] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)
    payloads: List[object] = field(default_factory=list)
    nbytes: int = 0


def batched(records: Iterable["tuple[int, object]"], max_records: int,
            max_bytes: int) -> Iterator[Batch]:
    """Group ``(file_index, RawRecord)`` pairs into batches of one file each, at most
    ``max_records`` records or about ``max_bytes`` of payload."""
    batch: Optional[Batch] = None
    for file_index, raw in records:
        if batch is not None and batch.file_index != file_index:
            yield batch
            batch = None
        if batch is None:
            batch = Batch(file_index)
        batch.locations.append(raw.location)
        batch.offsets.append(raw.offset)
        batch.payloads.append(raw.payload)
        batch.nbytes += len(raw.payload) if isinstance(raw.payload, (bytes, str)) else 64
        if len(batch.payloads) >= max_records or batch.nbytes >= max_bytes:
            yield batch
            batch = None
    if batch is not None:
        yield batch


def encode_batches(
    batches: Iterable[Batch],
    workers: int,
    model_proto: bytes,
    json_key: str,
    eod_id: Optional[int],
    dtype,
    slice_chars: int = SLICE_CHARS,
) -> Iterator["tuple[Batch, List[Encoded]]"]:
    """Each batch (its payloads dropped) with ``Encoder.encode_batch`` of its payloads, in
    order; in ``workers`` processes if more than one."""
    settings = (model_proto, json_key, eod_id, np.dtype(dtype).name, slice_chars)
    if workers <= 1:
        encoder = Encoder(*settings)
        for batch in batches:
            payloads, batch.payloads = batch.payloads, []
            yield batch, encoder.encode_batch(payloads)
        return
    # spawn: the parent has megatron.core (and torch's threads) loaded; forking that is unsafe.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=settings)
    try:
        pending: Deque = collections.deque()
        # Pool.imap would read the whole input ahead; this keeps 2 batches per worker.
        for batch in batches:
            payloads, batch.payloads = batch.payloads, []
            pending.append((batch, pool.apply_async(_encode_in_worker, (payloads,))))
            del payloads
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
