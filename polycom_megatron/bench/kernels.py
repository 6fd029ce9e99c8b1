"""Kernel benchmark: PolyNorm / PolyReLU and their gated forms, forward, backward and
forward+backward.

    polycom-megatron bench-kernels [--rows 2048,8192,16384]
        [--cols 1536,5504,8192,8256,16384,32768] [--dtype bf16] [--order 3]
        [--ops polynorm,polyrelu,polynorm_glu,polyrelu_glu]
        [--impls naive,torch,compile,triton,liger,swiglu,swiglu-compile,swiglu-megatron,swiglu-liger]
        [--reps 100] [--warmup 10] [--json out.json]

Implementations:

- naive:   the formula (``polynorm_reference`` / ``polyrelu_reference``) under autograd;
- torch:   our autograd Function with the PyTorch kernel set;
- compile: ``torch.compile`` of the reference formula;
- triton:  our autograd Function with the Triton kernel set;
- liger:   Liger-Kernel's PolyNorm (order 3 only; no PolyReLU there), when importable.

The gated ops (``polynorm_glu``, ``polyrelu_glu``: PolyNorm(g) * u, PolyReLU(g) * u) take
fc1's output ``[rows, 2 * cols]``: ``--cols`` is the FFN hidden size n, as for SwiGLU at
the same width. Beside them run SwiGLU's own activations on the same input (``swiglu*``,
see ``polycom_megatron.bench.glu_baselines``: eager, compiled, Megatron-Core's fused
``bias_swiglu_impl``, Liger's), and every gated row reports its speedup over the fastest
SwiGLU baseline of the same pass.

Every shape first times a device-to-device copy of the same tensor; each timing is then
reported as achieved bandwidth over the minimum bytes the pass must move (forward: read
x, write y; backward: read x and dy, write dx; forward+backward: both; for the gated ops
x and dx are twice as wide as y and dy) and as a fraction
of that copy bandwidth, plus the speedup over Liger where Liger ran. Each entry also
records the largest error of its output and input gradient against ``naive``.

On CUDA the times are medians of CUDA-event timings (after warmup, with L2 flushed before
every repetition). On CPU it falls back to wall-clock with small shapes and few reps, which
only checks that everything runs (Triton needs TRITON_INTERPRET=1 there, set here when
Triton is not imported yet). Launch tunables of the Triton kernels can be swept with the
POLYCOM_TRITON_* environment variables (see ``polycom_megatron.ops.triton_common``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from polycom_megatron.bench import parse_choices, resolve_device
from polycom_megatron.bench.glu_baselines import (
    SWIGLU_IMPLS,
    compiled_swiglu,
    swiglu_baseline,
    swiglu_eager,
)
from polycom_megatron.cli_types import (
    OneLineErrorParser,
    int_list,
    non_negative_int,
    positive_int,
    prepare_output_dir,
    writable_file,
)

GATED_OPS = ("polynorm_glu", "polyrelu_glu")
OPS = ("polynorm", "polyrelu") + GATED_OPS
IMPLS = ("naive", "torch", "compile", "triton", "liger") + SWIGLU_IMPLS
PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_ROWS = (2048, 8192, 16384)
DEFAULT_COLS = (1536, 5504, 8192, 8256, 16384, 32768)
CPU_ROWS, CPU_COLS = (64,), (256,)
EPS = 1e-6
L2_FLUSH_BYTES = 256 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(
        prog="polycom-megatron bench-kernels",
        description="Time PolyNorm/PolyReLU kernels (plain and gated) against a device copy, "
        "Liger-Kernel and SwiGLU's fused activation.",
    )
    p.add_argument("--rows", type=int_list, help=f"comma list (default "
                   f"{','.join(map(str, DEFAULT_ROWS))}; {CPU_ROWS[0]} on CPU)")
    p.add_argument("--cols", type=int_list, help=f"comma list (default "
                   f"{','.join(map(str, DEFAULT_COLS))}; {CPU_COLS[0]} on CPU)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--order", type=positive_int, default=3, help="r, the highest power (default 3)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ", ".join(IMPLS))
    p.add_argument("--reps", type=positive_int,
                   help="timed repetitions (default 100 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=non_negative_int,
                   help="untimed repetitions (default 10 CUDA, 1 CPU)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between reps")
    p.add_argument("--json", type=writable_file, help="write all results and the environment here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing


class Timer:
    """Median time of a callable in ms: CUDA events on CUDA, wall-clock elsewhere."""

    def __init__(self, device: torch.device, reps: int, warmup: int, flush: bool):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.flush_buf = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
            if self.cuda and flush else None
        )

    @property
    def method(self) -> str:
        return "cuda_events" if self.cuda else "wall_clock"

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        events = []
        for _ in range(self.reps):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


# --------------------------------------------------------------------------- implementations


def _interpret_triton_on_cpu() -> None:
    """Select Triton's interpreter unless Triton is imported already: Triton reads
    TRITON_INTERPRET when a @jit function is defined, its own (tl.sum, ...) included, so
    this must run before anything (the environment report, Megatron-Core) imports it."""
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _prepare_triton(device: torch.device) -> Optional[str]:
    """None if the Triton kernels can run here, else why not."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    except Exception as e:  # pragma: no cover
        return f"triton lookup failed: {e}"
    if device.type != "cuda":
        _interpret_triton_on_cpu()
        from polycom_megatron.ops import polynorm_triton

        if not polynorm_triton.interpreted():
            return "CPU run but the Triton kernels were defined without TRITON_INTERPRET=1"
    return None


