"""The datasets a ``polycom-megatron pretrain`` command line names, checked before Megatron
starts: structure, the manifest's checksums where there is one, and every token id against
the vocabulary of the tokenizer the flags select (and, for a SentencePiece model, that it is
the tokenizer the dataset was made with).

Megatron-LM itself reads the .bin through a memory map at the offsets in the .idx: a
truncated file trains on garbage, and an id beyond the vocabulary fails deep in the
embedding as a bare IndexError. Checking costs one read of each dataset, so it runs once per
node (local rank 0); the other ranks wait for it in Megatron's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from polycom_megatron.data.check import DatasetInfo, verify_dataset
from polycom_megatron.data.errors import DataError

# Megatron-LM tokenizer types whose --tokenizer-model is a SentencePiece model file.
SENTENCEPIECE_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


def _parser() -> argparse.ArgumentParser:
    # Megatron-LM's own spellings of the flags that say where data and tokenizer are.
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"):
        p.add_argument(flag, nargs="*", default=None)
    p.add_argument("--data-args-path", default=None)
    p.add_argument("--per-split-data-args-path", default=None)
    p.add_argument("--mock-data", action="store_true")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--vocab-file", default=None)
    return p


def dataset_prefixes(argv: Sequence[str]) -> List[str]:
    """Every dataset prefix the arguments name (blend weights dropped), in order."""
    args, _ = _parser().parse_known_args(list(argv))
    if args.mock_data:
        return []
    blends: List[List[str]] = []
    if args.data_args_path:
        blends.append(shlex.split(Path(args.data_args_path).read_text()))
    if args.per_split_data_args_path:
        per_split = json.loads(Path(args.per_split_data_args_path).read_text())
        blends += [list(per_split.get(split) or []) for split in ("train", "valid", "test")]
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        if getattr(args, name):
            blends.append(getattr(args, name))
    prefixes: List[str] = []
    for blend in blends:
        for prefix in _blend_prefixes(blend):
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def _blend_prefixes(blend: List[str]) -> List[str]:
    # As Megatron reads a blend: "P1 P2 ..." or "W1 P1 W2 P2 ..." (every other one a number).
    if len(blend) % 2 == 0 and blend and all(_is_number(w) for w in blend[::2]):
        return blend[1::2]
    return list(blend)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def tokenizer_for_check(argv: Sequence[str]) -> Tuple[Optional[Path], Optional[int], str]:
    """(SentencePiece model to pair with, vocabulary size, what was used) from the flags."""
    args, _ = _parser().parse_known_args(list(argv))
    kind = args.tokenizer_type or "GPT2BPETokenizer"  # pretrain's default, as pretrain_gpt.py
    if kind in SENTENCEPIECE_TOKENIZERS and args.tokenizer_model:
        return Path(args.tokenizer_model), None, f"{kind} {args.tokenizer_model}"
    if kind == "NullTokenizer" and args.vocab_size is not None:
        # Megatron's NullTokenizer adds its end-of-document id after the given size.
        return None, args.vocab_size + 1, f"NullTokenizer --vocab-size {args.vocab_size}"
    if kind == "GPT2BPETokenizer" and args.vocab_file:
        try:
            size = len(json.loads(Path(args.vocab_file).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataError(f"--vocab-file {args.vocab_file} is not a readable vocab.json ({exc})")
        return None, size, f"GPT2BPETokenizer --vocab-file {args.vocab_file}"
    return None, None, f"{kind} (vocabulary not read here: token ids are not checked)"


def check_pretrain_data(
    argv: Sequence[str], report: Callable[[str], None] = lambda line: print(line, flush=True)
) -> List[DatasetInfo]:
    """Verify every local dataset the arguments name; raise ``DataError`` on the first bad one.

    Runs on local rank 0 only (the datasets are the same files for every rank of a node)."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or "-h" in argv or "--help" in argv:
        return []
    prefixes = dataset_prefixes(argv)
    if not prefixes:
        return []
    tokenizer, vocab_size, used = tokenizer_for_check(argv)
    infos = []
    for prefix in prefixes:
        if "://" in prefix:  # object storage (s3://, msc://): Megatron reads it, we cannot
            report(f"data: {prefix}: not a local path, not checked")
            continue
        try:
            info = verify_dataset(prefix, vocab_size=vocab_size, tokenizer=tokenizer)
        except (DataError, OSError) as exc:
            raise DataError(f"--data-path {prefix}: {exc}") from None
        report(f"data: {info.describe()}")
        infos.append(info)
    report(f"data: token ids checked against {used}")
    return infos
