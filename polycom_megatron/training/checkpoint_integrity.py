"""What a checkpoint directory promises about itself, and the check that it still holds.

Each ``iter_NNNNNNN/`` gets ``polycom_manifest.json`` once every rank has finished writing
and before the tracker moves: the model fingerprint (what was trained, on which layout,
by which versions) and the size and SHA-256 of every file in the directory. The manifest
carries a checksum of itself, so a damaged manifest is told apart from a damaged shard.

``problems(path)`` re-reads every file and returns one line per problem (missing,
truncated, altered, unlisted manifest), empty when the checkpoint is intact. Nothing here
knows about torch or megatron-core: the launcher runs it before any rank starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MANIFEST_FILE = "polycom_manifest.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded; the message is one line per problem."""


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def saved_iterations(root) -> List[int]:
    """Iterations with an ``iter_NNNNNNN`` directory under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))]
    return sorted(found, reverse=True)


def read_tracker(root) -> Tuple[Optional[int], Optional[str]]:
    """(iteration, None) from ``root``'s tracker, (None, None) when there is none, or
    (None, problem) when it does not hold an iteration number."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None, None
    raw = tracker.read_bytes()
    text = raw.decode("ascii", errors="replace").strip()
    # Ours end with a newline; Megatron-LM's own (pretrain) do not. One of ours that lost
    # its newline was cut short: "12\n" truncated to "1" would name the wrong checkpoint.
    cut_short = (not raw.endswith(b"\n") and text.isdigit()
                 and (Path(root) / f"iter_{int(text):07d}" / MANIFEST_FILE).exists())
    if not text.isdigit() or cut_short:
        shown = repr(raw[:20]) + ("..." if len(raw) > 20 else "")
        what = "is empty" if not raw else f"holds {shown} instead of an iteration number"
        return None, f"{tracker} is damaged: it {what}"
    return int(text), None


def write_tracker(root, iteration: int) -> None:
    _atomic_write(Path(root) / TRACKER_FILE, f"{iteration}\n".encode())


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(path, iteration: int, fingerprint: dict) -> dict:
    """Record every file now in the checkpoint directory ``path`` (call once all ranks
    have finished writing it)."""
    path = Path(path)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")
    }
    body = {
        "format": FORMAT_VERSION,
        "iteration": iteration,
        "fingerprint": fingerprint,
        "files": files,
    }
    manifest = dict(body, self_sha256=_body_digest(body))
    _atomic_write(path / MANIFEST_FILE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(path) -> Tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, problem) when it is missing or damaged."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return None, (
            f"{file} is missing: the save did not finish, or an older polycom-megatron "
            "wrote this checkpoint without checksums"
        )
    try:
        manifest = json.loads(file.read_bytes())
        body = {k: v for k, v in manifest.items() if k != "self_sha256"}
        intact = manifest.get("self_sha256") == _body_digest(body)
    except (ValueError, AttributeError, TypeError):
        intact = False
    if not intact:
        return None, f"{file} is damaged (it does not match its own checksum)"
    return manifest, None


def problems(path, expected_iteration: Optional[int] = None) -> List[str]:
    """One line per reason not to load the checkpoint directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is missing"]
    manifest, problem = read_manifest(path)
    if problem:
        return [problem]
    found = []
    if expected_iteration is not None and manifest["iteration"] != expected_iteration:
        found.append(
            f"{path / MANIFEST_FILE} records iteration {manifest['iteration']}, not "
            f"{expected_iteration}"
        )
    for name, recorded in sorted(manifest["files"].items()):
        file = path / name
        if not file.is_file():
            found.append(f"{file} is missing")
            continue
        size = file.stat().st_size
        if size != recorded["bytes"]:
            found.append(f"{file} is truncated or extended: {size} bytes, {recorded['bytes']} at save")
        elif file_digest(file) != recorded["sha256"]:
            found.append(f"{file} is damaged: its SHA-256 differs from the one recorded at save")
    return found


def _body_digest(body: Dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _atomic_write(target: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename: readers see the old file or the new one."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
