"""``polycom-megatron compare``: is PolyCom better than SwiGLU on my data?

Trains the chosen activations as twins (``train-cpu`` runs with the same data, tokens,
schedule, evaluation and seeds; matched parameters) and reports the final validation loss
per activation across seeds, its paired difference to SwiGLU, the parameters and tokens/s,
as a table, ``compare.json`` and ``compare.png`` (validation loss against tokens).

``compare --from-logs DIR...`` makes the same report from finished Megatron-LM runs (their
``--tensorboard-dir`` folders, e.g. the example scripts' runs on a cluster).

Flags it does not know go to every ``train-cpu`` run unchanged (``--hidden 256``,
``--lr 1e-3``, ...); the ones that tell the twins apart are its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from polycom_megatron import variants
from polycom_megatron.cli_types import (
    OneLineErrorParser,
    non_negative_int,
    positive_int,
    prepare_output_dir,
    writable_dir,
)
from polycom_megatron.experiments import report, runs, tblogs

PROG = "polycom-megatron compare"
DEFAULT_ACTIVATIONS = ("swiglu", "polyrelu", "polynorm")
DEFAULT_OUTPUT = Path("runs/compare")
# --from-logs writes only a report (derived from logs that stay): its own default folder.
DEFAULT_REPORT_OUTPUT = Path("runs/compare-from-logs")
# compare's flags that only apply when it trains.
TRAINING_FLAGS = ("--activations", "--seeds", "--steps", "--num-experts", "--hidden",
                  "--swiglu-ffn-hidden", "--eval-interval", "--eval-iters", "--data-dir",
                  "--overwrite")
# Two ranks, data parallel: the 2-core machine this is sized for, one core per rank.
DEFAULT_LAYOUT = {"--world-size": "2", "--tp": "1"}
# train-cpu flags that tell the twins apart or place their files: compare sets them.
OWN_FLAGS = ("--seed", "--output-dir", "--polycom-activation", "--polycom-gated", "--swiglu",
             "--ffn-hidden", "--resume", "--resume-fallback", "--overwrite", "--tensorboard-dir")


def activation_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        for name in names:
            variants.check_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(set(names)) != len(names) or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give each activation once, e.g. swiglu,polynorm")
    return names


def seed_list(text: str) -> tuple:
    """``3``: seeds 1, 2, 3; ``7,11``: those seeds."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count (3) or seeds (1,2,3)") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds {text}: at least one seed")
        return tuple(range(1, values[0] + 1))
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct non-negative seeds, e.g. 1,2,3")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[1],
        epilog="Any other flag goes to every train-cpu run (see polycom-megatron train-cpu "
        "--help), e.g. --layers 4 --lr 1e-3; the ones compare sets per run are refused.")
    p.add_argument("--from-logs", nargs="+", type=Path, metavar="DIR",
                   help="report on finished runs instead of training: TensorBoard folders "
                   "(Megatron-LM's --tensorboard-dir) or folders holding several")
    p.add_argument("--activations", type=activation_list, default=DEFAULT_ACTIVATIONS,
                   help=f"comma list from {', '.join(variants.NAMES)} "
                   f"(default: {','.join(DEFAULT_ACTIVATIONS)})")
    p.add_argument("--seeds", type=seed_list, default=(1, 2, 3),
                   help="how many seeds (3: seeds 1,2,3) or which (e.g. 7,11) (default: 3)")
    p.add_argument("--steps", type=positive_int, default=300, help="steps per run (default: 300)")
    p.add_argument("--num-experts", type=non_negative_int, default=0,
                   help="experts per MoE layer; 0 = dense (default: 0)")
    p.add_argument("--hidden", type=positive_int, default=128, help="model width (default: 128)")
    p.add_argument("--swiglu-ffn-hidden", type=positive_int, default=None,
                   help="SwiGLU's FFN width; the others get the width of equal parameters "
                   "(1.5x for PolyReLU/PolyNorm/GELU) (default: 8/3 x hidden, rounded up "
                   "to a multiple of 32; experts: 4/3 x hidden)")
    p.add_argument("--eval-interval", type=positive_int, default=None,
                   help="steps between validation losses (default: steps / 10)")
    p.add_argument("--eval-iters", type=positive_int, default=4,
                   help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--output-dir", type=writable_dir, default=None,
                   help=f"runs/, the shared data/ and the report go here (default: "
                   f"{DEFAULT_OUTPUT}; with --from-logs, the report: {DEFAULT_REPORT_OUTPUT})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="prepared data for every run (default: OUTPUT_DIR/data, prepared by "
                   "the first run from the offline corpus)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace runs in --output-dir made with other settings (without it "
                   "they are refused; finished runs with the same settings are reused)")
    return p


def swiglu_width(args) -> int:
    if args.swiglu_ffn_hidden is not None:
        return args.swiglu_ffn_hidden
    ratio = 4 / 3 if args.num_experts else 8 / 3
    return -(-int(ratio * args.hidden) // 32) * 32


def _flag_names(argv: Sequence[str]) -> List[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def common_argv(args, extra: Sequence[str]) -> List[str]:
    """The train-cpu flags every twin shares."""
    own = [f for f in _flag_names(extra) if f in OWN_FLAGS]
    if own:
        raise ValueError(f"{own[0]} is set by compare for each run; drop it (seeds: --seeds, "
                         "activations: --activations, width: --swiglu-ffn-hidden)")
    given = set(_flag_names(extra))
    layout = [x for flag, value in DEFAULT_LAYOUT.items() if flag not in given
              for x in (flag, value)]
    data = args.data_dir if args.data_dir is not None else args.output_dir / "data"
    eval_interval = args.eval_interval or max(1, args.steps // 10)
    return [*layout, "--data-dir", str(data), "--steps", str(args.steps),
            "--num-experts", str(args.num_experts), "--hidden", str(args.hidden),
            "--eval-interval", str(eval_interval), "--eval-iters", str(args.eval_iters), *extra]


def _check_with_train_cpu(planned: Sequence[runs.PlannedRun]) -> None:
    """Every run's flags through train-cpu's own parser and checks, before any run starts."""
    from polycom_megatron.training.cpu_job import build_parser as train_parser, job_from_args

    parser = train_parser(prog=f"{PROG} (passing on to train-cpu)")
    for run in planned:
        job_from_args(parser.parse_args(run.argv), experts_available=True)


def from_logs(args) -> int:
    if (args.output_dir / runs.RUNS_DIR).is_dir():
        raise ValueError(f"{args.output_dir} holds a comparison that compare trained; write the "
                         "report from logs to another --output-dir")
    found = tblogs.read_runs(args.from_logs)
    groups = report.group_runs(found)
    out = prepare_output_dir(args.output_dir)
    settings = {"from_logs": [str(p) for p in args.from_logs],
                "runs": [str(r.path) for r in found]}
    print(report.write(groups, found, out, settings, "validation loss (from logs)"))
    return 0


def _needs_report_packages() -> None:
    """Before hours of training, not after: the report needs these (the experiments extra)."""
    for name in ("tensorboard", "matplotlib"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def train_and_compare(args, extra: Sequence[str]) -> int:
    _needs_report_packages()
    width = swiglu_width(args)
    common = common_argv(args, extra)
    tp = int(common[common.index("--tp") + 1]) if "--tp" in common else 1
    planned = runs.plan(args.activations, args.seeds, args.output_dir, width, tp, common)
    _check_with_train_cpu(planned)
    runs.check_earlier(planned, args.overwrite)
    prepare_output_dir(args.output_dir)
    print(f"compare: {len(args.activations)} activations x {len(args.seeds)} seeds = "
          f"{len(planned)} train-cpu runs of {args.steps} steps, one at a time; SwiGLU FFN "
          f"width {width}", flush=True)
    for i, run in enumerate(planned, 1):
        runs.execute(run, i, len(planned))
    found = [tblogs.read_run(r.tensorboard) for r in planned]
    groups = report.group_runs(found, order=args.activations)
    settings = {"activations": list(args.activations), "seeds": list(args.seeds),
                "steps": args.steps, "num_experts": args.num_experts,
                "swiglu_ffn_hidden": width, "train_cpu_flags": common,
                "runs": {r.name: r.argv for r in planned}}
    print(report.write(groups, found, args.output_dir, settings,
                       f"validation loss, {args.steps} steps, seeds {list(args.seeds)}"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    try:
        if args.from_logs:
            given = [f for f in _flag_names(argv) if f in TRAINING_FLAGS] + extra
            if given:
                parser.error(f"--from-logs reports on finished runs; {given[0]} does not apply")
            args.output_dir = args.output_dir or DEFAULT_REPORT_OUTPUT
            return from_logs(args)
        args.output_dir = args.output_dir or DEFAULT_OUTPUT
        return train_and_compare(args, extra)
    except (ValueError, runs.RunFailed) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
