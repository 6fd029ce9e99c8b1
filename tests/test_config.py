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


def test_gated_form_and_bias_flags_round_trip():
    assert (PolyComConfig().gated, PolyComConfig().bias) == (False, True)
    args = _parse("--polycom-activation", "polynorm", "--polycom-gated", "--polycom-order", "2",
                  "--polycom-no-bias")
    config = PolyComConfig.from_args(args)
    assert config == PolyComConfig(activation="polynorm", order=2, gated=True, bias=False)
    assert config.name == "polynorm-glu" and PolyComConfig(activation="polyrelu").name == "polyrelu"


@pytest.mark.parametrize("flag", ["--polycom-gated", "--polycom-no-bias"])
def test_gated_and_bias_flags_need_an_activation(flag):
    with pytest.raises(ValueError, match=f"{flag} needs a PolyCom activation"):
        PolyComConfig.from_args(_parse(flag))


@pytest.mark.parametrize("field", ["gated", "bias"])
def test_gated_and_bias_must_be_booleans(field):
    with pytest.raises(ValueError, match=f"PolyCom {field} must be True or False"):
        PolyComConfig(**{field: 1})


def test_gated_width_is_swiglus():
    assert matched_ffn_hidden_size(5504, gated=True) == 5504
    assert matched_ffn_hidden_size(1024, gated=True) == 1024
    assert matched_ffn_hidden_size(5500, multiple_of=128, gated=True) == 5504


def test_gated_unit_conflict_names_the_gated_flag():
    from polycom_megatron.config import gated_unit_conflict

    message = gated_unit_conflict("--swiglu", "polynorm", 5504, gated=True)
    assert "--polycom-gated" in message and "Drop --swiglu" in message and "1.5x" not in message
    plain = gated_unit_conflict("--swiglu", "polynorm", 5504)
    assert "8256 (1.5x 5504)" in plain and "--polycom-gated" in plain
