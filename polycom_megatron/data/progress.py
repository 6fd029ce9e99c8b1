"""A one-line progress report for long data jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, TextIO


class Progress:
    """A one-line progress report on stderr: percent of input bytes, documents, tokens/s.

    Redraws in place a few times a second on a terminal; in a log file it writes a new line
    every 30 s instead, so logs stay short.
    """

    def __init__(self, paths: List[Path], enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self.total_bytes = sum(p.stat().st_size for p in paths) or 1
        self.done_bytes = 0  # bytes of files already finished
        self.documents = self.tokens = 0  # of files already finished
        self.started = time.perf_counter()
        self.is_tty = hasattr(stream, "isatty") and stream.isatty()
        self.interval = 0.25 if self.is_tty else 30.0
        self.last_draw = 0.0
        self.drawn = False

    def update(self, path: Path, offset: int, documents: int, tokens: int, force=False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last_draw < self.interval):
            return
        self.last_draw = now
        self.drawn = True
        fraction = min(1.0, (self.done_bytes + offset) / self.total_bytes)
        docs, toks = self.documents + documents, self.tokens + tokens
        rate = toks / max(now - self.started, 1e-9)
        line = (
            f"[data build] {fraction:6.1%} {path.name}: {docs:,} docs, {toks:,} tokens, "
            f"{rate:,.0f} tokens/s"
        )
        self.stream.write(("\r" + line) if self.is_tty else (line + "\n"))
        self.stream.flush()

    def file_done(self, path: Path, documents: int, tokens: int) -> None:
        size = path.stat().st_size
        self.update(path, size, documents, tokens, force=True)
        self.done_bytes += size
        self.documents += documents
        self.tokens += tokens

    def finish(self) -> None:
        if self.drawn and self.is_tty:  # end the line that was being redrawn in place
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

