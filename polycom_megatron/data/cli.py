"""``polycom-megatron data``: pydoc, tokenizer, build, check, prepare.

Every subcommand exits 0 on success and otherwise prints one line, ``error: ...``, that
says what is wrong and what to do (no traceback): 1 for bad data or files, 2 for bad flags
(refused while parsing, before any work), 130 for Ctrl-C. Nothing existing is replaced
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from polycom_megatron.cli import DEBUG_VARIABLE
from polycom_megatron.cli_types import OneLineErrorParser, integer, positive_int
from polycom_megatron.data.build import DEFAULT_DATASET_NAME, build_indexed_dataset
from polycom_megatron.data.check import stale_partial_note, verify_dataset
from polycom_megatron.data.errors import DataError
from polycom_megatron.data.files import check_writable_dir, note
from polycom_megatron.data.prepare import prepare
from polycom_megatron.data.readers import INPUT_FORMATS, TEXT_SPLITS
from polycom_megatron.data.sources import pydoc_corpus
from polycom_megatron.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    MODEL_TYPES,
    train_tokenizer,
)

EXIT_DATA, EXIT_INTERRUPTED = 1, 130


# A vocabulary SentencePiece can train and Megatron can index (int32 token ids).
vocab_size_arg = integer(MIN_VOCAB_SIZE, 2**31 - 1)


def build_parser(prog: str = "polycom-megatron data") -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=prog,
        description="Prepare pretraining data: corpus, tokenizer, Megatron indexed dataset. "
        "Existing files are never replaced without --overwrite.",
        allow_abbrev=False,
    )
    add_subparsers(parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True))
    return parser


def add_subparsers(subparsers: "argparse._SubParsersAction") -> None:
    """Register the subcommands; each sets ``func`` (run it with ``run_command``)."""
    pydoc = subparsers.add_parser("pydoc", help="write the offline pydoc corpus as JSONL",
                                  allow_abbrev=False)
    pydoc.add_argument("output", type=Path, help="JSONL file to write")
    pydoc.add_argument("--max-docs", type=positive_int, default=None,
                       help="keep only the first N topics")
    _add_overwrite(pydoc, "the output file")
    pydoc.set_defaults(func=_cmd_pydoc)

    tokenizer = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer",
                                      allow_abbrev=False)
    tokenizer.add_argument("inputs", nargs="+", type=Path, help="JSONL or text files")
    tokenizer.add_argument("--output-prefix", type=Path, required=True,
                           help="writes PREFIX.model and PREFIX.vocab")
    tokenizer.add_argument("--vocab-size", type=vocab_size_arg, required=True)
    tokenizer.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    _add_reading_arguments(tokenizer)
    _add_overwrite(tokenizer, "PREFIX.model/.vocab")
    tokenizer.set_defaults(func=_cmd_tokenizer)

    build = subparsers.add_parser("build", help="tokenize files into PREFIX.bin/.idx",
                                  allow_abbrev=False)
    build.add_argument("inputs", nargs="+", type=Path,
                       help="JSONL (.gz, .zst), text or Parquet files, or datasets directories")
    build.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    build.add_argument("--output-prefix", type=Path, required=True,
                       help="writes PREFIX.bin, PREFIX.idx (Megatron's --data-path) and "
                       "PREFIX.manifest.json")
    build.add_argument("--no-eod", dest="append_eod", action="store_false",
                       help="do not append the end-of-document token to each document")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_workers(build)
    _add_reading_arguments(build)
    _add_overwrite(build, "an existing dataset at PREFIX")
    build.set_defaults(func=_cmd_build)

    check = subparsers.add_parser(
        "check", allow_abbrev=False,
        help="verify PREFIX.bin/.idx before training: structure, and the manifest's checksums",
    )
    check.add_argument("prefix", type=Path, help="dataset prefix (without .bin/.idx)")
    check.add_argument("--tokenizer", type=Path, default=None,
                       help="also check that this is the tokenizer the dataset was made with "
                       "and that every token id is in its vocabulary")
    check.set_defaults(func=_cmd_check)

    prep = subparsers.add_parser(
        "prepare", help="corpus -> tokenizer -> dataset -> check, into one directory",
        allow_abbrev=False,
    )
    prep.add_argument("--output-dir", type=Path, required=True)
    prep.add_argument("--inputs", nargs="+", type=Path, default=None,
                      help="JSONL or text files (default: the offline pydoc corpus)")
    prep.add_argument("--vocab-size", type=vocab_size_arg, default=DEFAULT_VOCAB_SIZE)
    prep.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    prep.add_argument("--max-docs", type=positive_int, default=None,
                      help="pydoc corpus only: keep the first N topics")
    prep.add_argument("--name", default=DEFAULT_DATASET_NAME, help="dataset file name prefix")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_workers(prep)
    _add_reading_arguments(prep)
    _add_overwrite(prep, "a directory prepared with other settings (or without a manifest)")
    prep.set_defaults(func=_cmd_prepare)


def _add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="auto: .jsonl/.ndjson/.json (also .gz, .zst) are JSON Lines, "
                        ".parquet Parquet, a directory a datasets save_to_disk, anything "
                        "else text")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph",
                        help="plain text: documents are blank-line separated paragraphs, "
                        "or single lines")


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="tokenizing processes (default: one per core, or 1 for inputs under 16 MiB, "
                        "where starting a pool costs more than it saves; 1: no pool); "
                        "the dataset is the same whatever the number")


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (atomically: an interrupted run keeps the old)")


def _reading_kwargs(args: argparse.Namespace) -> dict:
    return dict(json_key=args.json_key, input_format=args.input_format, text_split=args.text_split)


def _cmd_pydoc(args: argparse.Namespace) -> int:
    check_writable_dir(args.output.parent, "the output directory")
    count = pydoc_corpus(args.output, max_docs=args.max_docs, overwrite=args.overwrite)
    print(f"Wrote {count} pydoc topics to {args.output}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    summary = train_tokenizer(
        args.inputs, args.output_prefix, args.vocab_size, model_type=args.model_type,
        overwrite=args.overwrite, **_reading_kwargs(args),
    )
    print(summary.describe())
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    summary = build_indexed_dataset(
        args.inputs, args.tokenizer, args.output_prefix, append_eod=args.append_eod,
        progress=not args.quiet, overwrite=args.overwrite, workers=args.workers,
        **_reading_kwargs(args),
    )
    print(summary.describe())
    # Checking what landed on disk costs one read and catches a flaky filesystem now.
    print(verify_dataset(summary.output_prefix, tokenizer=args.tokenizer).describe())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    info = verify_dataset(args.prefix, tokenizer=args.tokenizer)
    stale = stale_partial_note(info.prefix)
    if stale:
        note(stale)
    print(info.describe())
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    summary = prepare(
        args.output_dir, args.inputs, args.vocab_size, model_type=args.model_type,
        max_docs=args.max_docs, dataset_name=args.name, progress=not args.quiet,
        overwrite=args.overwrite, workers=args.workers, **_reading_kwargs(args),
    )
    print(summary.describe())
    return 0


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; every failure becomes one ``error:`` line and an exit code."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); files that were being replaced are as they were "
              "before this run", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, ValueError, OSError) as exc:  # DataError is a ValueError
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_DATA
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)} (a bug: please "
              f"report it; {DEBUG_VARIABLE}=1 shows the traceback)", file=sys.stderr)
        return EXIT_DATA


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``polycom-megatron data COMMAND ...`` (or ``python -m polycom_megatron.data``)."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
