"""``polycom-megatron bench --smoke`` end to end on CPU, in a child process (the CPU
harness patches process-wide CUDA calls, which must not leak into other tests).

Checks the files and their content, never the timings (a shared 2-core machine is noisy).
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from polycom_megatron.bench import throughput as T

ACTIVATIONS = ("swiglu", "gelu", "polyrelu", "polynorm", "polyrelu-glu", "polynorm-glu")
GATED = ("swiglu", "polyrelu-glu", "polynorm-glu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Through the real command router, as a user would call it.
    argv = ["bench", "--smoke", "--kernels", "torch,compile", "--model-kernel", "torch",
            "--out-dir", str(out)]
    subprocess.run([sys.executable, "-m", "polycom_megatron.cli", *argv], check=True, timeout=600)
    return out, json.loads((out / "throughput.json").read_text())


def expected_configs():
    names = set()
    for section in ("mlp", "moe"):
        for a in ACTIVATIONS:
            kernels = ("torch", "compile") if a in T.POLYCOM else (None,)
            names |= {(section, a if k is None else f"{a}[{k}]") for k in kernels}
    for section in ("dense-model", "moe-model"):
        names |= {(section, "swiglu"), (section, "polyrelu[torch]"), (section, "polynorm[torch]"),
                  (section, "polynorm-glu[torch]")}
    return names


def test_json_has_every_configuration(smoke):
    _, payload = smoke
    got = {(c["section"], c["name"]) for c in payload["cases"]}
    assert got == expected_configs()


def test_measured_cases_are_complete(smoke):
    _, payload = smoke
    peak = payload["peak"]["flops_per_s"]
    assert peak > 0
    for c in payload["cases"]:
        if c["unavailable"]:
            # Only PolyCom MoE may be missing (until PolyCom experts exist), and it says why.
            assert c["section"] in ("moe", "moe-model") and c["activation"] in T.POLYCOM, c
            assert c["unavailable"].strip()
            continue
        t = c["tokens_per_s"]
        assert len(c["seconds_per_step"]) == payload["settings"]["rounds"] == 2
        assert 0 < t["min"] <= t["median"] <= t["max"]
        assert c["mfu"] > 0 and c["train_flops_per_token"] > 0 and c["params"] > 0
        assert c["relative_to_swiglu"] > 0
        assert c["memory"]["peak_bytes"] >= c["memory"]["resident_bytes"] >= 0
    for section in ("mlp", "moe", "dense-model", "moe-model"):
        swiglu = [c for c in payload["cases"] if c["section"] == section and c["name"] == "swiglu"]
        assert swiglu[0]["relative_to_swiglu"] == 1.0


def test_matched_widths_and_metadata(smoke):
    _, payload = smoke
    for c in payload["cases"]:
        shape = c["shape"]
        width = shape["moe_ffn_hidden_size"] or shape["ffn_hidden_size"]
        base = 64 if shape["num_experts"] else 128
        # The gated PolyCom forms keep SwiGLU's width, with SwiGLU's parameter count.
        assert width == (base if c["activation"] in GATED else base * 3 // 2)
    for section in ("mlp", "moe", "dense-model", "moe-model"):
        params = {c["activation"]: c["params"] for c in payload["cases"] if c["section"] == section}
        assert abs(params["polynorm-glu"] - params["swiglu"]) <= 4 * 64, (section, params)
    env = payload["environment"]
    for key in ("device", "torch", "megatron_core", "git_commit"):
        assert key in env
    assert payload["command"].startswith("polycom-megatron bench --smoke")
    assert payload["flop_conventions"]["activation_flops_per_element"]["polynorm"] == 14
    assert any("skipped" in n or "preset" in n for n in payload["notes"])


def test_png_written_when_matplotlib_present(smoke):
    out, _ = smoke
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: the chart is skipped by design")
    png = out / "throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
