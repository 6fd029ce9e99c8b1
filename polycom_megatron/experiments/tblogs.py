"""Read training runs from TensorBoard event files written the way Megatron-LM writes them.

One reader for two sources: the ``train-cpu`` runs that ``compare`` launches and the
Megatron-LM ``pretrain`` runs of a cluster (``compare --from-logs``). What it relies on is
Megatron-LM's own logging (``megatron/training/training.py`` and ``initialize.py``):

* the arguments as text summaries, one per argument name (``write_args_to_tensorboard``):
  which activation (``swiglu``, ``polycom_activation``, ``polycom_gated``), the ``seed``,
  ``seq_length``, ``global_batch_size`` and the model shape;
* ``lm loss validation`` (step: iteration) with its twin ``lm loss validation vs samples``
  (step: consumed samples), written in pairs;
* ``iteration-time`` (seconds per iteration, with ``--log-timers-to-tensorboard``).

At the last iteration Megatron-LM evaluates again after training and then on the test
split, all under the same tag: the first value logged at an iteration is the validation
loss; later ones at the same iteration are ignored.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

VALIDATION_TAG = "lm loss validation"
VALIDATION_SAMPLES_TAG = "lm loss validation vs samples"
ITERATION_TIME_TAG = "iteration-time"
TEXT_SUFFIX = "/text_summary"
EVENTS_GLOB = "events.out.tfevents.*"
# train-cpu writes its summary next to its tensorboard/ folder.
SUMMARY_FILE = "summary.json"


class LogError(ValueError):
    """A log folder that cannot be read as a training run (the message names it)."""


@dataclass
class ValidationPoint:
    iteration: int
    tokens: int
    loss: float


@dataclass
class RunLog:
    """One training run as its TensorBoard logs describe it."""

    path: Path
    args: Dict[str, str]
    activation: str
    seed: Optional[int]
    validation: List[ValidationPoint]
    tokens_per_s: Optional[float]
    num_parameters: Optional[int]
    notes: List[str] = field(default_factory=list)

    @property
    def final(self) -> Optional[ValidationPoint]:
        return self.validation[-1] if self.validation else None

    def as_dict(self) -> dict:
        final = self.final
        return {
            "path": str(self.path), "activation": self.activation, "seed": self.seed,
            "num_parameters": self.num_parameters, "tokens_per_s": self.tokens_per_s,
            "final_iteration": final.iteration if final else None,
            "final_tokens": final.tokens if final else None,
            "final_validation_loss": final.loss if final else None,
            "validation": [vars(p) for p in self.validation],
            "ffn_hidden_size": _int(self.args.get("ffn_hidden_size")),
            "num_experts": _int(self.args.get("num_experts")) or 0,
        }


def activation_of(args: Dict[str, str]) -> str:
    """The FFN variant name (``polycom_megatron.variants``) a run's arguments select."""
    polycom = args.get("polycom_activation", "None")
    if polycom not in ("None", "none", ""):
        return polycom + ("-glu" if args.get("polycom_gated") == "True" else "")
    if args.get("swiglu") == "True":
        return "swiglu"
    if args.get("squared_relu") == "True":
        return "squared-relu"
    return "gelu"


def find_runs(paths) -> List[Path]:
    """The run folders under ``paths``: each a folder holding event files, or a folder of such."""
    found: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise LogError(f"{path}: no such directory; pass TensorBoard log folders "
                           "(Megatron-LM's --tensorboard-dir) or folders holding them")
        runs = sorted({p.parent for p in path.rglob(EVENTS_GLOB) if p.is_file()})
        if not runs:
            raise LogError(f"{path}: no TensorBoard event files ({EVENTS_GLOB}) in it or below; "
                           "was the run started with --tensorboard-dir?")
        found += [r for r in runs if r not in found]
    return found


def read_run(path: Path) -> RunLog:
    """Read one run folder (its event files, oldest first, as TensorBoard merges them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0: keep every event (the default samples scalars down to 10,000).
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    args = {t[: -len(TEXT_SUFFIX)]: _text(acc.Tensors(t)[0]) for t in tags.get("tensors", [])
            if t.endswith(TEXT_SUFFIX)}
    if not args:
        raise LogError(f"{path}: no arguments in the TensorBoard logs (Megatron-LM writes "
                       "them at start-up); cannot tell which activation it trained")
    scalars = set(tags.get("scalars", []))
    notes = []
    validation = _validation(acc, scalars, args, path)
    if not validation:
        notes.append("no validation loss logged (set --eval-interval and --eval-iters)")
    return RunLog(
        path=path, args=args, activation=activation_of(args), seed=_int(args.get("seed")),
        validation=validation, tokens_per_s=_tokens_per_s(acc, scalars, args),
        num_parameters=_num_parameters(path, args), notes=notes,
    )


def read_runs(paths) -> List[RunLog]:
    return [read_run(p) for p in find_runs(paths)]


# --------------------------------------------------------------------------------------


def _text(event) -> str:
    values = event.tensor_proto.string_val
    return values[0].decode("utf-8") if values else ""


def _int(text) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _first_per_step(events) -> List[Tuple[int, float]]:
    seen: Dict[int, float] = {}
    for event in events:
        seen.setdefault(event.step, event.value)
    return sorted(seen.items())


def _validation(acc, scalars, args, path) -> List[ValidationPoint]:
    if VALIDATION_TAG not in scalars:
        return []
    losses = acc.Scalars(VALIDATION_TAG)
    samples = acc.Scalars(VALIDATION_SAMPLES_TAG) if VALIDATION_SAMPLES_TAG in scalars else []
    seq_length = _int(args.get("seq_length"))
    if len(samples) != len(losses) or seq_length is None:
        raise LogError(f"{path}: '{VALIDATION_TAG}' without its '{VALIDATION_SAMPLES_TAG}' "
                       "twin or without seq_length in the arguments; not a Megatron-LM log?")
    points: Dict[int, ValidationPoint] = {}
    # Written in pairs (iteration, samples): the i-th of each belong together.
    for loss, sample in zip(losses, samples):
        if loss.step not in points and math.isfinite(loss.value):
            points[loss.step] = ValidationPoint(loss.step, sample.step * seq_length, loss.value)
    return [points[i] for i in sorted(points)]


def _tokens_per_s(acc, scalars, args) -> Optional[float]:
    """Tokens per second from the median iteration time (robust to the warm-up steps and
    to a checkpoint save or evaluation stalling one iteration)."""
    batch, seq = _int(args.get("global_batch_size")), _int(args.get("seq_length"))
    if ITERATION_TIME_TAG not in scalars or not batch or not seq:
        return None
    times = [v for _, v in _first_per_step(acc.Scalars(ITERATION_TIME_TAG)) if v > 0]
    return batch * seq / statistics.median(times) if times else None


def _num_parameters(path: Path, args: Dict[str, str]) -> Optional[int]:
    """Measured by train-cpu (its summary.json beside the logs), else counted from the args."""
    summary = path.parent / SUMMARY_FILE
    if summary.is_file():
        try:
            measured = json.loads(summary.read_text()).get("num_parameters")
        except (OSError, ValueError):
            measured = None
        if isinstance(measured, int):
            return measured
    from polycom_megatron.experiments.params import count_parameters

    return count_parameters(args)
