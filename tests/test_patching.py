"""polycom_megatron.patching: release detection, the shipped patch files, apply/check, and
the hooks the patched Megatron-LM files call.

No Megatron-LM code lives in this repository. Apply/check run on trees rebuilt from each
patch's own pre-image (its context and removed lines, at the line numbers the patch names),
so git apply and patch meet exactly the text they would meet in the release. The patches
were validated against the real release trees as recorded in patches/README.md; set
POLYCOM_MEGATRON_LM_TREES to a folder of Megatron-LM checkouts to repeat that here.
"""

import argparse
import dataclasses
import functools
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import megatron_lm
from polycom_megatron import patching
from polycom_megatron.specs import stock_mlps

HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
EXPECTED_FILES = {
    (0, 15): {"gpt_builders.py", "pretrain_gpt.py"},
    (0, 16): {"gpt_builders.py", "pretrain_gpt.py"},
    (0, 17): {"gpt_builders.py", "pretrain_gpt.py"},
    (0, 18): {"gpt_builders.py", "pretrain_gpt.py"},
    (0, 19): {"pretrain_gpt.py"},
}
# What each patched file must call, per release.
HOOKS = {"pretrain_gpt.py": ["polycom_args_provider"], "gpt_builders.py": ["polycom_layer_spec"]}


def parse_patch(path):
    """{file: [(old_start, old_lines, new_lines, (old_count, new_count))]} of a git diff."""
    files, hunks = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("+++ b/"):
            hunks = files.setdefault(line[6:], [])
        elif line.startswith(("diff --git", "index ", "--- a/")):
            continue
        elif (match := HUNK.match(line)):
            counts = (int(match.group(2) or 1), int(match.group(4) or 1))
            hunks.append((int(match.group(1)), [], [], counts))
        elif hunks and line[:1] in (" ", "-", "+"):
            _, old, new, _ = hunks[-1]
            if line[0] in (" ", "-"):
                old.append(line[1:])
            if line[0] in (" ", "+"):
                new.append(line[1:])
    return files


def pre_image(tree: Path, patch: Path, version=(0, 16, 1)):
    """Write the files a patch expects (its old lines at their line numbers, filler
    elsewhere) plus a package_info.py, so the patch applies exactly as to the release."""
    for name, hunks in parse_patch(patch).items():
        lines = []
        for start, old, _, _ in hunks:
            lines += [f"# filler {i}" for i in range(len(lines), start - 1)]
            lines += old
        # No trailing filler: a hunk with short trailing context sits at the end of its
        # file, and patch (with --fuzz=0) insists on finding it there.
        (tree / name).write_text("\n".join(lines) + "\n")
    write_package_info(tree, *version)


def write_package_info(tree: Path, major, minor, patch=0):
    info = tree / patching.PACKAGE_INFO
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")


# --- release detection ---------------------------------------------------------------


def test_detects_release_from_package_info(tmp_path):
    write_package_info(tmp_path, 0, 17, 1)
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert patching.detect_release(tmp_path) == (0, 17, 1)
    assert patching.resolve(tmp_path) == (0, 17)
    assert patching.resolve(tmp_path, release="core_v0.16.1") == (0, 16)


@pytest.mark.parametrize("text, expected", [("0.16", (0, 16)), ("0.19.1", (0, 19)),
                                            ("core_v0.15.3", (0, 15)), ("core_r0.17.0", (0, 17))])