def _liger_polynorm(order: int, device: torch.device):
    """(fn(x, weight, bias), None) or (None, why Liger cannot run)."""
    if order != 3:
        return None, "Liger's PolyNorm is order 3 only"
    if device.type != "cuda":
        return None, "Liger-Kernel needs CUDA"
    try:
        from liger_kernel.ops.poly_norm import LigerPolyNormFunction
    except Exception as e:
        return None, f"liger_kernel.ops.poly_norm not importable ({type(e).__name__}: {e})"
    import inspect

    try:
        n_args = len(inspect.signature(LigerPolyNormFunction.forward).parameters) - 1  # ctx
    except (TypeError, ValueError):
        n_args = 4

    def fn(x, weight, bias):
        b = bias.reshape(())
        if n_args >= 5:  # (X, W, B, eps, in_place)
            return LigerPolyNormFunction.apply(x, weight, b, EPS, False)
        return LigerPolyNormFunction.apply(x, weight, b, EPS)

    return fn, None


def _op_functions(op: str):
    """(reference formula, our op) for an op name, both as fn(x, weight, bias)."""
    from polycom_megatron import ops

    ref, ours = getattr(ops, f"{op}_reference"), getattr(ops, op)
    if op.startswith("polynorm"):  # the PolyNorm forms take eps
        return (lambda x, w, b: ref(x, w, b, EPS)), (
            lambda x, w, b, kernel: ours(x, w, b, EPS, kernel=kernel)
        )
    return ref, (lambda x, w, b, kernel: ours(x, w, b, kernel=kernel))


def implementations(op: str, impls, order: int, device: torch.device):
    """{impl: fn(x, weight, bias)} and {impl: reason} for those that cannot run.

    SwiGLU baselines (gated ops only) are fn(x)."""
    fns: Dict[str, Callable] = {}
    skipped: Dict[str, str] = {}
    ref, ours = _op_functions(op)
    for impl in impls:
        if impl in SWIGLU_IMPLS:
            if op not in GATED_OPS:
                skipped[impl] = "SwiGLU baselines run beside the gated ops (" + \
                    ", ".join(GATED_OPS) + ")"
                continue
            fn, why = swiglu_baseline(impl, device)
            if fn is None:
                skipped[impl] = why
            else:
                fns[impl] = fn
        elif impl == "naive":
            fns[impl] = ref
        elif impl in ("torch", "triton"):
            if impl == "triton":
                why = _prepare_triton(device)
                if why:
                    skipped[impl] = why
                    continue
            fns[impl] = lambda x, w, b, k=impl: ours(x, w, b, k)
        elif impl == "compile":
            fns[impl] = "compile"  # built per shape, after torch._dynamo.reset()
        elif impl == "liger":
            if op in GATED_OPS:
                skipped[impl] = "Liger-Kernel has no gated PolyCom; its SwiGLU is swiglu-liger"
                continue
            if op != "polynorm":
                skipped[impl] = "Liger-Kernel has no PolyReLU"
                continue
            fn, why = _liger_polynorm(order, device)
            if fn is None:
                skipped[impl] = why
            else:
                fns[impl] = fn
    return fns, skipped


def _compiled(op: str):
    from polycom_megatron import ops

    torch._dynamo.reset()  # one graph per shape; no recompile limit across shapes
    compiled = torch.compile(getattr(ops, f"{op}_reference"))
    if op.startswith("polynorm"):
        return lambda x, w, b: compiled(x, w, b, EPS)
    return compiled


