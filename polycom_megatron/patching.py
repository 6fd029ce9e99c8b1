"""Patches for stock Megatron-LM checkouts: list, apply and check them, plus the hooks the
patched files call.

``polycom-megatron patch list | apply <dir> | check <dir>``. Each supported Megatron-LM
release (megatron-core minor version) has one patch under ``patches/``. A patch only
adds a handful of lines to ``pretrain_gpt.py`` (and ``gpt_builders.py`` up to 0.18): the
lines call the hooks at the bottom of this file, so what PolyCom does to a
Megatron-LM run is written here, once, and tested here, not in five diffs.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from polycom_megatron.cli_types import OneLineErrorParser
from polycom_megatron.config import (
    PolyComConfig,
    activation_flag_conflicts,
    add_polycom_args,
    set_transformer_config,
)

# megatron-core (major, minor) -> the Megatron-LM tag its patch was generated against.
# Patch releases of one minor version share a patch (see patches/README.md).
RELEASES = {
    (0, 15): "core_v0.15.3",
    (0, 16): "core_v0.16.1",
    (0, 17): "core_v0.17.1",
    (0, 18): "core_v0.18.2",
    (0, 19): "core_v0.19.0",
}
# Written into every line a patch adds; its presence means a tree was patched.
MARKER = "polycom_megatron"
PACKAGE_INFO = Path("megatron", "core", "package_info.py")


class PatchError(Exception):
    """A problem the user can fix; its message says how."""


# --- where the patch files are -------------------------------------------------------


def patch_dir() -> Path:
    """``polycom_megatron/patches`` in an installed wheel, ``<repo>/patches`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "patches", here.parent / "patches"):
        if any(candidate.glob("megatron-lm-*.patch")):
            return candidate
    raise PatchError(
        f"No Megatron-LM patches found next to {here} (looked in patches/ inside the package "
        "and at the repository root); reinstall polycom-megatron."
    )


def patch_name(release: tuple) -> str:
    return f"megatron-lm-{release[0]}.{release[1]}.patch"


def patch_path(release: tuple) -> Path:
    return patch_dir() / patch_name(release)


def patched_files(patch: Path) -> list:
    """Paths a unified diff changes (its ``+++ b/...`` lines)."""
    return [line[6:].strip() for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


# --- which release a tree is ---------------------------------------------------------


def parse_release(text: str) -> tuple:
    """"0.16", "0.16.1", "core_v0.16.1", "core_r0.17.0" -> (0, 16)."""
    match = re.fullmatch(r"(?:core_[rv])?(\d+)\.(\d+)(?:\.\d+\S*)?", text.strip())
    if not match:
        raise PatchError(f"Cannot read release {text!r}; write it like 0.16 or core_v0.16.1.")
    return int(match.group(1)), int(match.group(2))


def detect_release(tree: Path) -> tuple:
    """(major, minor, patch) from the tree's ``megatron/core/package_info.py``.

    Read as text, not imported: importing it runs git and pulls in nothing we need.
    """
    tree = Path(tree)
    if not tree.is_dir():
        raise PatchError(f"{tree} is not a directory; give the root of a Megatron-LM checkout.")
    info = tree / PACKAGE_INFO
    if not info.is_file():
        raise PatchError(
            f"{tree} is not a Megatron-LM checkout: {PACKAGE_INFO} is missing. Give the "
            "directory that holds pretrain_gpt.py and megatron/."
        )
    text = info.read_text()
    fields = {}
    for name in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^{name}\s*=\s*(\d+)\s*$", text, re.MULTILINE)
        if not match:
            raise PatchError(f"{info} has no {name} = <number> line; pass --release X.Y.")
        fields[name] = int(match.group(1))
    return fields["MAJOR"], fields["MINOR"], fields["PATCH"]


def supported_list() -> str:
    return ", ".join(f"{major}.{minor}" for major, minor in RELEASES)


def resolve(tree: Path, release: str | None = None) -> tuple:
    """The (major, minor) to patch ``tree`` for, checked against the supported releases."""
    if release is not None:
        key = parse_release(release)
    else:
        key = detect_release(tree)[:2]
    if key not in RELEASES:
        raise PatchError(
            f"Megatron-LM {key[0]}.{key[1]} at {tree} is not supported; patches exist for "
            f"megatron-core {supported_list()}. Check out one of those tags (e.g. "
            f"{RELEASES[max(RELEASES)]}), or use the `polycom-megatron pretrain` launcher, "
            "which needs no patch."
        )
    if not (Path(tree) / "pretrain_gpt.py").is_file():
        raise PatchError(
            f"{tree} has no pretrain_gpt.py: the patches are for a Megatron-LM checkout, "
            "not for the megatron-core package."
        )
    return key


# --- applying ------------------------------------------------------------------------


def _run_tool(tree: Path, patch: Path, *, dry_run: bool, reverse: bool) -> tuple:
    """Apply (or test) a patch with git if present, else GNU patch. Returns (ok, output)."""
    if shutil.which("git"):
        # Stop git from treating an enclosing repository as the one to patch: paths in
        # the patch are relative to the Megatron-LM root, which may sit inside another repo.
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(tree).resolve().parent))
        cmd = ["git", "apply", "--whitespace=nowarn"]
        cmd += ["--check"] if dry_run else []
        cmd += ["-R"] if reverse else []
        cmd += [str(patch)]
    elif shutil.which("patch"):
        env = None
        # --forward: never let patch "helpfully" flip direction when a patch looks
        # reversed; --fuzz=0: exact context, as git apply demands.
        cmd = ["patch", "-p1", "--batch", "--forward", "--fuzz=0", "--silent", "-i", str(patch)]
        cmd += ["--dry-run"] if dry_run else []
        cmd += ["-R"] if reverse else []
    else:
        raise PatchError("Neither git nor patch is installed; install one of them.")
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def state(tree: Path, key: tuple) -> str:
    """"patched", "unpatched" (the patch applies cleanly) or "conflict"."""
    patch = patch_path(key)
    if _run_tool(tree, patch, dry_run=True, reverse=True)[0]:
        return "patched"
    if _run_tool(tree, patch, dry_run=True, reverse=False)[0]:
        return "unpatched"
    return "conflict"


def _conflict_message(tree: Path, key: tuple) -> str:
    patch = patch_path(key)
    touched = [f for f in patched_files(patch) if MARKER in _read(Path(tree) / f)]
    _, output = _run_tool(tree, patch, dry_run=True, reverse=False)
    if touched:
        why = (f"{', '.join(touched)} already mention {MARKER} but do not match {patch.name}: "
               "the tree was patched by hand or by another version of polycom-megatron")
    else:
        why = f"{patch.name} does not apply: those files differ from the release it was made for"
    return f"{why}.\n{output}\nStart from a clean checkout of {RELEASES[key]} (git checkout -- .)."


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def apply(tree: Path, release: str | None = None, dry_run: bool = False) -> str:
    """Patch ``tree``; returns what was done. Refuses patched or modified trees."""
    tree = Path(tree)
    key = resolve(tree, release)
    patch = patch_path(key)
    current = state(tree, key)
    if current == "patched":
        raise PatchError(f"{tree} is already patched ({patch.name}); nothing to do.")
    if current == "conflict":
        raise PatchError(_conflict_message(tree, key))
    if dry_run:
        return f"{patch.name} applies cleanly to {tree} (dry run, nothing changed)."
    ok, output = _run_tool(tree, patch, dry_run=False, reverse=False)
    if not ok or state(tree, key) != "patched":
        raise PatchError(f"Applying {patch.name} to {tree} failed:\n{output}")
    return f"Applied {patch.name} to {tree}: {', '.join(patched_files(patch))}."


def check(tree: Path, release: str | None = None) -> tuple:
    """(is_patched, report) for ``tree``."""
    tree = Path(tree)
    key = resolve(tree, release)
    patch = patch_path(key)
    current = state(tree, key)
    if current == "patched":
        return True, f"{tree}: patched with {patch.name}."
    if current == "unpatched":
        return False, (f"{tree}: not patched; {patch.name} applies cleanly "
                       f"(polycom-megatron patch apply {tree}).")
    return False, f"{tree}: not patched, and {_conflict_message(tree, key)}"


# --- command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="polycom-megatron patch",
        description="Add the --polycom-* flags to a stock Megatron-LM checkout's pretrain_gpt.py.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="supported releases and their patch files")
    for name, help_ in (("apply", "patch a checkout"), ("check", "is a checkout patched?")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("megatron_lm_dir", type=Path, help="root of the Megatron-LM checkout")
        cmd.add_argument("--release", help="override detection, e.g. 0.16 or core_v0.16.1")
    sub.choices["apply"].add_argument(
        "--dry-run", action="store_true", help="only test that the patch applies"
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            folder = patch_dir()
            for key, tag in RELEASES.items():
                print(f"megatron-core {key[0]}.{key[1]}  (made from {tag})  "
                      f"{folder / patch_name(key)}")
            return 0
        if args.command == "apply":
            print(apply(args.megatron_lm_dir, args.release, args.dry_run))
            return 0
        is_patched, report = check(args.megatron_lm_dir, args.release)
        print(report)
        return 0 if is_patched else 1
    except PatchError as error:
        print(f"polycom-megatron patch: {error}", file=sys.stderr)
        return 2


# --- hooks called from the patched Megatron-LM files ---------------------------------


def polycom_args_provider(other=None):
    """Megatron ``extra_args_provider`` adding the ``--polycom-*`` flags, then ``other``'s."""

    def provide(parser):
        parser = add_polycom_args(parser)
        return other(parser) if other is not None else parser

    return provide


def polycom_help(extra_args_provider, argv=None) -> None:
    """On ``-h``/``--help``: print Megatron-LM's help with ``extra_args_provider``'s flags
    (the ``--polycom-*`` group) and exit; otherwise do nothing.

    Needed because Megatron-LM's in-process-restart wrapper parses the command line without
    any extra provider before ``pretrain()`` does, and argparse exits on ``--help`` there,
    so the stock help never lists flags a script adds. Call it before that wrapper.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" not in argv and "--help" not in argv:
        return
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser = add_megatron_arguments(parser)
    parser = extra_args_provider(parser) if extra_args_provider is not None else parser
    _escape_bad_help_strings(parser)
    parser.print_help()
    raise SystemExit(0)


def _escape_bad_help_strings(parser) -> None:
    """Escape a bare ``%`` in help texts argparse cannot format. Megatron-LM 0.18 and 0.19
    ship one (``--moe-paged-stash-buffer-size-factor-cuda``), which makes their stock
    ``--help`` crash with "unsupported format character"."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


def polycom_layer_spec(spec, args, config):
    """The GPT layer/block spec ``gpt_builder`` built, on PolyCom when the flags ask for it.

    Also sets what PolyCom needs in ``config`` (``config.set_transformer_config``):
    bias-activation fusion off (Megatron turns it on by default when linear biases are on),
    and the gated linear unit for ``--polycom-gated``.
    """
    polycom = _polycom_from_args(args)
    if polycom is None:
        return spec
    check_args(args)
    set_transformer_config(config, polycom)
    return _convert(spec, polycom)


def _polycom_from_args(args):
    try:
        return PolyComConfig.from_args(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def polycom_model_config(model_cfg, args) -> None:
    """Megatron-LM 0.19+: make ``model_cfg`` (a GPTModelConfig) build PolyCom layer specs.

    The model is built later, from the config, per pipeline/virtual stage, so the layer
    spec becomes a builder that resolves what Megatron would have used and converts it.
    """
    polycom = _polycom_from_args(args)
    if polycom is None:
        return
    check_args(args)
    set_transformer_config(model_cfg.transformer, polycom)
    base = model_cfg.transformer_layer_spec

    def layer_spec(cfg, vp_stage=None):
        return _convert(_resolve_spec(base, cfg, vp_stage), polycom)

    model_cfg.transformer_layer_spec = layer_spec


def check_args(args) -> None:
    """Refuse Megatron flags that contradict a PolyCom activation, saying what to use."""
    conflicts = activation_flag_conflicts(args, PolyComConfig.from_args(args))
    if conflicts:
        raise SystemExit("\n".join(conflicts))
    if getattr(args, "mtp_num_layers", None):
        raise SystemExit(
            "--mtp-num-layers with --polycom-activation is not supported by the Megatron-LM "
            "patches: Megatron builds the multi-token-prediction layers from its own spec, so "
            "they would silently keep the stock activation. Drop --mtp-num-layers."
        )


def _resolve_spec(base, cfg, vp_stage):
    """What Megatron-LM 0.19's GPTModelBuilder does with ``transformer_layer_spec``."""
    import inspect

    from megatron.core.transformer.spec_utils import ModuleSpec

    if base is None:
        from megatron.training.models.gpt import default_layer_spec

        return default_layer_spec(cfg, vp_stage)
    if callable(base) and not isinstance(base, ModuleSpec):
        if "vp_stage" in inspect.signature(base).parameters:
            return base(cfg, vp_stage=vp_stage)
        return base(cfg)
    return base


def _convert(spec, polycom):
    from polycom_megatron.specs import with_polycom

    import torch.distributed as dist

    from polycom_megatron.specs import stock_mlps

    try:
        converted = with_polycom(spec, polycom)
    except ValueError as exc:
        raise SystemExit(f"--polycom-activation {polycom.activation}: {exc}") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        # So that a training log says the patch took effect.
        print(f"polycom-megatron: {polycom.name} (order {polycom.order}) in place of "
              f"{', '.join(stock_mlps(spec)) or 'no MLP'}", flush=True)
    return converted


if __name__ == "__main__":
    sys.exit(main())
