"""Writing output files so that a user's files are never half-replaced.

Every file a data command writes goes first to ``<stem>.partial<suffix>`` in the same
directory (``corpus.partial.bin``: the suffix stays, so readers still know the format)
(so the rename cannot cross filesystems), is flushed to disk (fsync) and its size checked,
and only then renamed over the final name. Files that belong together (a tokenizer, a
dataset's .bin/.idx and its manifest) are renamed in one ``Staging.commit`` with Ctrl-C held
back, and the manifest is renamed last: an interrupted, killed or disk-full run leaves the
old files as they were (or nothing), and the manifest's checksums catch anything else.

While a partial file is being written its writer holds an exclusive ``flock`` on it. A
partial file nobody holds a lock on was left by a run that was killed (kill -9, power loss):
the next run writing the same file removes it and says so; a locked one means another run is
writing the same output right now, which is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from polycom_megatron.data.errors import DataError, OutputExistsError

PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    final = Path(final)
    return final.with_name(final.stem + PARTIAL_SUFFIX + final.suffix)


def final_path(path: Path) -> Path:
    """The final name of a partial file (prepare hands the build its partial corpus and
    tokenizer); any other path as it is."""
    path = Path(path)
    if path.stem.endswith(PARTIAL_SUFFIX):
        return path.with_name(path.stem[: -len(PARTIAL_SUFFIX)] + path.suffix)
    return path


def note(message: str) -> None:
    """A remark on stderr that is not an error (stale files removed, ...)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def check_writable_dir(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and prove it writable by creating a file in it, so a
    read-only or missing output location fails now rather than after an hour of work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".polycom-write-test-"):
            pass
    except OSError as exc:
        raise DataError(
            f"{what} {directory} is not writable ({exc.strerror or exc}); choose another location"
        ) from None


def refuse_existing(paths: Iterable[Path], flag: str, what: str = "") -> None:
    """Raise ``OutputExistsError`` if any of ``paths`` exists (the caller was not told to
    overwrite); ``what`` describes what is there."""
    present = [str(p) for p in paths if Path(p).exists()]
    if present:
        raise OutputExistsError(
            f"{', '.join(present)} already exist{'s' if len(present) == 1 else ''}"
            f"{f' ({what})' if what else ''}; nothing was changed. Pass --overwrite to "
            f"replace {'it' if len(present) == 1 else 'them'}, or choose another {flag}"
        )


class Staging:
    """A set of output files written under partial names and renamed into place together.

    Use as a context manager: leaving it with an exception (Ctrl-C included) removes every
    partial file; ``commit()`` renames them all in the order they were added."""

    def __init__(self) -> None:
        self._files: Dict[Path, int] = {}  # final path -> fd holding the lock on its partial
        self._order: List[Path] = []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        finals = [str(p) for p in self._order]
        self.discard()
        if isinstance(exc, OSError) and finals:
            # A full disk (ENOSPC), a quota or file-size limit (EDQUOT, EFBIG), an I/O error.
            raise DataError(
                f"writing {', '.join(finals)} failed: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''} (a full disk, a quota or a "
                "file-size limit?); no existing file was replaced and no partial file is left"
            ) from None

    def add(self, final: Path) -> Path:
        """Claim ``final``'s partial file (removing a stale one); return its path."""
        final = Path(final)
        if final in self._files:
            return partial_path(final)
        partial = partial_path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        existed = partial.exists()
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise DataError(
                    f"another run is writing {final} right now (it holds {partial}); wait for "
                    "it to finish, or choose another output"
                ) from None
            raise
        if existed:
            note(f"removed {partial}, left by an interrupted run")
        os.ftruncate(fd, 0)
        self._files[final] = fd
        self._order.append(final)
        return partial

    def write_bytes(self, final: Path, data: bytes) -> Path:
        partial = self.add(final)
        with open(partial, "wb") as stream:
            stream.write(data)
        self.finish(final, expected_bytes=len(data))
        return partial

    def finish(self, final: Path, expected_bytes: Optional[int] = None) -> None:
        """The partial file of ``final`` is complete: flush it to disk and check its size."""
        partial = partial_path(final)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if expected_bytes is not None and size != expected_bytes:
            raise DataError(
                f"writing {final} went wrong: {size:,} bytes are on disk, {expected_bytes:,} "
                "were written (a full disk or a flaky filesystem?); nothing was replaced"
            )

    def commit(self, last: Sequence[Path] = ()) -> None:
        """Rename every partial file over its final name (``last`` ones at the end), with
        Ctrl-C held back so the renames are not split; then make the renames durable."""
        order = [p for p in self._order if p not in last] + [Path(p) for p in last]
        blocked = _block_interrupts()
        try:
            for final in order:
                os.replace(partial_path(final), final)
            for directory in {final.parent for final in order}:
                _fsync_dir(directory)
        finally:
            self._release()
            _unblock_interrupts(blocked)

    def discard(self) -> None:
        for final in self._order:
            partial = partial_path(final)
            if partial.exists():
                partial.unlink()
        self._release()

    def _release(self) -> None:
        for fd in self._files.values():
            os.close(fd)  # closing drops the lock
        self._files.clear()
        self._order.clear()


def write_file_atomically(final: Path, data: bytes) -> None:
    with Staging() as staging:
        staging.write_bytes(final, data)
        staging.commit()


def stale_partials(finals: Iterable[Path]) -> List[Path]:
    """Partial files next to ``finals`` that no running writer holds."""
    stale = []
    for final in finals:
        partial = partial_path(Path(final))
        if partial.exists() and not _is_locked(partial):
            stale.append(partial)
    return stale


def _is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _block_interrupts():
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return None


def _unblock_interrupts(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
