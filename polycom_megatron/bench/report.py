"""Results of ``polycom-megatron bench`` as a JSON payload, a terminal table and a PNG chart.

The payload is the single source: the table and the chart are drawn from it, so what is
printed is what is stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

from polycom_megatron.bench import flops as F
from polycom_megatron.bench.peak import mfu_or_none

FLOP_CONVENTIONS = {
    "unit": "a multiply-add is 2 FLOPs; GEMM [m,k]x[k,n] = 2mkn",
    "gemms": "QKV, attention output projection, MLP fc1 (x2 when gated) and fc2, MoE router "
    "and the top-k experts' fc1/fc2, LM head; embedding lookup not counted",
    "attention": "QK^T and AV, 2*keys*kv_channels*heads each per query token; causal: keys = "
    "S/2 on average (S^2/2 scores per sequence, the FlashAttention convention)",
    "activation_flops_per_element": {
        a: F.activation_flops_per_element(a) for a in F.ACTIVATIONS
    },
    "activation_detail": "SwiGLU 5 (exp, add, divide, x a, x gate); GELU 5 (scale, erf, add, "
    "x x, x 1/2); PolyReLU 2r+1 (relu, Horner); PolyNorm 5r-1 (powers, square+add per power, "
    "scale+accumulate per power); PolyReLU-GLU / PolyNorm-GLU: the gate's activation + 1 "
    "(x up); r = 3",
    "not_counted": "norms, softmax, rotary, residuals, loss, MoE permutation and prob weighting, "
    "recomputation (MFU uses model FLOPs)",
    "training": f"{F.TRAINING_MULTIPLIER} x forward (backward = 2 x forward, elementwise included)",
    "peak": "best FLOP/s of timed square matmuls on the same device and dtype, sampled at the "
    "start, after every round of every section and at the end (the best sample is used); an "
    "MFU above 1 means the peak was under-measured and is reported as null (mfu_over_peak)",
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def _git(*args) -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    from megatron.core import package_info

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    status = _git("status", "--porcelain")
    try:
        load = os.getloadavg()  # other tenants of the machine show up here
    except OSError:
        load = None
    return dict(
        load_average_1_5_15min=load,
        device=str(device),
        device_name=device_name(device),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        megatron_core=package_info.__version__,
        triton=triton_version,
        python=platform.python_version(),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
    )


def _case_dict(case, swiglu_tps: Optional[float], peak_flops: float) -> dict:
    out = dict(
        section=case.section,
        name=case.name,
        activation=case.activation,
        kernel=case.kernel,
        shape=dataclasses.asdict(case.shape),
        params=case.params,
        tokens_per_step=case.tokens_per_step,
        train_flops_per_token=case.flops_per_token,
        unavailable=case.unavailable,
        steps_per_sample=case.repeats,
        first_step_s=case.first_step_s,
        seconds_per_step=list(case.seconds),
        tokens_per_s=None,
        relative_to_swiglu=None,
        mfu=None,
        mfu_over_peak=None,
        achieved_tflops=None,
        memory=None,
    )
    if case.seconds and not case.unavailable:
        tps = [case.tokens_per_step / t for t in case.seconds]
        median = statistics.median(tps)
        mfu = F.mfu(median, case.flops_per_token, peak_flops)
        out.update(
            tokens_per_s=dict(median=median, min=min(tps), max=max(tps)),
            relative_to_swiglu=median / swiglu_tps if swiglu_tps else None,
            mfu=mfu_or_none(mfu),
            mfu_over_peak=None if mfu_or_none(mfu) is not None else mfu,
            achieved_tflops=median * case.flops_per_token / 1e12,
        )
    if case.resident_bytes is not None:
        step = case.step_peak_bytes or 0
        out["memory"] = dict(
            resident_bytes=case.resident_bytes,  # weights, grads, optimizer state after warmup
            step_peak_bytes=step,  # the most a timed sample rose above its starting level
            peak_bytes=case.resident_bytes + step,
        )
    return out


def build_payload(cases: List, settings, peak: dict, memory_method: str, argv: List[str],
                  wall_s: float) -> dict:
    from polycom_megatron.bench.throughput import settings_dict

    swiglu = {}
    notes = list(settings.notes)
    for case in cases:
        if case.activation == "swiglu" and case.seconds and not case.unavailable:
            swiglu[case.section] = statistics.median(case.tokens_per_step / t for t in case.seconds)
    payload = dict(
        benchmark="polycom-megatron bench (throughput)",
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["polycom-megatron", "bench", *argv]),
        argv=list(sys.argv),
        environment=environment(settings.device),
        settings=settings_dict(settings),
        peak=peak,
        memory_method=memory_method,
        flop_conventions=FLOP_CONVENTIONS,
        notes=notes,
        wall_s=wall_s,
        cases=[_case_dict(c, swiglu.get(c.section), peak["flops_per_s"]) for c in cases],
    )
    over = [f"{c['section']} {c['name']}" for c in payload["cases"] if c["mfu_over_peak"]]
    if over:
        notes.append(
            f"MFU not reported for {', '.join(over)}: they exceeded the measured peak of "
            f"{peak['flops_per_s'] / 1e12:.3f} TFLOP/s, so the peak was under-measured (a loaded "
            "or throttled device, or a matmul size too small to reach it); rerun on an idle device"
        )
    return payload


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _header_lines(payload: dict) -> List[str]:
    env, peak, st = payload["environment"], payload["peak"], payload["settings"]
    commit = (env["git_commit"] or "?")[:10] + ("+dirty" if env["git_dirty"] else "")
    bests = [m["best_flops_per_s"] for m in peak["measurements"]]
    return [
        f"device: {env['device_name']} ({env['device']}), {st['dtype']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}, commit {commit}",
        f"peak: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s measured ({peak['matmul']} "
        f"{peak['dtype']}; best of {peak['samples']} samples in {len(bests)} measurements "
        f"between the rounds, which ranged {min(bests) / 1e12:.3f}..{max(bests) / 1e12:.3f})",
        f"tokens per step: {st['micro_batch']} x {st['seq_length']}; {st['rounds']} interleaved "
        f"rounds after {st['warmup']} warmup steps; medians",
        f"memory: {payload['memory_method']}",
    ] + _load_line(env)


def _load_line(env: dict) -> List[str]:
    """Other work on the machine, which only medians over interleaved rounds can absorb."""
    start, end = env.get("load_average_1min_at_start"), env.get("load_average_1_5_15min")
    if start is None or end is None:
        return []
    return [f"machine load (1-min average) at start / end: {start:.1f} / {end[0]:.1f} "
            f"on {os.cpu_count()} CPUs"]


def format_table(payload: dict) -> str:
    header = ("section", "config", "ffn", "tokens/s", "min..max", "vs SwiGLU", "MFU", "peak MiB",
              "1st step s")
    rows = []
    for c in payload["cases"]:
        shape = c["shape"]
        width = shape["moe_ffn_hidden_size"] or shape["ffn_hidden_size"]
        lead = (c["section"], c["name"], str(width))
        t, mem, rel = c["tokens_per_s"], c["memory"], c["relative_to_swiglu"]
        if t is None:
            # Short row; the reason runs on past the columns.
            rows.append(lead + ("n/a", c["unavailable"] or "not measured"))
            continue
        rows.append(lead + (
            _si(t["median"]),
            f"{_si(t['min'])}..{_si(t['max'])}",
            f"{rel:.3f}" if rel else "-",
            f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "> peak",
            f"{mem['peak_bytes'] / 2**20:.0f}" if mem else "-",
            f"{c['first_step_s']:.2f}" if c.get("first_step_s") is not None else "-",
        ))
    full = [r for r in rows if len(r) == len(header)] + [header]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]

    def line(cells):
        if len(cells) < len(header):
            return "  ".join(v.ljust(w) for v, w in zip(cells[:4], widths)) + "  " + cells[4]
        return "  ".join(v.ljust(w) for v, w in zip(cells, widths)).rstrip()

    per_element = FLOP_CONVENTIONS["activation_flops_per_element"]
    lines = _header_lines(payload) + ["", line(header), line(tuple("-" * w for w in widths))]
    lines += [line(r) for r in rows]
    lines += ["", "notes:"] + [f"- {n}" for n in payload["notes"]]
    lines.append(
        "- FLOPs: training = 3 x forward; causal attention counts S/2 keys per query; "
        "activation FLOPs per element: " + ", ".join(f"{k} {v}" for k, v in per_element.items())
    )
    return "\n".join(lines)


def write_json(payload: dict, path: Path) -> Path:
    """Written whole or not at all: to a temporary file beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)
    return path


