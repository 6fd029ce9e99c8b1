"""The GPU check: one command, within one time budget, that settles on a CUDA machine what
CPU CI cannot (the Triton kernels compiled, ``bench-kernels``, ``bench``).

    python -m polycom_megatron.bench.gpu_check --out DIR [--wheels .whl] [--budget 480]
    python -m polycom_megatron.bench.gpu_check --out DIR --cpu-rehearsal

``bench/gpu_check.sh`` is the command to run on the GPU machine (README: "GPU check").
The stages run one after another, each in a process session of its own with a time limit
cut to what the budget has left (the later stages' minimum shares kept back), so a hang
or a failure costs that stage and not the run: every stage runs, and ``gpu_check.json``
records each one's status, exit code, time, command and output tail, with the device,
the versions and the commit. Everything lands in one flat folder (the device tool returns
at most 8 files): gpu_check.json, gpu_check.log, pytest_gpu.xml, pytest_ops.xml,
bench_kernels_liger.json, bench_kernels_paper.json, throughput.json and throughput.png.

``--cpu-rehearsal`` runs the very same stages on CPU at stand-in sizes (Triton under its
interpreter, ``--device cpu``, ``bench --smoke``) in the environment that is already
installed; the two install stages and tests/ops (CI runs it anyway) are then skipped, and
say so. CI runs it
(tests/bench/test_gpu_check.py) so that the check cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from polycom_megatron.cli_types import OneLineErrorParser, positive_int

REPO = Path(__file__).resolve().parents[2]
SUMMARY, LOG = "gpu_check.json", "gpu_check.log"
COMMIT_FILE = "COMMIT"  # written into the wheel folder by bench/gpu_check_fetch.sh
SITE = "/tmp/polycom-gpu-check-site"  # where the carried wheels are installed
STAND_IN_VARIABLE = "POLYCOM_GPU_CHECK_STAND_IN"  # tests/gpu/test_kernels_cuda.py reads it
MAX_FILES = 8  # what the device tool brings back from $OUT
TAIL_LINES = 40
COMMAND = "polycom-megatron"  # resolved when a stage starts (see _command)
REHEARSAL_SKIP = "CPU rehearsal: uses the environment already installed"
# Packages the checks import: module -> (distribution, needed on the GPU). Liger only gives
# comparison rows, but a GPU run without them misses what it was for, so they count there.
PACKAGES = {"torch": ("torch", True), "triton": ("triton", True),
            "megatron.core": ("megatron-core", True), "liger_kernel": ("liger-kernel", True),
            "pytest": ("pytest", True), "matplotlib": ("matplotlib", False)}

# Sizes per mode; everything else about a stage is shared. On the GPU: Liger's published
# shape (2048 x 8192 bf16) with every implementation, the paper's widths (dense SwiGLU 5504,
# PolyCom 8256; MoE experts 1024 gated, 1536 plain) at its 8192 tokens per micro-batch,
# and bench at the paper's shapes with 2 layers per model.
KERNEL_IMPLS_NO_COMPILE = "naive,torch,triton,liger,swiglu,swiglu-megatron,swiglu-liger"
PLANS = {
    "gpu": dict(
        tests=["tests/gpu"],
        # Its tensor-parallel test runs gloo ranks through the CPU shim, which refuses to
        # run next to CUDA by design.
        ops_tests=["tests/ops", "--ignore=tests/ops/test_tensor_parallel_ops.py"],
        liger=["--rows", "2048", "--cols", "8192", "--dtype", "bf16"],
        paper=["--rows", "8192", "--cols", "1024,1536,5504,8256", "--dtype", "bf16",
               "--impls", KERNEL_IMPLS_NO_COMPILE],
        bench=["--preset", "paper", "--layers", "2,2", "--rounds", "3", "--warmup", "2",
               "--sample-time", "0.25", "--kernels", "torch,triton"],
    ),
    "cpu": dict(
        tests=["tests/gpu"],
        ops_tests=None,  # all of tests/ops runs in the ordinary CI suite, interpreted
        liger=["--device", "cpu", "--rows", "8", "--cols", "64", "--dtype", "bf16",
               "--reps", "1", "--warmup", "0", "--impls", KERNEL_IMPLS_NO_COMPILE],
        paper=["--device", "cpu", "--rows", "4", "--cols", "40", "--dtype", "bf16",
               "--reps", "1", "--warmup", "0", "--ops", "polynorm,polynorm_glu",
               "--impls", "naive,triton,swiglu-megatron"],
        bench=["--device", "cpu", "--smoke", "--only", "mlp", "--activations",
               "swiglu,polynorm", "--kernels", "triton", "--rounds", "1"],
    ),
}


@dataclass
class Stage:
    name: str
    argv: List[str]
    limit_s: float  # the most this stage may take
    min_s: float  # kept back for it while earlier stages run
    outputs: List[str] = field(default_factory=list)  # files it should write into --out
    skip: Optional[str] = None  # why it does not run in this mode (not a failure)
    refuse: Optional[str] = None  # why it cannot run (a failure)
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    status: str  # passed, failed, timed_out, skipped (by mode), not_run (budget spent)
    command: str
    returncode: Optional[int] = None
    seconds: float = 0.0
    cpu_s: Optional[float] = None  # user + system time of the stage's processes
    limit_s: Optional[float] = None
    reason: Optional[str] = None
    outputs: List[str] = field(default_factory=list)
    missing_outputs: List[str] = field(default_factory=list)
    tests: Optional[dict] = None  # the test stage: counts and failed ids from pytest.xml
    tail: List[str] = field(default_factory=list)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="python -m polycom_megatron.bench.gpu_check",
                           description="The GPU check (or its CPU rehearsal), in one folder.")
    p.add_argument("--out", type=Path, help="folder for every result (flat, empty or new)")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl",
                   help="carried wheels to install first (default .whl in the repository)")
    p.add_argument("--budget", type=positive_int, default=480,
                   help="seconds for all stages together (default 480)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="the same stages on CPU at stand-in sizes, no installs")
    p.add_argument("--commit", help="the commit under test (default: git, else "
                   f"<wheels>/{COMMIT_FILE})")
    p.add_argument("--collect", type=Path, metavar="DIR",
                   help="instead of running: copy a finished check's folder DIR into "
                   "--results-root/<date>-<device>/")
    p.add_argument("--results-root", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the environment stage
    return p.parse_args(argv)


def stages(args, mode: str) -> List[Stage]:
    plan, out, py = PLANS[mode], args.out, sys.executable
    rehearsal = mode == "cpu"
    wheels = sorted(str(w) for w in args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    def pytest(junit, paths):
        argv = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout=150",
                f"--junitxml={out / junit}", *paths]
        if not rehearsal and _importable("xdist"):  # Triton compiles on the host's cores
            argv += ["-n", "8"]
        return argv

    kernels = [COMMAND, "bench-kernels", "--overwrite"]
    return [
        Stage("install-wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                 "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                 SITE, *wheels], 90, 10,
              skip=REHEARSAL_SKIP if rehearsal else None,
              refuse=None if wheels else f"no wheels in {args.wheels}: run "
              "bench/gpu_check_fetch.sh here and carry .whl"),
        Stage("install-package", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-build-isolation", "-e", str(REPO)], 90, 10,
              skip=REHEARSAL_SKIP if rehearsal else None),
        Stage("environment", [py, "-m", "polycom_megatron.bench.gpu_check", "--out", str(out),
                              "--probe", str(out / "environment.json")]
              + (["--cpu-rehearsal"] if rehearsal else []), 60, 10),
        # Two test stages, so that a slow tests/ops cannot take tests/gpu's report with it
        # (pytest writes its XML at the end).
        Stage("cuda-tests", pytest("pytest_gpu.xml", plan["tests"]), 150, 45,
              outputs=["pytest_gpu.xml"], env={STAND_IN_VARIABLE: "1"} if rehearsal else {}),
        Stage("ops-tests", pytest("pytest_ops.xml", plan["ops_tests"] or []), 180, 45,
              outputs=["pytest_ops.xml"], skip=None if plan["ops_tests"] else
              "CPU rehearsal: tests/ops runs in the ordinary CI suite under Triton's interpreter"),
        Stage("bench-kernels-liger", kernels + plan["liger"]
              + ["--json", str(out / "bench_kernels_liger.json")], 150, 45,
              outputs=["bench_kernels_liger.json"]),
        Stage("bench-kernels-paper", kernels + plan["paper"]
              + ["--json", str(out / "bench_kernels_paper.json")], 100, 30,
              outputs=["bench_kernels_paper.json"]),
        Stage("bench", [COMMAND, "bench", *plan["bench"], "--out-dir", str(out), "--overwrite"],
              200, 60, outputs=["throughput.json", "throughput.png"]),
    ]


def _command(argv: List[str]) -> List[str]:
    """``polycom-megatron ...`` as a user runs it: the installed executable beside this
    Python (install-package puts it there), else the same router through ``-m``."""
    if argv[:1] != [COMMAND]:
        return argv
    installed = Path(sys.executable).parent / COMMAND
    head = [str(installed)] if installed.exists() else [sys.executable, "-m",
                                                        "polycom_megatron.cli"]
    return head + argv[1:]


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _run(stage: Stage, limit: float, env: Dict[str, str], log) -> Result:
    """Run one stage in its own session; on timeout the whole session is killed."""
    result = Result(stage.name, "failed", " ".join(stage.argv), limit_s=round(limit, 1))
    tail: deque = deque(maxlen=TAIL_LINES)
    log(f"\n=== {stage.name} (limit {limit:.0f} s): {result.command}")
    start, cpu_before = time.monotonic(), _children_cpu()
    try:
        process = subprocess.Popen(stage.argv, cwd=REPO, env={**env, **stage.env},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", start_new_session=True)
    except OSError as exc:
        result.reason = f"could not start: {exc}"
        log(result.reason)
        return result

    def pump():
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        result.returncode = process.wait(timeout=limit)
        result.status = "passed" if result.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        result.status, result.reason = "timed_out", f"stopped at its {limit:.0f} s limit"
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                result.returncode = process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    result.seconds = round(time.monotonic() - start, 2)
    result.cpu_s = round(_children_cpu() - cpu_before, 2)
    result.tail = list(tail)
    log(f"=== {stage.name}: {result.status} (rc {result.returncode}, {result.seconds:.1f} s)")
    return result


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _commit(args) -> dict:
    """The commit under test: --commit, git (a copied tree may have no .git), the file the
    fetch helper writes beside the wheels."""
    if args.commit:
        return dict(commit=args.commit, source="--commit")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return dict(commit=out.stdout.strip(), source="git", dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    recorded = args.wheels / COMMIT_FILE
    if recorded.is_file():
        lines = recorded.read_text().split()
        return dict(commit=lines[0] if lines else None, source=str(recorded),
                    dirty="dirty" in lines[1:])
    return dict(commit=None, source="unknown: no git and no " + str(recorded))


def _test_counts(junit: Path) -> dict:
    """tests / failures / errors / skipped and the failed test ids, from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError as exc:
        return dict(error=f"unreadable {junit.name}: {exc}")
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}"
                        for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def collect(source: Path, results_root: Path) -> Path:
    """Copy a finished check's folder (e.g. what the device tool brought back) into
    ``<results_root>/<date>-<device>/``, the place results are committed."""
    import re
    import shutil

    summary = json.loads((source / SUMMARY).read_text())
    date = summary["started_utc"][:10].replace("-", "")
    device = re.sub(r"[^a-z0-9]+", "-", (summary.get("device_name") or "unknown").lower())
    target = results_root / f"{date}-{device.strip('-')}"
    if target.exists():
        raise SystemExit(f"gpu_check: {target} exists; move it away or collect elsewhere "
                         "with --results-root")
    target.mkdir(parents=True)
    for name in summary["files"]:
        shutil.copyfile(source / name, target / name)
    return target


