"""Tokenizing documents into a Megatron indexed dataset: ``<prefix>.bin``/``.idx`` and its
manifest (``manifest.py``).

The .bin/.idx are written by Megatron-Core's own ``IndexedDatasetBuilder``, under partial
names (``files.Staging``); once complete they are flushed, checked (structure, sizes) and
checksummed, and the manifest is written from those checksums. Then all are renamed into
place, the manifest last. Nothing existing is replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from polycom_megatron.data.check import check_structure, dataset_prefix
from polycom_megatron.data.errors import NoValidRecordsError, TokenizerError
from polycom_megatron.data.files import (
    Staging,
    check_writable_dir,
    final_path,
    refuse_existing,
)
from polycom_megatron.data.manifest import (
    Manifest,
    describe_input,
    digest_file,
    manifest_path,
    new_manifest,
    sha256_file,
)
from polycom_megatron.data.encode import Batch, Encoded, batched, encode_batches
from polycom_megatron.data.progress import Progress
from polycom_megatron.data.readers import RawRecord, check_readable, read_raw_records
from polycom_megatron.data.sources import (
    BadRecordLog,
    BadRecordStats,
    PathLike,
    describe_bad_records,
    resolve_input_files,
)
from polycom_megatron.data.tokenizer import load_tokenizer

# Megatron's own prefix convention for tokenized text (tools/preprocess_data.py).
DEFAULT_DATASET_NAME = "corpus_text_document"
# Payload bytes per batch sent to a worker: big enough to amortise the pickling, small
# enough that 2 batches per worker in flight cost little memory.
BATCH_BYTES = 1 << 20



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
        lines += describe_bad_records(self.bad_records)
        return "\n".join(lines)

    manifest: Optional[Manifest] = None


def dataset_files(prefix: Path) -> List[Path]:
    """Everything a build writes for ``prefix``: .bin, .idx and the manifest."""
    return [Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), manifest_path(prefix)]


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
    workers: Optional[int] = None,
    progress: bool = True,
    progress_stream: Optional[TextIO] = None,
    overwrite: bool = False,
    staging: Optional[Staging] = None,
) -> BuildSummary:
    """Tokenize text files into a Megatron indexed dataset ``<output_prefix>.bin``/``.idx``
    with its manifest ``<output_prefix>.manifest.json``.

    Each document becomes one sequence (plus the tokenizer's eos id when ``append_eod``),
    which is what Megatron's GPT dataset expects. Files are read as described in
    ``sources``; bad records are skipped and counted, and a file with no usable record raises
    ``NoValidRecordsError``. Existing output is refused unless ``overwrite``; it is replaced
    only once the new dataset is complete and checked, so an interrupted, killed or failed
    build leaves it as it was. Tokenizing runs in ``workers`` processes (default: one per
    core, or 1 for inputs under 16 MiB; 1: in this process), and the output is the same whatever their number. With
    ``staging`` the .bin/.idx are only staged there and the
    manifest is returned in the summary, for the caller to add to and commit (``prepare``).
    """
    paths = resolve_input_files(inputs)
    output_prefix = dataset_prefix(output_prefix)
    outputs = dataset_files(output_prefix)
    if not overwrite:
        refuse_existing(outputs, "--output-prefix", _describe_existing(output_prefix))
    check_writable_dir(output_prefix.parent, "the output directory")
    reading = dict(json_key=json_key, input_format=input_format, text_split=text_split)
    for path in paths:  # a wrong column, a corrupt file, a missing extra: before any work
        check_readable(path, **reading)
    indexed = _import_indexed_dataset()  # seconds: after the checks that fail fast
    tokenizer_model = Path(tokenizer_model)
    tokenizer = load_tokenizer(tokenizer_model)
    eod_id = _eod_id(tokenizer, tokenizer_model) if append_eod else None
    dtype = token_dtype_for_vocab(tokenizer.get_piece_size())
    bin_path, idx_path, manifest_file = outputs

    own = staging is None
    staging = Staging() if own else staging
    with staging if own else contextlib.nullcontext():
        partial_bin, partial_idx = staging.add(bin_path), staging.add(idx_path)
        started = time.perf_counter()
        progress_bar = Progress(paths, enabled=progress, stream=progress_stream or sys.stderr)
        builder = indexed.IndexedDatasetBuilder(str(partial_bin), dtype=dtype)
        try:
            writer = _Writer(paths, builder, json_key, progress_bar)
            batches = batched(_raw_records(paths, reading), batch_size, BATCH_BYTES)
            for batch, results in encode_batches(
                batches, resolve_workers(workers, _input_bytes(paths)),
                tokenizer.serialized_model_proto(),
                json_key, eod_id, dtype,
            ):
                writer.add(batch, results)
            writer.close()
            builder.finalize(str(partial_idx))
        finally:
            progress_bar.finish()  # so what follows starts on a line of its own
            _close(builder)
        documents, tokens, bad = writer.documents, writer.tokens, writer.bad
        itemsize = np.dtype(dtype).itemsize
        staging.finish(bin_path, expected_bytes=tokens * itemsize)
        staging.finish(idx_path)
        info, bin_digest = check_structure(partial_idx, partial_bin, output_prefix)
        manifest = new_manifest(
            dataset=dict(
                name=output_prefix.name, dtype=info.dtype, documents=info.documents,
                sequences=info.sequences, tokens=info.tokens, eod_id=eod_id,
            ),
            tokenizer=_tokenizer_record(tokenizer_model, tokenizer, output_prefix.parent),
            inputs=[describe_input(p, os.path.abspath(final_path(p))) for p in paths],
            reading=dict(reading, append_eod=append_eod),
            files={bin_path.name: bin_digest, idx_path.name: digest_file(partial_idx)},
        )
        tokenizer_name = manifest.tokenizer["file"]
        if tokenizer_model.parent.resolve() == output_prefix.parent.resolve() and own:
            manifest.files[tokenizer_name] = digest_file(tokenizer_model)
        if own:
            staging.write_bytes(manifest_file, manifest.to_json())
            staging.commit(last=[manifest_file])
    return BuildSummary(
        output_prefix=output_prefix,
        input_files=paths,
        documents=documents,
        tokens=tokens,
        dtype=np.dtype(dtype).name,
        eod_id=eod_id,
        bad_records=bad.by_reason,
        elapsed_s=time.perf_counter() - started,
        manifest=manifest,
    )


def _tokenizer_record(model_path: Path, tokenizer, directory: Path) -> Dict[str, Any]:
    final = final_path(model_path)
    beside = final.parent.resolve() == directory.resolve()
    return dict(
        file=final.name if beside else os.path.abspath(final),
        sha256=sha256_file(model_path),
        vocab_size=tokenizer.get_piece_size(),
    )


def _describe_existing(prefix: Path) -> str:
    path = manifest_path(prefix)
    if not path.is_file():
        return "a dataset without a manifest"
    try:
        manifest = Manifest.load(path)
    except ValueError:
        return "a dataset with an unreadable manifest"
    ds = manifest.dataset
    return f"a dataset of {ds.get('documents', 0):,} documents, {ds.get('tokens', 0):,} tokens"


def _import_indexed_dataset():
    """Import megatron.core's indexed_dataset module, quietly.

    Importing it imports all of megatron.core, which warns about optional CUDA packages
    (Transformer Engine, Apex) that data preparation never uses.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# Below this much input the default is one worker: spawning interpreters that each load
# megatron's imports and the SentencePiece model costs a second or two, more than a pool
# saves on a few MB (measured on 2 cores: 29 MB took 13.6 s with one worker, 11.1 s with two).
SMALL_INPUT_BYTES = 16 << 20


def resolve_workers(workers: Optional[int], input_bytes: Optional[int] = None) -> int:
    """``workers``, or by default one per core this process may run on, or 1 when the
    input is known to be smaller than ``SMALL_INPUT_BYTES``."""
    if workers is None:
        if input_bytes is not None and input_bytes < SMALL_INPUT_BYTES:
            return 1
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    return workers


def _input_bytes(paths: List[Path]) -> Optional[int]:
    """Total size of the inputs, None when one is a pipe or another file of unknown size."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            total += path.stat().st_size
        else:
            return None
    return total


def _raw_records(paths: List[Path], reading: Dict[str, str]) -> Iterator[Tuple[int, RawRecord]]:
    for index, path in enumerate(paths):
        for raw in read_raw_records(path, **reading):
            yield index, raw


class _Writer:
    """Appends encoded documents to the builder in input order, file by file, counting bad
    records and refusing a file that gave no document at all."""

    def __init__(self, paths: List[Path], builder, json_key: str, progress: Progress) -> None:
        self.paths = paths
        self.builder = builder  # megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder
        self.json_key = json_key
        self.progress = progress
        self.bad = BadRecordLog()
        self.documents = self.tokens = 0
        self.file_index = 0
        self.file_bad = BadRecordLog()
        self.file_documents = self.file_tokens = 0

    def add(self, batch: Batch, results: List[Encoded]) -> None:
        while self.file_index < batch.file_index:
            self._file_done()
        for location, result in zip(batch.locations, results):
            if isinstance(result, np.ndarray):
                # Lengths as a list, as Megatron's own tools/preprocess_data.py passes them.
                self.builder.add_document(result, [len(result)])
                self.file_documents += 1
                self.file_tokens += len(result)
            else:
                self.file_bad.add(result.reason, location)
        self.progress.update(batch.offsets[-1], self.file_documents, self.file_tokens)

    def close(self) -> None:
        while self.file_index < len(self.paths):
            self._file_done()

    def _file_done(self) -> None:
        path = self.paths[self.file_index]
        if self.file_documents == 0:
            raise NoValidRecordsError(_no_valid_records_message(path, self.file_bad, self.json_key))
        self.progress.file_done(path, self.file_documents, self.file_tokens)
        self.documents += self.file_documents
        self.tokens += self.file_tokens
        self.bad.merge(self.file_bad)
        self.file_index += 1
        self.file_bad = BadRecordLog()
        self.file_documents = self.file_tokens = 0


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
        message += "; all reasons: " + "; ".join(bad.describe_lines())
    return message


def _close(builder) -> None:
    # IndexedDatasetBuilder opens its .bin at construction and closes it only in finalize().
    data_file = getattr(builder, "data_file", None)
    if data_file is not None and not data_file.closed:
        data_file.close()