def write_chart(payload: dict, path: Path) -> Optional[Path]:
    """Tokens/s (top) and slowdown vs SwiGLU (bottom), one column per section.
    Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except ImportError:
        return None

    sections = list(dict.fromkeys(c["section"] for c in payload["cases"]))
    if not sections:
        return None
    fig, axes = plt.subplots(2, len(sections), figsize=(4.2 * len(sections), 7), squeeze=False)
    for col, section in enumerate(sections):
        cases = [c for c in payload["cases"] if c["section"] == section]
        names = [c["name"] for c in cases]
        ys = list(range(len(cases)))
        spans = [c["tokens_per_s"] or dict(median=0.0, min=0.0, max=0.0) for c in cases]
        med = [t["median"] for t in spans]
        err = [[t["median"] - t["min"] for t in spans], [t["max"] - t["median"] for t in spans]]
        baseline = ("swiglu", "gelu")
        colors = ["tab:gray" if c["activation"] in baseline else "tab:blue" for c in cases]
        top, bottom = axes[0][col], axes[1][col]
        top.barh(ys, med, xerr=err, color=colors, capsize=3)
        top.set_title(section)
        top.set_xlabel("tokens/s (median, min..max)")
        top.xaxis.set_major_formatter(EngFormatter())
        slow = [100.0 * (1.0 / c["relative_to_swiglu"] - 1.0) if c["relative_to_swiglu"] else 0.0
                for c in cases]
        bottom.barh(ys, slow, color=colors)
        bottom.axvline(0.0, color="black", linewidth=0.8)
        bottom.set_xlabel("step time vs SwiGLU (%)")
        for ax in (top, bottom):
            ax.set_yticks(ys)
            ax.set_yticklabels(names)
            ax.invert_yaxis()
        for y, c, pct in zip(ys, cases, slow):
            if c["tokens_per_s"] is None:
                for ax in (top, bottom):
                    ax.text(0, y, " n/a", va="center", fontsize=8, color="tab:red")
            elif c["activation"] != "swiglu":
                bottom.text(max(pct, 0.0), y, f" {pct:+.1f}%", va="center", fontsize=8)
    env = payload["environment"]
    fig.suptitle(f"polycom-megatron bench: {env['device_name']}, {payload['settings']['dtype']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)
    os.replace(partial, path)
    return path
