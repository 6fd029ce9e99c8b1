"""Which checkpoint a CPU run starts from, decided in the launcher before any rank starts.

- Without ``--resume``, a checkpoint directory that already holds checkpoints is refused
  (``--resume`` continues it, ``--overwrite`` discards it, a new ``--output-dir`` keeps it).
- With ``--resume``, the tracker's checkpoint is verified file by file against its
  manifest, its model fingerprint is compared with the flags of this run, and the change
  of parallel layout is checked against what resharding supports. Every problem is one
  line of the ``CheckpointError``; nothing is loaded.
- ``--resume-fallback`` resumes from the newest intact checkpoint instead of refusing a
  damaged one; the damaged ones are renamed ``iter_NNNNNNN.damaged`` (kept, out of the way
  of the saves to come).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

from polycom_megatron.training import checkpoint_integrity as integrity
from polycom_megatron.training.checkpoint_integrity import CheckpointError, iteration_dir
from polycom_megatron.training.cpu_job import CpuJob, split_shares
from polycom_megatron.training.cpu_reshard import layout_problems

# Fingerprint entries that must match for a resume, and the flag that sets each.
MODEL_FLAGS = {
    "layers": "--layers",
    "hidden": "--hidden",
    "heads": "--heads",
    "ffn_hidden": "--ffn-hidden",
    "num_experts": "--num-experts",
    "moe_top_k": "--moe-top-k",
    "vocab_size": "--vocab-size",
    "activation": "--polycom-activation",
    "order": "--polycom-order",
    "eps": "--polycom-eps",
    "coeff_mode": "--polycom-coeff-mode",
    "gated": "--polycom-gated",
    "no_bias": "--polycom-no-bias",
    "swiglu": "--swiglu",
}
# What a model entry means when a checkpoint written before it existed lacks it.
_MODEL_ENTRY_BEFORE = {"swiglu": False}
# The data entries (the training documents) and their flags. A checkpoint without a data
# entry (written before it existed, or by import-hf) is not checked against it.
DATA_FLAGS = {"split": "--split"}
LAYOUT_FLAGS = {"world_size": "--world-size", "tp": "--tp", "pp": "--pp", "ep": "--ep"}
_VERSIONED = ("polycom-megatron", "megatron-core", "torch")


def fingerprint(job: CpuJob) -> dict:
    """What a checkpoint of ``job`` records about the model, its layout and the software."""
    polycom = job.polycom
    model = dict(
        architecture="gpt",
        layers=job.layers,
        hidden=job.hidden,
        heads=job.heads,
        ffn_hidden=job.ffn_hidden_size,
        num_experts=job.num_experts,
        moe_top_k=job.moe_top_k if job.is_moe else None,
        vocab_size=job.vocab_size,
        activation=polycom.activation if polycom else "none",
        order=polycom.order if polycom else None,
        eps=polycom.eps if polycom else None,
        coeff_mode=polycom.coeff_mode if polycom and job.is_moe else None,
        gated=polycom.gated if polycom else None,
        no_bias=not polycom.bias if polycom else None,
        swiglu=job.swiglu,
        variant=job.variant,  # polycom_megatron.variants' name, for readers of the manifest
    )
    # The split decides which documents are trained on: another one changes the run.
    data = dict(split=job.split)
    layout = dict(
        world_size=job.world_size, tp=job.tp, pp=job.pp, ep=job.ep, dp=job.dp,
        padded_vocab_size=job.padded_vocab_size,
    )
    return dict(model=model, data=data, layout=layout,
                versions={p: _version(p) for p in _VERSIONED})


@dataclass
class StartPoint:
    """Where the run starts: ``iteration`` None = from scratch."""

    iteration: Optional[int] = None
    path: Optional[Path] = None
    notes: List[str] = field(default_factory=list)  # printed by the launcher, one line each
    damaged: Dict[Optional[int], List[str]] = field(default_factory=dict)  # skipped on the way


def choose_checkpoint(job: CpuJob) -> StartPoint:
    """Decide the starting checkpoint and verify its files; raise ``CheckpointError`` if
    there is none that this run may load. Cheap and before any work: a fresh run over old
    checkpoints is refused (or, with ``job.overwrite``, they are removed). Then
    ``confirm_checkpoint`` compares it with the run's flags."""
    root, overwrite, fallback = job.checkpoint_dir, job.overwrite, job.resume_fallback
    tracked, tracker_problem = integrity.read_tracker(root)
    saved = integrity.saved_iterations(root)
    if not job.resume:
        if tracked is None and tracker_problem is None and not saved:
            return StartPoint()
        if overwrite:
            shutil.rmtree(root)
            return StartPoint(notes=[f"--overwrite: removed the old checkpoints in {root}"])
        newest = f"newest: iteration {tracked}" if tracked is not None else (
            f"{len(saved)} checkpoint director{'y' if len(saved) == 1 else 'ies'}"
        )
        raise CheckpointError(
            f"{root} already holds checkpoints ({newest}); pass --resume to continue from "
            "them, --overwrite to discard them and train from scratch, or choose a new "
            "--output-dir"
        )
    if tracked is None and tracker_problem is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint to resume from in {root} (no {integrity.TRACKER_FILE}); "
            "run without --resume first, or point --output-dir at the run to continue"
        )
    if tracker_problem is None:
        candidates = [tracked] + [i for i in saved if i < tracked]
        damaged = {}
    else:
        candidates = saved
        damaged = {None: [tracker_problem]}
    for iteration in candidates:
        path = iteration_dir(root, iteration)
        found = integrity.problems(path, expected_iteration=iteration)
        if found:
            damaged[iteration] = found
            if not fallback:
                break
            continue
        if damaged and not fallback:
            break
        return StartPoint(iteration, path, damaged=damaged)
    lines = [line for found in damaged.values() for line in found]
    if fallback:
        lines.append(f"--resume-fallback: no intact checkpoint left under {root}")
    else:
        older = [i for i in saved if i not in damaged and (tracked is None or i < tracked)]
        hint = f" ({iteration_dir(root, older[0]).name} is the next older)" if older else ""
        lines.append(
            f"refusing to resume from a damaged checkpoint; pass --resume-fallback to resume "
            f"from the newest intact one{hint}, or --overwrite without --resume to start over"
        )
    raise CheckpointError("\n".join(lines))