def test_parse_release(text, expected):
    assert patching.parse_release(text) == expected


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda t: None, "megatron/core/package_info.py is missing"),
        (lambda t: write_package_info(t, 0, 14), "0.14 at"),
        (lambda t: write_package_info(t, 0, 20), "patches exist for megatron-core 0.15, 0.16"),
        (lambda t: write_package_info(t, 0, 16), "has no pretrain_gpt.py"),
        (lambda t: (write_package_info(t, 0, 16),
                    (t / patching.PACKAGE_INFO).write_text("MAJOR = 0\n")), "no MINOR"),
    ],
)
def test_refuses_trees_it_cannot_patch(tmp_path, capsys, setup, message):
    setup(tmp_path)
    assert patching.main(["check", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_release_override_and_missing_directory(tmp_path, capsys):
    assert patching.main(["apply", str(tmp_path), "--release", "sixteen"]) == 2
    assert "write it like 0.16" in capsys.readouterr().err
    assert patching.main(["check", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# --- the shipped patch files -----------------------------------------------------------


def test_every_release_has_exactly_one_patch(capsys):
    shipped = {p.name for p in patching.patch_dir().glob("*.patch")}
    assert shipped == {patching.patch_name(key) for key in patching.RELEASES}
    assert patching.main(["list"]) == 0
    listed = capsys.readouterr().out
    for key, tag in patching.RELEASES.items():
        assert patching.patch_name(key) in listed and tag in listed


@pytest.mark.parametrize("key", sorted(patching.RELEASES))
def test_patch_is_a_wellformed_minimal_diff_calling_our_hooks(key):
    path = patching.patch_path(key)
    files = parse_patch(path)
    assert set(files) == EXPECTED_FILES[key] == set(patching.patched_files(path))
    text = path.read_text()
    added = [l[1:] for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l[1:] for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
    # Hunk headers agree with their bodies (a hand-edited patch often breaks this).
    for hunks in files.values():
        for _, old, new, (old_count, new_count) in hunks:
            assert (len(old), len(new)) == (old_count, new_count)
    # Minimal: only Megatron's extra_args_provider line is replaced; everything else is added.
    assert [r.strip() for r in removed] == [
        "extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,"]
    assert len(added) <= 10
    hooks = {name: list(HOOKS[name]) for name in files}
    if key >= (0, 19):
        hooks["pretrain_gpt.py"].append("polycom_model_config")
    for name, names in hooks.items():
        new_text = "\n".join(line for hunk in files[name] for line in hunk[2])
        for hook in names:
            assert f"from polycom_megatron.patching import {hook}" in new_text
            assert f"{hook}(" in new_text
            assert callable(getattr(patching, hook))


# --- apply / check on the patch's own pre-image ---------------------------------------


@pytest.fixture(params=["git", "patch"])
def tool(request, monkeypatch):
    """Run apply/check once with git and once with GNU patch (the fallback)."""
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    if request.param == "patch":
        real_which = shutil.which
        monkeypatch.setattr(patching.shutil, "which",
                            lambda name: None if name == "git" else real_which(name))
    return request.param


@pytest.mark.parametrize("key", sorted(patching.RELEASES))
def test_apply_check_and_refusals(tmp_path, capsys, tool, key):
    patch = patching.patch_path(key)
    pre_image(tmp_path, patch, version=(*key, 9))
    before = {name: (tmp_path / name).read_text() for name in patching.patched_files(patch)}

    assert patching.main(["check", str(tmp_path)]) == 1
    assert "not patched; megatron-lm-" in capsys.readouterr().out
    assert patching.main(["apply", str(tmp_path), "--dry-run"]) == 0
    assert {n: (tmp_path / n).read_text() for n in before} == before  # dry run wrote nothing

    assert patching.main(["apply", str(tmp_path)]) == 0
    assert "Applied" in capsys.readouterr().out
    for name, hunks in parse_patch(patch).items():
        text = (tmp_path / name).read_text()
        for _, _, new, _ in hunks:
            assert "\n".join(new) in text
    assert patching.main(["check", str(tmp_path)]) == 0
    assert "patched with" in capsys.readouterr().out
    assert patching.main(["apply", str(tmp_path)]) == 2
    assert "already patched" in capsys.readouterr().err


def test_refuses_a_modified_tree_and_leaves_it_untouched(tmp_path, capsys):
    patch = patching.patch_path((0, 16))
    pre_image(tmp_path, patch)
    target = tmp_path / "pretrain_gpt.py"
    edited = target.read_text().replace("from model_provider import model_provider",
                                        "from my_provider import model_provider")
    target.write_text(edited)
    builders = (tmp_path / "gpt_builders.py").read_text()
    assert patching.main(["apply", str(tmp_path)]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert target.read_text() == edited and (tmp_path / "gpt_builders.py").read_text() == builders

    # A tree patched by hand (or by another version) says so instead.
    target.write_text(edited + "from polycom_megatron.patching import polycom_args_provider\n")
    assert patching.main(["check", str(tmp_path)]) == 1
    assert "already mention polycom_megatron" in capsys.readouterr().out


@megatron_lm.needs_trees
def test_real_release_trees(tmp_path):
    """Each patch applies to its release, and the patched pretrain_gpt.py --help lists the
    --polycom-* flags (the stock one exits in Megatron's in-process-restart wrapper first)."""
    for tree in megatron_lm.trees():
        key = patching.resolve(tree)
        copy = tmp_path / tree.name
        for name in [*patching.patched_files(patching.patch_path(key)), str(patching.PACKAGE_INFO)]:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tree / name, copy / name)
        assert patching.state(copy, key) == "unpatched", tree
        patching.apply(copy)
        assert patching.state(copy, key) == "patched", tree
        # The patched files come first (the script's folder), the rest from the tree.
        shown = megatron_lm.run_python(tree, [copy / "pretrain_gpt.py", "--help"], cwd=tmp_path)
        assert shown.returncode == 0, (tree, shown.stderr[-3000:])
        for flag in ("--polycom-activation", "--polycom-order", "--polycom-eps",
                     "--polycom-kernel", "--polycom-coeff-mode", "--num-layers"):
            assert flag in shown.stdout, (tree, flag)


def _patched_copy(tree: Path, root: Path) -> Path:
    """A patched copy of ``tree``: the patched files copied, everything else linked."""
    copy = root / tree.name
    copy.mkdir()
    key = patching.resolve(tree)
    patched = set(patching.patched_files(patching.patch_path(key)))
    for entry in tree.iterdir():
        if entry.name in patched:
            shutil.copy(entry, copy / entry.name)
        else:
            (copy / entry.name).symlink_to(entry)
    patching.apply(copy)
    return copy


# Layer 0 dense, layer 1 MoE (4 experts top-2, a shared expert), one rank: PolyComMLP,
# the per-expert loop and the shared expert, all through Megatron-LM's own pretrain().
SMOKE_GATED = [
    "--polycom-activation", "polynorm", "--polycom-gated", "--num-experts", "4",
    "--moe-layer-freq", "[0,1]", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96",
    "--moe-shared-expert-intermediate-size", "64", "--moe-token-dispatcher-type", "allgather",
]
SMOKE_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+)")


@megatron_lm.needs_trees
def test_patched_trees_train_the_gated_form(tmp_path, monkeypatch):
    """Each release's patched pretrain_gpt.py (run by patches/smoke_cpu.py, Megatron-LM's
    own loop on mock data) trains PolyNorm-GLU dense and MoE layers for 4 iterations."""
    import math
    import sys

    # Megatron builds its dataset helpers with the python3 on PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    smoke = Path(__file__).resolve().parents[1] / "patches" / "smoke_cpu.py"
    for tree in megatron_lm.trees():
        copy = _patched_copy(tree, tmp_path)
        done = megatron_lm.run_python(copy, [smoke, *SMOKE_GATED], cwd=copy)
        assert done.returncode == 0, (tree, done.stdout[-3000:], done.stderr[-3000:])
        hook = re.search(r"polycom-megatron: polynorm-glu \(order 3\) in place of (.*)", done.stdout)
        assert hook and "MLP, SequentialMLP" in hook.group(1), (tree, done.stdout[-3000:])
        losses = {int(i): float(v) for i, v in SMOKE_LOSS.findall(done.stdout)}
        assert sorted(losses) == [1, 2, 3, 4], (tree, losses)
        # Mock tokens are near uniform over 4096 ids: the loss stays near ln(4096) = 8.32.
        assert all(abs(v - math.log(4096)) < 0.5 for v in losses.values()), (tree, losses)


# --- the hooks, with the installed megatron-core ----------------------------------------


def megatron_args(*argv):
    parser = patching.polycom_args_provider()(argparse.ArgumentParser())
    args = parser.parse_args(list(argv))
    for name in ("swiglu", "quick_geglu", "squared_relu"):
        setattr(args, name, False)
    args.mtp_num_layers, args.ffn_hidden_size = None, 192
    return args


def transformer_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                             ffn_hidden_size=192, add_bias_linear=True,
                             bias_activation_fusion=True, **overrides)


def local_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()


def test_help_hook_does_nothing_without_a_help_flag():
    # Returns before importing megatron.training, which is not installed here.
    assert patching.polycom_help(patching.polycom_args_provider(), ["--num-layers", "2"]) is None


def test_help_strings_argparse_cannot_format_are_escaped():
    parser = argparse.ArgumentParser()
    parser.add_argument("--factor", help="stash 10% more (default: %(default)s)")
    parser.add_argument("--fine", default=3, help="a plain one (default: %(default)s)")
    with pytest.raises(ValueError):
        parser.format_help()
    patching._escape_bad_help_strings(parser)
    text = " ".join(parser.format_help().split())
    assert "stash 10% more (default: %(default)s)" in text  # escaped whole, not formatted
    assert "a plain one (default: 3)" in text


def test_args_provider_adds_flags_and_chains_the_other_provider():
    seen = []

    def other(parser):
        seen.append(parser)
        parser.add_argument("--other-flag", type=int, default=3)
        return parser

    parser = patching.polycom_args_provider(other)(argparse.ArgumentParser())
    args = parser.parse_args(["--polycom-activation", "polyrelu", "--polycom-order", "2"])
    assert (args.polycom_activation, args.polycom_order, args.other_flag) == ("polyrelu", 2, 3)
    assert seen == [parser]
    with pytest.raises(SystemExit):
        parser.parse_args(["--polycom-activation", "bogus"])


def test_layer_spec_hook_is_a_no_op_when_polycom_is_off():
    spec, config = local_layer_spec(), transformer_config()
    assert patching.polycom_layer_spec(spec, megatron_args(), config) is spec
    assert config.bias_activation_fusion is True


def test_layer_spec_hook_converts_the_mlp_and_turns_off_bias_fusion():
    from polycom_megatron.layers.mlp import PolyComMLP

    spec, config = local_layer_spec(), transformer_config()
    converted = patching.polycom_layer_spec(
        spec, megatron_args("--polycom-activation", "polynorm"), config)
    assert converted.submodules.mlp.module is PolyComMLP
    assert stock_mlps(spec) == ["MLP"]
    assert stock_mlps(converted) == []
    assert config.bias_activation_fusion is False


def test_layer_spec_hook_sets_the_gated_unit_of_the_gated_form():
    spec = local_layer_spec()
    for flags, gated in (((), False), (("--polycom-gated",), True)):
        config = transformer_config(gated_linear_unit=not gated)
        converted = patching.polycom_layer_spec(
            spec, megatron_args("--polycom-activation", "polynorm", *flags), config)
        polycom = converted.submodules.mlp.submodules.activation_func.keywords["polycom"]
        assert (polycom.gated, config.gated_linear_unit) == (gated, gated)
        assert config.bias_activation_fusion is False
    args = megatron_args("--polycom-activation", "polynorm", "--polycom-gated")
    args.swiglu = True
    with pytest.raises(SystemExit, match="--polycom-gated: both choose the gate's activation"):
        patching.polycom_layer_spec(spec, args, transformer_config())
    with pytest.raises(SystemExit, match="--polycom-gated needs a PolyCom activation"):
        patching.polycom_layer_spec(spec, megatron_args("--polycom-gated"), transformer_config())


@pytest.mark.parametrize(
    "flag, message",
    [("swiglu", "Drop --swiglu and use --ffn-hidden-size 288 (1.5x 192)"),
     ("quick_geglu", "Drop --quick-geglu"),
     ("squared_relu", "--squared-relu and --polycom-activation polynorm"),
     ("mtp_num_layers", "--mtp-num-layers")],
)
def test_layer_spec_hook_refuses_contradicting_flags(flag, message):
    args = megatron_args("--polycom-activation", "polynorm")
    setattr(args, flag, 1 if flag == "mtp_num_layers" else True)
    with pytest.raises(SystemExit, match=re.escape(message)):
        patching.polycom_layer_spec(local_layer_spec(), args, transformer_config())


def test_specs_it_cannot_convert_fail_loudly():
    """megatron-core 0.18+ writes dense MLPs as functools.partial builders; a converter that
    does not know a shape must stop the run, not train the stock activation."""
    from megatron.core.transformer.mlp import MLP

    spec = local_layer_spec()
    builder = functools.partial(MLP, submodules=spec.submodules.mlp.submodules)
    unknown = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=builder))
    assert stock_mlps(unknown) == ["MLP"]
    with pytest.raises(SystemExit, match="were not converted to PolyCom: MLP"):
        patching.polycom_layer_spec(unknown, megatron_args("--polycom-activation", "polynorm"),
                                    transformer_config())


def test_model_config_hook_for_megatron_lm_019():
    """Megatron-LM 0.19 builds from a GPTModelConfig (Python 3.12 only, not importable here):
    the hook reads .transformer and .transformer_layer_spec, so a namespace carries them."""
    from polycom_megatron.layers.mlp import PolyComMLP

    off = SimpleNamespace(transformer=transformer_config(), transformer_layer_spec=None)
    patching.polycom_model_config(off, megatron_args())
    assert off.transformer_layer_spec is None and off.transformer.bias_activation_fusion

    calls = []

    def user_spec(cfg, vp_stage=None):
        calls.append(vp_stage)
        return local_layer_spec()

    cfg = SimpleNamespace(transformer=transformer_config(), transformer_layer_spec=user_spec)
    patching.polycom_model_config(cfg, megatron_args("--polycom-activation", "polyrelu"))
    assert cfg.transformer.bias_activation_fusion is False
    built = cfg.transformer_layer_spec(cfg, vp_stage=1)
    assert calls == [1] and built.submodules.mlp.module is PolyComMLP
    assert built.submodules.mlp.submodules.activation_func.keywords["polycom"].activation == "polyrelu"

    fixed = SimpleNamespace(transformer=transformer_config(), transformer_layer_spec=local_layer_spec())
    patching.polycom_model_config(fixed, megatron_args("--polycom-activation", "polynorm"))
    assert fixed.transformer_layer_spec(fixed).submodules.mlp.module is PolyComMLP

    gated = SimpleNamespace(transformer=transformer_config(), transformer_layer_spec=local_layer_spec())
    patching.polycom_model_config(gated, megatron_args("--polycom-activation", "polynorm", "--polycom-gated"))
    assert gated.transformer.gated_linear_unit is True
