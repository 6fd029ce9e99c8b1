"""``polycom-megatron export-hf`` / ``import-hf``: the way out of Megatron and back."""

from __future__ import annotations

import argparse

from polycom_megatron.cli_types import OneLineErrorParser
import sys
from pathlib import Path
from typing import Optional, Sequence


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineErrorParser(
        prog="polycom-megatron export-hf",
        description="Megatron distributed checkpoint (train-cpu or Megatron-LM pretrain, any "
        "TP/PP/EP layout) -> transformers model directory (safetensors, tokenizer, "
        "self-contained modeling code for trust_remote_code).",
        allow_abbrev=False,
    )
    p.add_argument("checkpoint_dir", type=Path,
                   help="a checkpoint root (latest_checkpointed_iteration.txt), an iter_* "
                   "directory, or a train-cpu --output-dir")
    p.add_argument("output_dir", type=Path, help="where the transformers model is written")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece tokenizer.model (default: the one the run trained with)")
    p.add_argument("--no-tokenizer", action="store_true", help="export the model without a tokenizer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT_DIR if it already holds an exported model")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default: %(default)s)")
    p.add_argument("--sample", default=None, metavar="PROMPT",
                   help="after exporting, print a short greedy continuation of PROMPT")
    args = p.parse_args(argv)
    from polycom_megatron.hf import export

    try:
        result = export.export(
            args.checkpoint_dir, args.output_dir, tokenizer=args.tokenizer,
            with_tokenizer=not args.no_tokenizer, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {result.checkpoint} -> {result.output_dir}\n  {result.description}, "
          f"{result.num_parameters:,} parameters"
          + ("" if result.tokenizer else " (no tokenizer)"), flush=True)
    if args.sample is not None:
        from polycom_megatron.hf.sample import greedy_text

        print(f"sample: {greedy_text(result.output_dir, args.sample)!r}", flush=True)
    return 0


def import_main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineErrorParser(
        prog="polycom-megatron import-hf",
        description="transformers directory written by export-hf -> Megatron distributed "
        "checkpoint at a TP/PP/EP layout (fresh optimizer, iteration 0) that train-cpu "
        "--resume continues from.",
        allow_abbrev=False,
    )
    p.add_argument("hf_dir", type=Path)
    p.add_argument("checkpoint_dir", type=Path,
                   help="checkpoint root to create (train-cpu reads OUTPUT_DIR/checkpoints)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--overwrite", action="store_true",
                   help="write even if CHECKPOINT_DIR already holds a checkpoint")
    args = p.parse_args(argv)
    from polycom_megatron.hf import export

    try:
        result = export.import_hf(args.hf_dir, args.checkpoint_dir, args.tp, args.pp, args.ep,
                                  overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_dir} -> {result.checkpoint}\n  {result.description}\n  "
          f"layout {result.layout}", flush=True)
    if result.train_cpu_flags:
        root = Path(args.checkpoint_dir)
        hint = (f"--output-dir {root.parent}" if root.name == "checkpoints"
                else f"(move it to OUTPUT_DIR/checkpoints) --output-dir OUTPUT_DIR")
        print("  continue with: polycom-megatron train-cpu --resume "
              f"{hint} {' '.join(result.train_cpu_flags)} --steps N", flush=True)
    return 0
