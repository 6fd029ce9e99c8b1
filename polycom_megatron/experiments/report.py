"""The comparison report: runs grouped by activation, a table, a JSON file and a plot.

Per activation: the parameters, the final validation loss (mean and sample standard
deviation across seeds, and n), its difference to the baseline (SwiGLU) paired by seed
(mean and standard deviation of the per-seed differences, and the number of pairs), and
the mean tokens/s. The plot draws validation loss against tokens: the mean across seeds
as a line and the min-max range as a band.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from polycom_megatron.experiments.tblogs import RunLog

BASELINE = "swiglu"
TABLE_FILE = "compare.txt"
JSON_FILE = "compare.json"
PLOT_FILE = "compare.png"
# Arguments expected to differ between the twins of one comparison.
DIFFERENT_BY_DESIGN = {
    "seed", "swiglu", "ffn_hidden_size", "moe_ffn_hidden_size", "tensorboard_dir", "save",
    "load", "data_cache_path", "wandb_exp_name", "wandb_save_dir", "iteration",
    "activation",  # train-cpu's own: the variant name
    # The PolyCom launcher turns Megatron's bias-activation fusions off.
    "bias_swiglu_fusion", "bias_gelu_fusion",
}


@dataclass
class Group:
    activation: str
    runs: List[RunLog]
    loss_mean: Optional[float]
    loss_std: Optional[float]
    delta_mean: Optional[float]
    delta_std: Optional[float]
    delta_n: int
    tokens_per_s: Optional[float]
    num_parameters: Optional[int]

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "runs"} | {
            "n": len(self.runs), "seeds": [r.seed for r in self.runs]}


def _std(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def _mean(values: Sequence[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def group_runs(runs: Sequence[RunLog], order: Sequence[str] = (BASELINE,),
               baseline: str = BASELINE) -> List[Group]:
    """Runs by activation (``order`` first, then as found); two runs of one activation with
    the same seed are refused: pairing by seed would be ambiguous."""
    by_name: Dict[str, List[RunLog]] = {name: [] for name in order}
    for run in runs:
        twin = next((r for r in by_name.get(run.activation, []) if r.seed == run.seed), None)
        if twin is not None:
            raise ValueError(f"two {run.activation} runs with seed {run.seed}: {twin.path} and "
                             f"{run.path}; pass only one of them")
        by_name.setdefault(run.activation, []).append(run)
    base = {r.seed: r.final.loss for r in by_name.get(baseline, []) if r.final}
    groups = []
    for name, members in by_name.items():
        if not members:
            continue
        members.sort(key=lambda r: (r.seed is None, r.seed))
        finals = [r.final.loss for r in members if r.final]
        deltas = [r.final.loss - base[r.seed] for r in members if r.final and r.seed in base]
        params = {r.num_parameters for r in members}
        groups.append(Group(
            activation=name, runs=members, loss_mean=_mean(finals), loss_std=_std(finals),
            delta_mean=_mean(deltas) if name != baseline else None,
            delta_std=_std(deltas) if name != baseline else None,
            delta_n=len(deltas) if name != baseline else 0,
            tokens_per_s=_mean([r.tokens_per_s for r in members if r.tokens_per_s]),
            num_parameters=params.pop() if len(params) == 1 else None,
        ))
    return groups


def differing_settings(runs: Sequence[RunLog]) -> Dict[str, List[str]]:
    """Arguments that differ between runs beyond the activation and seed (worth a warning:
    then the twins did not train the same thing)."""
    keys = set().union(*(r.args for r in runs)) - DIFFERENT_BY_DESIGN
    keys = {k for k in keys if not k.startswith("polycom_")}
    out = {}
    for key in sorted(keys):
        values = sorted({r.args.get(key, "(unset)") for r in runs})
        if len(values) > 1:
            out[key] = values
    return out


def _pm(mean: Optional[float], std: Optional[float], signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {std:.4f}" if std is not None else "")


def table(groups: Sequence[Group], baseline: str = BASELINE) -> str:
    """The table ``compare`` prints (plain text, one row per activation)."""
    header = ["activation", "params", "val loss (mean ± std)", "n",
              f"Δ vs {baseline} (paired)", "pairs", "tokens/s"]
    rows = [header]
    for g in groups:
        rows.append([
            g.activation, f"{g.num_parameters:,}" if g.num_parameters else "?",
            _pm(g.loss_mean, g.loss_std), str(len(g.runs)),
            "baseline" if g.activation == baseline else _pm(g.delta_mean, g.delta_std, True),
            "" if g.activation == baseline else str(g.delta_n),
            f"{g.tokens_per_s:,.0f}" if g.tokens_per_s else "?",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def footnotes(groups: Sequence[Group], runs: Sequence[RunLog], baseline: str = BASELINE
              ) -> List[str]:
    notes = []
    finals = {r.final.iteration for r in runs if r.final}
    if len(finals) == 1:
        tokens = sorted({r.final.tokens for r in runs if r.final})
        notes.append(f"validation loss at iteration {finals.pop()} "
                     f"({' / '.join(f'{t:,}' for t in tokens)} tokens); tokens/s from the "
                     "median iteration time")
    elif len(finals) > 1:
        notes.append(f"warning: the runs end at different iterations {sorted(finals)}: the "
                     "final losses are not at the same point")
    if not any(g.activation == baseline for g in groups):
        notes.append(f"note: no {baseline} runs, so no differences to it")
    for key, values in differing_settings(runs).items():
        notes.append(f"warning: the runs differ in {key}: {', '.join(values)}")
    for run in runs:
        notes += [f"note: {run.path}: {n}" for n in run.notes]
    return notes


def to_json(groups: Sequence[Group], settings: dict) -> dict:
    return {"settings": settings, "baseline": BASELINE,
            "summary": {g.activation: g.as_dict() for g in groups},
            "runs": [r.as_dict() for g in groups for r in g.runs]}


def plot(groups: Sequence[Group], path: Path, title: str) -> None:
    """Validation loss against tokens: the seeds' mean and their min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        curves = [{p.tokens: p.loss for p in r.validation} for r in g.runs if r.validation]
        if not curves:
            continue
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        if not tokens:
            continue
        values = [[c[t] for c in curves] for t in tokens]
        line, = ax.plot(tokens, [statistics.fmean(v) for v in values], marker=".",
                        label=f"{g.activation} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(groups: Sequence[Group], runs: Sequence[RunLog], out_dir: Path, settings: dict,
          title: str) -> str:
    """Write the table, JSON and plot into ``out_dir``; the text to print."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join([table(groups), *footnotes(groups, runs)])
    (out_dir / TABLE_FILE).write_text(text + "\n")
    (out_dir / JSON_FILE).write_text(json.dumps(to_json(groups, settings), indent=1) + "\n")
    plot(groups, out_dir / PLOT_FILE, title)
    return text + (f"\nwritten: {out_dir / TABLE_FILE}, {out_dir / JSON_FILE}, "
                   f"{out_dir / PLOT_FILE}")