# --------------------------------------------------------------------------- measurement


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def measure_shape(op, rows, cols, dtype, order, fns, timer, device, results, skipped, log):
    elem = torch.empty((), dtype=dtype).element_size()
    gated = op in GATED_OPS
    numel = rows * cols  # of y (and dy); x is twice as wide for the gated ops
    gen = torch.Generator(device="cpu").manual_seed(rows * 7 + cols)
    x0 = torch.randn(rows, 2 * cols if gated else cols, generator=gen).to(device, dtype)
    dy = torch.randn(rows, cols, generator=gen).to(device, dtype)
    weight = (torch.rand(order, generator=gen) * 0.5 + 0.25).to(device).requires_grad_()
    bias = torch.zeros(1).to(device).requires_grad_()
    x = x0.clone().requires_grad_()

    dst = torch.empty_like(x0)
    copy_ms = timer(lambda: dst.copy_(x0))
    copy_bytes = 2 * x0.numel() * elem
    copy_gbps = copy_bytes / copy_ms / 1e6
    del dst
    log(f"\n{op} {rows}x{cols} {str(dtype).replace('torch.', '')}: copy {copy_ms:.4f} ms "
        f"= {copy_gbps:.0f} GB/s")
    copy_entry = dict(op=op, rows=rows, cols=cols, ms=copy_ms, bytes=copy_bytes,
                      gbps=copy_gbps)

    # In units of rows * cols elements: x, dx are 2 of them when gated, y and dy are 1.
    x_units = 2 if gated else 1
    bytes_moved = {
        name: units * numel * elem
        for name, units in (("fwd", x_units + 1), ("bwd", 2 * x_units + 1),
                            ("fwdbwd", 3 * x_units + 2))
    }
    reference = None
    swiglu_reference = None
    shape_results = []
    for impl, fn in fns.items():
        swiglu = impl in SWIGLU_IMPLS
        inputs = (x,) if swiglu else (x, weight, bias)
        try:
            if fn == "compile":
                fn = _compiled(op)
            elif fn == "swiglu-compile":
                fn = compiled_swiglu()
            y = fn(*inputs)
            grads = torch.autograd.grad(y, inputs, dy, retain_graph=True)
            if reference is None and impl == "naive":
                reference = (y.detach(), grads[0])
            errs = (
                dict(y=_rel_err(y, reference[0]), dx=_rel_err(grads[0], reference[1]))
                if reference is not None and not swiglu else None
            )
            swiglu_errs = None
            if swiglu:
                if swiglu_reference is None:
                    xr = x.detach().requires_grad_()
                    yr = swiglu_eager(xr)
                    swiglu_reference = (yr.detach(), torch.autograd.grad(yr, xr, dy)[0])
                swiglu_errs = dict(y=_rel_err(y, swiglu_reference[0]),
                                   dx=_rel_err(grads[0], swiglu_reference[1]))
            times = {
                "fwd": timer(lambda: fn(*inputs)),
                "bwd": timer(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)),
                "fwdbwd": timer(lambda: torch.autograd.grad(fn(*inputs), inputs, dy)),
            }
            del y, grads
        except Exception as e:  # OOM, a compile failure, an unsupported shape...
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            skipped.append(dict(op=op, impl=impl, rows=rows, cols=cols, reason=reason))
            log(f"  {impl:8s} skipped: {reason}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for name in PASSES:
            ms = times[name]
            gbps = bytes_moved[name] / ms / 1e6
            shape_results.append(dict(
                op=op, impl=impl, rows=rows, cols=cols, dtype=str(dtype).replace("torch.", ""),
                order=order, **{"pass": name}, ms=ms, bytes=bytes_moved[name], gbps=gbps,
                frac_of_copy=gbps / copy_gbps, max_rel_err_vs_naive=errs,
                max_rel_err_vs_swiglu_eager=swiglu_errs,
            ))
    liger = {r["pass"]: r["ms"] for r in shape_results if r["impl"] == "liger"}
    fastest_swiglu = {}  # pass -> (ms, impl) of the fastest SwiGLU baseline
    for r in shape_results:
        if r["impl"] in SWIGLU_IMPLS and r["ms"] < fastest_swiglu.get(r["pass"], (float("inf"),))[0]:
            fastest_swiglu[r["pass"]] = (r["ms"], r["impl"])
    for r in shape_results:
        r["speedup_vs_liger"] = liger[r["pass"]] / r["ms"] if r["pass"] in liger else None
        base = fastest_swiglu.get(r["pass"]) if r["impl"] not in SWIGLU_IMPLS else None
        r["speedup_vs_swiglu"] = base[0] / r["ms"] if base else None
        r["swiglu_baseline"] = base[1] if base else None
        vs = f"  {r['speedup_vs_liger']:.2f}x vs liger" if r["speedup_vs_liger"] else ""
        if r["speedup_vs_swiglu"]:
            vs += f"  {r['speedup_vs_swiglu']:.2f}x vs {r['swiglu_baseline']}"
        err = r["max_rel_err_vs_naive"] or r["max_rel_err_vs_swiglu_eager"]
        err_s = f"  err y {err['y']:.1e} dx {err['dx']:.1e}" if err and r["pass"] == "fwd" else ""
        log(f"  {r['impl']:15s} {r['pass']:7s} {r['ms']:9.4f} ms  {r['gbps']:8.1f} GB/s  "
            f"{r['frac_of_copy']:6.3f} of copy{vs}{err_s}")
    results.extend(shape_results)
    return copy_entry


def _environment(device: torch.device) -> dict:
    try:
        from polycom_megatron.bench.report import environment

        env = environment(device)
    except Exception:
        env = dict(device=str(device), torch=torch.__version__)
        if device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
        try:
            root = Path(__file__).resolve().parents[2]
            env["git_commit"] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip() or None
        except Exception:
            env["git_commit"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    env["polycom_triton_env"] = {
        k: v for k, v in os.environ.items() if k.startswith("POLYCOM_TRITON")
    }
    return env


def main(argv: Optional[List[str]] = None) -> int:
    """``polycom-megatron bench-kernels``: 0 when at least one implementation was timed."""
    payload = run(argv)
    if not payload["results"]:
        reasons = sorted({s["reason"] for s in payload["skipped"]})
        raise SystemExit("polycom-megatron bench-kernels: nothing could be timed ("
                         + "; ".join(reasons) + ")")
    return 0


def run(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark; the payload that ``--json`` writes."""
    args = parse_args(argv)
    if args.json and args.json.exists() and not args.overwrite:
        raise SystemExit(f"polycom-megatron bench-kernels: {args.json} exists; pass --overwrite "
                         "to replace it or choose another --json")
    if args.json:
        try:
            prepare_output_dir(args.json.parent)
        except ValueError as exc:
            raise SystemExit(f"polycom-megatron bench-kernels: --json: {exc}") from None
    device = resolve_device(args.device, "bench-kernels")
    cuda = device.type == "cuda"
    ops = parse_choices(args.ops, OPS, "ops")
    impls = parse_choices(args.impls, IMPLS, "impls")
    if not cuda and "triton" not in sys.modules:
        # Before anything imports Triton (the environment report does): it reads this once.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows_list = args.rows or (DEFAULT_ROWS if cuda else CPU_ROWS)
    cols_list = args.cols or (DEFAULT_COLS if cuda else CPU_COLS)
    dtype = DTYPES[args.dtype]
    reps = args.reps if args.reps is not None else (100 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    timer = Timer(device, reps, warmup, flush=not args.no_flush)
    command = ["polycom-megatron", "bench-kernels", *(sys.argv[1:] if argv is None else argv)]

    def log(line: str) -> None:
        print(line, flush=True)

    if not cuda and "triton" in impls:
        _interpret_triton_on_cpu()
    env = _environment(device)
    log(f"device {env.get('device_name', device)}  torch {torch.__version__}  "
        f"triton {env.get('triton')}  liger {env.get('liger_kernel')}  timer {timer.method}")
    results, skipped, copies = [], [], []
    for op in ops:
        fns, why = implementations(op, impls, args.order, device)
        for impl, reason in why.items():
            skipped.append(dict(op=op, impl=impl, rows=None, cols=None, reason=reason))
            log(f"{op}: {impl} skipped: {reason}")
        for rows in rows_list:
            for cols in cols_list:
                copies.append(measure_shape(
                    op, rows, cols, dtype, args.order, fns, timer, device, results, skipped, log
                ))
    payload = dict(
        meta=dict(
            command=" ".join(command), argv=list(command), timer=timer.method, reps=reps,
            warmup=warmup, l2_flush=timer.flush_buf is not None, dtype=args.dtype,
            order=args.order, ops=list(ops), impls=list(impls), rows=list(rows_list),
            cols=list(cols_list), eps=EPS,
            bytes_convention="fwd: read x + write y; bwd: read x, dy + write dx; "
            "fwdbwd: both; copy: read + write of one tensor (x); gated ops: x and dx "
            "are [rows, 2 * cols], y and dy [rows, cols]",
            **env,
        ),
        copy=copies,
        results=results,
        skipped=skipped,
    )
    if args.json:
        from polycom_megatron.bench.report import write_json

        log(f"\nwrote {write_json(payload, Path(args.json))}")
    return payload


if __name__ == "__main__":
    sys.exit(main())
