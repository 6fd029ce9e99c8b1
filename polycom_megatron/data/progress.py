"""The progress bar of long data jobs (tqdm): input bytes read, documents, tokens/s."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, TextIO

from polycom_megatron.data.readers import input_size


class Progress:
    """A tqdm bar over the input bytes, with documents and tokens/s after it.

    Drawn only on a terminal: in a log file the summary printed at the end says it all.
    """

    def __init__(self, paths: List[Path], enabled: bool, stream: TextIO) -> None:
        self.done_bytes = 0  # bytes of files already finished
        self.documents = self.tokens = 0  # of files already finished
        self.started = time.perf_counter()
        self.bar = None
        if enabled and hasattr(stream, "isatty") and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(input_size(p) for p in paths), unit="B", unit_scale=True,
                            unit_divisor=1024, desc="data build", file=stream, leave=True,
                            dynamic_ncols=True, mininterval=0.25)

    def update(self, offset: int, documents: int, tokens: int) -> None:
        """Reading the current file has got to ``offset``; it gave ``documents`` so far."""
        if self.bar is None:
            return
        self.bar.n = self.done_bytes + offset
        docs, toks = self.documents + documents, self.tokens + tokens
        rate = toks / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{docs:,} docs, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(0)  # redraws when mininterval has passed

    def file_done(self, path: Path, documents: int, tokens: int) -> None:
        size = input_size(path)
        self.update(size, documents, tokens)
        self.done_bytes += size
        self.documents += documents
        self.tokens += tokens

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None
