"""``polycom-megatron perplexity``: held-out perplexity of an exported transformers model.

The token stream (a text file through the model's tokenizer, or a Megatron indexed
dataset as ``data build`` writes it, documents joined in order as GPTDataset joins them)
is cut into non-overlapping windows of ``--seq-len`` tokens; every token after the first
of a window is predicted from the ones before it. Perplexity = exp(mean negative
log-likelihood over all predicted tokens).
"""

from __future__ import annotations

import argparse

from polycom_megatron.cli_types import OneLineErrorParser
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch


@dataclass
class Perplexity:
    tokens: int
    windows: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def describe(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (loss {self.loss:.4f} nats/token) over "
                f"{self.tokens:,} predicted tokens in {self.windows} windows")


def text_tokens(tokenizer, path: Path) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def dataset_tokens(prefix: str, limit: int) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise FileNotFoundError(f"{prefix}{suffix} is missing; pass the dataset prefix "
                                    "(the path without .bin/.idx)")
    dataset = IndexedDataset(prefix)
    parts, total = [], 0
    for i in range(len(dataset)):
        doc = torch.from_numpy(dataset[i].astype("int64"))
        parts.append(doc)
        total += doc.numel()
        if total >= limit:
            break
    return torch.cat(parts)[:limit]


def evaluate(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 8) -> Perplexity:
    windows = tokens.numel() // seq_len
    if windows < 1:
        raise ValueError(f"only {tokens.numel()} tokens: fewer than one window of --seq-len "
                         f"{seq_len}; lower --seq-len or give more text")
    data = tokens[: windows * seq_len].view(windows, seq_len)
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows, batch_size):
            batch = data[start:start + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            count += batch[:, 1:].numel()
    return Perplexity(tokens=count, windows=windows, loss=total_nll / count)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineErrorParser(prog="polycom-megatron perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a directory written by export-hf")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, help="a UTF-8 text file")
    src.add_argument("--data-prefix", help="a Megatron indexed dataset (PREFIX.bin/.idx)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the model's max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="evaluate at most this many")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    from polycom_megatron.hf.sample import load

    try:
        if not (args.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{args.model_dir} has no config.json: not an exported model")
        model, tokenizer = load(args.model_dir)
        seq_len = args.seq_len or model.config.max_position_embeddings
        if seq_len < 2 or args.max_tokens < seq_len:
            raise ValueError("--seq-len must be at least 2 and --max-tokens at least --seq-len")
        if args.text is not None:
            if tokenizer is None:
                raise ValueError(f"{args.model_dir} has no tokenizer; use --data-prefix")
            if not args.text.is_file():
                raise FileNotFoundError(f"--text {args.text} does not exist")
            tokens = text_tokens(tokenizer, args.text)[: args.max_tokens]
        else:
            tokens = dataset_tokens(args.data_prefix, args.max_tokens)
        if int(tokens.max()) >= model.config.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary "
                             f"({model.config.vocab_size}): the data was tokenized differently")
        result = evaluate(model, tokens, seq_len, args.batch_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