def probe(path: Path, rehearsal: bool) -> int:
    """The environment stage: versions and device as the later stages will see them; fails
    when a package the check needs does not import or megatron-core is unsupported."""
    import importlib
    import importlib.metadata

    info: dict = dict(python=platform.python_version(), executable=sys.executable,
                      packages={}, missing=[])
    for name, (distribution, needed) in PACKAGES.items():
        try:
            module = importlib.import_module(name)
            try:
                version = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                version = getattr(module, "__version__", None)
            info["packages"][name] = dict(version=version, file=getattr(module, "__file__", None))
        except Exception as exc:  # a broken install is as missing as an absent one
            info["packages"][name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            if needed and not (rehearsal and name == "liger_kernel"):
                info["missing"].append(name)
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        from polycom_megatron.bench.report import device_name

        info["device_name"] = device_name(torch.device("cpu"))
    info["megatron_core_supported"] = None
    if "megatron.core" not in info["missing"]:
        from polycom_megatron import compat

        try:
            compat.check_supported()
            info["megatron_core_supported"] = True
        except RuntimeError as exc:
            info["megatron_core_supported"] = False
            info["missing"].append(f"megatron.core ({exc})")
    if not rehearsal and not info["cuda_available"]:
        info["missing"].append("a CUDA device (torch.cuda.is_available() is False)")
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    if info["missing"]:
        print("missing: " + "; ".join(info["missing"]), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe(args.probe, args.cpu_rehearsal)
    if args.collect:
        print(f"copied to {collect(args.collect, args.results_root)}")
        return 0
    if args.out is None:
        raise SystemExit("gpu_check: --out DIR is required (or --collect DIR)")
    mode = "cpu" if args.cpu_rehearsal else "gpu"
    out = args.out.resolve()
    args.out = out
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.iterdir()]
    if stale:
        raise SystemExit(f"gpu_check: --out {out} is not empty ({', '.join(sorted(stale)[:5])}); "
                         "give an empty or new folder")
    log_file = open(out / LOG, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The carried wheels and the source tree come first, whether or not the editable
    # install works; the rehearsal keeps the environment it was given.
    if mode == "gpu":
        paths = [SITE, str(REPO), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    else:
        env.setdefault("TRITON_INTERPRET", "1")
    plan = stages(args, mode)
    results: List[Result] = []
    for i, stage in enumerate(plan):
        stage.argv = _command(stage.argv)
        if stage.skip or stage.refuse:
            results.append(Result(stage.name, "skipped" if stage.skip else "failed",
                                  " ".join(stage.argv), reason=stage.skip or stage.refuse))
            log(f"\n=== {stage.name}: {results[-1].status} ({results[-1].reason})")
            continue
        left = args.budget - (time.monotonic() - clock)
        kept_back = sum(s.min_s for s in plan[i + 1:] if not s.skip)
        # Its own share at least, else what the later stages' shares leave over.
        limit = min(stage.limit_s, max(stage.min_s, left - kept_back), left)
        if limit < 5:
            results.append(Result(stage.name, "not_run", " ".join(stage.argv),
                                  reason=f"budget spent ({left:.0f} s left of {args.budget})"))
            log(f"\n=== {stage.name}: skipped, budget spent")
            continue
        result = _run(stage, limit, env, log)
        result.outputs = [name for name in stage.outputs if (out / name).is_file()]
        result.missing_outputs = [name for name in stage.outputs if name not in result.outputs]
        junit = [name for name in result.outputs if name.endswith(".xml")]
        if junit:
            result.tests = _test_counts(out / junit[0])
        if result.status == "passed" and result.missing_outputs:
            result.status = "failed"
            result.reason = "did not write " + ", ".join(result.missing_outputs)
        results.append(result)

    summary = dict(
        check="polycom-megatron GPU check" + (" (CPU rehearsal)" if mode == "cpu" else ""),
        mode=mode,
        command=" ".join([Path(sys.executable).name, "-m", "polycom_megatron.bench.gpu_check",
                          *(sys.argv[1:] if argv is None else argv)]),
        started_utc=started.isoformat(timespec="seconds"),
        budget_s=args.budget,
        wall_s=round(time.monotonic() - clock, 1),
        git=_commit(args),
        host=dict(platform=platform.platform(), cpus=os.cpu_count()),
        stages=[asdict(r) for r in results],
    )
    env_file = out / "environment.json"
    if env_file.is_file():  # folded in here: the files that come back are counted
        summary["environment"] = json.loads(env_file.read_text())
        env_file.unlink()
    packages = summary.get("environment", {}).get("packages", {})
    summary["device_name"] = summary.get("environment", {}).get("device_name")
    summary["versions"] = {name: info.get("version") for name, info in packages.items()}
    summary["passed"] = all(r.status in ("passed", "skipped") for r in results)
    log_file.close()
    files = sorted(p.name for p in out.iterdir()) + [SUMMARY]
    summary["files"] = files
    if len(files) > MAX_FILES or any((out / f).is_dir() for f in files[:-1]):
        summary["passed"] = False
        summary["files_problem"] = f"more than {MAX_FILES} files or a folder in {out}"
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(r.name) for r in results)
    print(f"\nGPU check {'(CPU rehearsal) ' if mode == 'cpu' else ''}on "
          f"{summary['device_name']}, commit {summary['git']['commit']}:")
    for r in results:
        print(f"  {r.name:<{width}}  {r.status:<9} {r.seconds:7.1f} s  {r.reason or ''}")
    print(f"{'passed' if summary['passed'] else 'FAILED'} in {summary['wall_s']} s; "
          f"results in {out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
