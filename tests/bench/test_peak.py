"""The peak FLOP/s behind MFU (peak.py) and what the report does when a configuration
beats it: the peak was under-measured, so no MFU above 100% is ever reported."""

import torch

from polycom_megatron.bench import cases as C
from polycom_megatron.bench import report
from polycom_megatron.bench import throughput as T
from polycom_megatron.bench.peak import PeakMeter, mfu_or_none


def test_the_peak_is_the_best_sample_over_every_measurement():
    meter = PeakMeter(torch.device("cpu"), torch.float32, 32)
    firsts = [meter.measure(3, "start"), meter.measure(2, "after round 1")]
    result = meter.result()
    assert result["samples"] == 5 and len(meter.samples) == 5
    assert [m["when"] for m in result["measurements"]] == ["start", "after round 1"]
    assert [m["best_flops_per_s"] for m in result["measurements"]] == firsts
    assert result["flops_per_s"] == max(meter.samples) == max(firsts) > 0
    assert result["median_flops_per_s"] <= result["flops_per_s"]
    assert result["matmul"] == "[32x32] @ [32x32]" and result["dtype"] == "float32"


def test_mfu_above_one_is_withheld():
    assert mfu_or_none(0.25) == 0.25 and mfu_or_none(1.0) == 1.0
    assert mfu_or_none(1.0001) is None


def test_a_configuration_faster_than_the_peak_gets_no_mfu_and_a_note(tmp_path):
    settings = T.resolve_settings(T.parse_args(["--smoke", "--out-dir", str(tmp_path)]))
    case = C.layer_cases("mlp", settings)[0]
    meter = PeakMeter(settings.device, settings.dtype, 32)
    meter.measure(1, "start")
    peak = meter.result()
    # A step time at which the case would run at 10x the measured peak.
    flops_per_step = case.flops_per_token * case.tokens_per_step
    case.seconds = [flops_per_step / (10 * peak["flops_per_s"])] * 2
    payload = report.build_payload([case], settings, peak, "memory", [], wall_s=0.0)
    entry = payload["cases"][0]
    assert entry["mfu"] is None
    assert abs(entry["mfu_over_peak"] - 10) < 1e-6
    assert any("peak was under-measured" in note and "mlp swiglu" in note
               for note in payload["notes"])
    assert "> peak" in report.format_table(payload)
