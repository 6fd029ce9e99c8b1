"""The ``polycom-megatron`` command: one entry point, one module per subcommand.

Each subcommand is a module with ``main(argv) -> int`` (or names ``module:function``);
this file only routes to it, so adding a subcommand never touches another one's code. It
also keeps the promise every subcommand makes: exit status 0 on success, and on failure a
non-zero status with one line on stderr, never a traceback (``POLYCOM_DEBUG=1`` shows it);
Ctrl-C is one line and status 130.
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "pretrain": ("polycom_megatron.training.pretrain", "train a GPT with Megatron (GPU/cluster)"),
    "train-cpu": ("polycom_megatron.training.cpu_loop", "the embedded end-to-end run on CPU ranks"),
    "data": ("polycom_megatron.data.cli", "tokenizer and indexed-dataset preparation"),
    "bench": ("polycom_megatron.bench.throughput", "tokens/s: PolyCom vs SwiGLU, layer and model"),
    "bench-kernels": ("polycom_megatron.bench.kernels", "fused-kernel timings vs references"),
    "patch": ("polycom_megatron.patching", "apply/check the Megatron-LM patches"),
    "export-hf": ("polycom_megatron.hf.cli:export_main", "Megatron checkpoint -> transformers model"),
    "import-hf": ("polycom_megatron.hf.cli:import_main", "transformers model -> Megatron checkpoint"),
    "perplexity": ("polycom_megatron.hf.perplexity", "perplexity of an exported model on text/data"),
    "compare": ("polycom_megatron.experiments.cli", "PolyCom vs SwiGLU twins over seeds, or from logs"),
}
DEBUG_VARIABLE = "POLYCOM_DEBUG"
# Optional packages (pyproject.toml's extras) a command may need: package -> extra.
OPTIONAL_PACKAGES = {"transformers": "hf", "safetensors": "hf", "google": "hf",
                     "matplotlib": "bench", "tensorboard": "experiments", "triton": "triton"}
# What a shell reports for a process ended by SIGINT (128 + 2).
INTERRUPTED = 130


def _usage() -> str:
    lines = ["usage: polycom-megatron <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'polycom-megatron <command> --help' for a command's options."]
    return "\n".join(lines)


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exit_status(code) -> int:
    """What ``sys.exit(code)`` would exit with; a message is printed as one line."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run(name: str, argv) -> int:
    """Run subcommand ``name`` with ``argv``; its exit status (see the module docstring)."""
    prog = f"polycom-megatron {name}"
    try:
        module_name, _, function = SUBCOMMANDS[name][0].partition(":")
        entry = getattr(importlib.import_module(module_name), function or "main")
        status = entry(list(argv))
        if status is not None and not isinstance(status, int):
            raise TypeError(f"{SUBCOMMANDS[name][0]} returned {type(status).__name__}, "
                            "not an exit status")
        return status or 0
    except SystemExit as exc:  # argparse and the commands' own one-line refusals
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`: the reader left, nothing to say
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_PACKAGES.get((exc.name or "").split(".")[0])
        if extra is None or _debug():
            raise
        print(f"{prog}: error: needs the optional package {exc.name}, which is not installed: "
              f"pip install 'polycom-megatron[{extra}]'", file=sys.stderr)
        return 1
    except Exception as exc:
        if _debug():
            raise
        print(f"{prog}: error: {_one_line(exc)} (unexpected: rerun with {DEBUG_VARIABLE}=1 "
              "for the traceback, and please report it)", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"polycom-megatron: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run(name, rest)


if __name__ == "__main__":
    sys.exit(main())
