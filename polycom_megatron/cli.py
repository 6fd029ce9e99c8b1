"""The ``polycom-megatron`` command: one entry point, one module per subcommand.

Each subcommand is a module with ``main(argv) -> int`` (or names ``module:function``);
this file only routes to it, so adding a subcommand never touches another one's code.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "pretrain": ("polycom_megatron.training.pretrain", "train a GPT with Megatron (GPU/cluster)"),
    "train-cpu": ("polycom_megatron.training.cpu_loop", "the embedded end-to-end run on CPU ranks"),
    "data": ("polycom_megatron.training.data", "tokenizer and indexed-dataset preparation"),
    "bench": ("polycom_megatron.bench.throughput", "tokens/s: PolyCom vs SwiGLU, layer and model"),
    "bench-kernels": ("polycom_megatron.bench.kernels", "fused-kernel timings vs references"),
    "patch": ("polycom_megatron.patching", "apply/check the Megatron-LM patches"),
    "export-hf": ("polycom_megatron.hf.cli:export_main", "Megatron checkpoint -> transformers model"),
    "import-hf": ("polycom_megatron.hf.cli:import_main", "transformers model -> Megatron checkpoint"),
    "perplexity": ("polycom_megatron.hf.perplexity", "perplexity of an exported model on text/data"),
}


def _usage() -> str:
    lines = ["usage: polycom-megatron <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'polycom-megatron <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"polycom-megatron: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
