import argparse

import pytest

from polycom_megatron.config import PolyComConfig, add_polycom_args, matched_ffn_hidden_size


def _parse(*argv):
    return add_polycom_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_are_the_papers():
    cfg = PolyComConfig()
    assert (cfg.activation, cfg.order, cfg.eps) == ("polynorm", 3, 1e-6)


def test_flags_round_trip_into_config():
    args = _parse("--polycom-activation", "polyrelu", "--polycom-order", "4",
                  "--polycom-kernel", "torch", "--polycom-coeff-mode", "expert")
    assert PolyComConfig.from_args(args) == PolyComConfig(
        activation="polyrelu", order=4, kernel="torch", coeff_mode="expert"
    )


def test_polycom_off_by_default():
    assert PolyComConfig.from_args(_parse()) is None


@pytest.mark.parametrize("order", [0, -1, 2.5, True])
def test_order_below_one_names_the_flag(order):
    with pytest.raises(ValueError, match="--polycom-order"):
        PolyComConfig(order=order)


@pytest.mark.parametrize(
    "field,value,flag",
    [("activation", "swish", "--polycom-activation"), ("kernel", "cuda", "--polycom-kernel"),
     ("coeff_mode", "token", "--polycom-coeff-mode"), ("eps", 0.0, "--polycom-eps")],
)
def test_bad_values_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        PolyComConfig(**{field: value})


def test_matched_width_is_one_and_a_half_swiglu():
    assert matched_ffn_hidden_size(5504) == 8256  # the paper's dense 1B
    assert matched_ffn_hidden_size(1024) == 1536  # the paper's MoE experts
    assert matched_ffn_hidden_size(5504, multiple_of=128) == 8320