def confirm_checkpoint(job: CpuJob, start: StartPoint) -> StartPoint:
    """Refuse a checkpoint whose fingerprint disagrees with the run's flags or whose layout
    does not reshard to this one (one line each); once it is accepted, move the damaged
    checkpoints ``--resume-fallback`` skipped out of the way. Needs the final job (the
    vocabulary size is known once the data is prepared)."""
    if start.iteration is None:
        return start
    manifest, _ = integrity.read_manifest(start.path)
    expected = fingerprint(job)
    mismatch = _mismatches(manifest["fingerprint"], expected, start.path)
    if mismatch:
        raise CheckpointError("\n".join(mismatch))
    notes = _set_aside(job.checkpoint_dir, start.damaged)
    if start.damaged:
        # A crash before the next save must not find the tracker on a damaged one.
        integrity.write_tracker(job.checkpoint_dir, start.iteration)
    notes += _version_notes(manifest["fingerprint"], expected, start.path)
    return StartPoint(start.iteration, start.path, start.notes + notes)


def _mismatches(saved: dict, expected: dict, path: Path) -> List[str]:
    found = []
    entries = [
        (flag, saved["model"].get(key, _MODEL_ENTRY_BEFORE.get(key)), expected["model"].get(key))
        for key, flag in MODEL_FLAGS.items()
    ]
    if "data" in saved:
        entries += [(flag, saved["data"].get(key), expected["data"][key])
                    for key, flag in DATA_FLAGS.items()]
    for flag, was, now in entries:
        if not _same(flag, was, now):
            found.append(
                f"checkpoint {path} was trained with {flag} {_shown(was)}, this run asks for "
                f"{_shown(now)}; resume with {flag} {_shown(was)} or use a new --output-dir"
            )
    if saved["model"].get("architecture") != expected["model"]["architecture"]:
        found.append(f"checkpoint {path} holds a {saved['model'].get('architecture')} model")
    if not found:
        found += layout_problems(saved["layout"], expected["layout"], path)
    return found


def _same(flag: str, was, now) -> bool:
    if flag == "--split" and was is not None:
        try:  # 90,10,0 and 9,1,0 hold out the same documents
            return all(math.isclose(a, b) for a, b in zip(split_shares(was), split_shares(now)))
        except ValueError:
            return False
    return was == now


def _shown(value) -> str:
    if isinstance(value, bool):  # a switch such as --polycom-gated
        return "on" if value else "off"
    return "(unset)" if value is None else str(value)


def _set_aside(root: Path, damaged: dict) -> List[str]:
    notes = []
    for iteration, found in damaged.items():
        notes += [f"skipped: {line}" for line in found]
        if iteration is None:
            continue
        path = iteration_dir(root, iteration)
        aside = path.with_name(path.name + ".damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged{n}")
        path.rename(aside)
        notes.append(f"--resume-fallback: moved the damaged {path.name} to {aside.name}")
    return notes


def _version_notes(saved: dict, expected: dict, path: Path) -> List[str]:
    return [
        f"note: {path.name} was written with {name} {was}; this is {now}"
        for name, now in expected["versions"].items()
        if (was := saved.get("versions", {}).get(name)) != now
    ]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
