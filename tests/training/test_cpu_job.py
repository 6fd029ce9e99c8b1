"""train-cpu's flags and the FFN variants of ``polycom_megatron.variants``: each variant's
selecting flags build the job of that variant, with the matching gated linear unit and
Megatron activation function (no training here)."""

import pytest
import torch

from polycom_megatron import variants
from polycom_megatron.training import cpu_resume, cpu_train
from polycom_megatron.training.cpu_job import build_parser, job_from_args


def job_of(*flags: str):
    args = build_parser().parse_args(["--vocab-size", "512", *flags])
    return job_from_args(args, experts_available=True)


@pytest.mark.parametrize("name", variants.NAMES)
def test_each_variants_flags_build_that_variant(name):
    job = job_of(*variants.activation_flags(name), "--num-experts", "0")
    assert job.variant == name
    config = cpu_train.transformer_config(job)
    assert config.gated_linear_unit == (name in variants.GATED)
    if job.polycom is None:  # Megatron's own MLP: its activation function matters
        silu = torch.nn.functional.silu
        assert (config.activation_func is silu) == (name == "swiglu")
    fingerprint = cpu_resume.fingerprint(job)
    assert fingerprint["model"]["variant"] == name
    assert fingerprint["model"]["swiglu"] == (name == "swiglu")
    assert fingerprint["data"] == {"split": "90,10,0"}


def test_matched_widths_come_from_the_variants_table():
    swiglu = 96
    for name in variants.NAMES:
        width = variants.ffn_width(name, swiglu)
        job = job_of(*variants.activation_flags(name), "--ffn-hidden-size", str(width))
        assert job.ffn_hidden_size == width == (swiglu if name in variants.GATED else 144)
