"""Training and loading SentencePiece tokenizers.

A trained model comes back from SentencePiece as bytes (``model_writer``), not as a file it
writes itself, so the ``.model`` and ``.vocab`` files are written the way every output here
is (``files.Staging``): a full disk or Ctrl-C leaves the old tokenizer or none, never a
0-byte or half-written one.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Union

from polycom_megatron.data.errors import NoValidRecordsError, TokenizerError
from polycom_megatron.data.files import Staging, check_writable_dir, refuse_existing
from polycom_megatron.data.sources import (
    BadRecord,
    BadRecordLog,
    BadRecordStats,
    PathLike,
    check_choice,
    describe_bad_records,
    iter_records,
    resolve_input_files,
    text_record,
)

MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB_SIZE = 16
DEFAULT_VOCAB_SIZE = 4096

# Special pieces get fixed ids so every model trained here agrees with Megatron's
# SentencePiece wrappers, which use eos as the end-of-document (EOD) token.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

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
        lines += describe_bad_records(self.bad_records)
        return "\n".join(lines)


def tokenizer_files(output_prefix: PathLike) -> "tuple[Path, Path]":
    """``(<prefix>.model, <prefix>.vocab)``."""
    output_prefix = Path(output_prefix)
    return (
        output_prefix.with_name(output_prefix.name + ".model"),
        output_prefix.with_name(output_prefix.name + ".vocab"),
    )


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
    overwrite: bool = False,
    staging: Optional[Staging] = None,
) -> TokenizerSummary:
    """Train a SentencePiece tokenizer and write ``<output_prefix>.model`` and ``.vocab``.

    ``text_files_or_iterable`` is either a path, a list/tuple of paths (read as described in
    ``sources``; bad records are skipped and counted), or any other iterable of document
    strings (e.g. a generator). A list of strings is taken as paths, never as texts: pass
    ``iter(texts)`` for in-memory documents.

    The settings aim at a pretraining tokenizer that loses nothing: no Unicode normalization
    and no whitespace collapsing (so code indentation survives and ``decode(encode(t)) == t``),
    byte fallback (so no text ever becomes ``<unk>``), and digits split one per piece.
    Special ids are fixed: unk=0, bos=1, eos=2 (the EOD token), pad=3.

    Documents are fed line by line, and lines longer than ``max_sentence_bytes`` are cut,
    because SentencePiece silently drops over-long "sentences". At most ``max_sentences``
    lines, sampled at random, are used, which bounds memory on large corpora.

    Refuses to replace an existing ``.model``/``.vocab`` unless ``overwrite``. With
    ``staging`` the files are only staged there (the caller commits them with the rest of
    its outputs); without, they are renamed into place at the end.
    """
    check_choice("model_type", model_type, MODEL_TYPES)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, not {vocab_size}")
    model_path, vocab_path = tokenizer_files(output_prefix)
    if not overwrite:
        refuse_existing([model_path, vocab_path], "--output-prefix")
    check_writable_dir(model_path.parent, "the tokenizer's directory")
    documents, bad = _document_source(text_files_or_iterable, json_key, input_format, text_split)
    counter = _DocumentCounter(documents)
    started = time.perf_counter()
    proto = _train(counter, bad, vocab_size, model_type, byte_fallback, max_sentences,
                   max_sentence_bytes, num_threads)
    if staging is None:
        with Staging() as own:
            write_tokenizer(own, model_path, vocab_path, proto)
            own.commit(last=[model_path])
    else:
        write_tokenizer(staging, model_path, vocab_path, proto)
    return TokenizerSummary(
        model_path=model_path,
        vocab_path=vocab_path,
        vocab_size=vocab_size,
        model_type=model_type,
        documents=counter.documents,
        sentences=counter.lines,
        bad_records=bad.by_reason,
        elapsed_s=time.perf_counter() - started,
    )


def _train(counter, bad, vocab_size, model_type, byte_fallback, max_sentences,
           max_sentence_bytes, num_threads) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(counter, max_sentence_bytes),
            model_writer=model,
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
        if "required_chars" in str(exc):  # fewer pieces than the text has characters
            advice = "the text has more distinct characters: use a larger --vocab-size"
        else:
            advice = "needs enough distinct text; use a smaller --vocab-size or give more text"
        raise TokenizerError(
            f"SentencePiece training failed: {str(exc).strip()} (vocab_size={vocab_size} "
            f"{advice})"
        ) from exc
    if counter.error is not None:  # SentencePiece trained on what came before the failure
        raise counter.error
    return model.getvalue()


def write_tokenizer(staging: Staging, model_path: Path, vocab_path: Path, proto: bytes) -> None:
    """Stage ``.model`` (the serialized model) and ``.vocab`` (one ``piece<TAB>score`` line
    per id, SentencePiece's own format), after checking that the bytes load as a model."""
    processor = load_tokenizer_bytes(proto, str(model_path))
    lines = [
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    ]
    staging.write_bytes(vocab_path, "".join(lines).encode("utf-8"))
    staging.write_bytes(model_path, proto)


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
            record = text_record(text, f"<text #{number}>", 0)
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
        except BaseException as exc:  # Ctrl-C too: raised in SentencePiece it becomes a RuntimeError
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
    return f"; all {bad.total} records were bad: " + "; ".join(bad.describe_lines())


def load_tokenizer(model_path: PathLike):
    """Load a SentencePiece model, with a clear error for a missing or invalid file."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    return load_tokenizer_bytes(model_path.read_bytes(), str(model_path))


def load_tokenizer_bytes(proto: bytes, name: str):
    import sentencepiece as spm

    if not proto:
        raise TokenizerError(f"{name} is empty (0 bytes): not a SentencePiece model")
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (OSError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerError(f"{name} is not a SentencePiece model ({reason})") from None
