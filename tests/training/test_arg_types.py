"""Numbers on the command line are checked while parsing: every bad value is one line."""

import argparse

import pytest

from polycom_megatron.training.arg_types import (
    OneLineErrorParser,
    integer,
    non_negative_real,
    positive_int,
    positive_real,
    real,
)


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (positive_real, "nan", "must be a positive finite number, got nan"),
        (positive_real, "inf", "must be a positive finite number, got inf"),
        (positive_real, "0", "must be a positive finite number, got 0"),
        (positive_real, "-1e-3", "must be a positive finite number"),
        (non_negative_real, "-1", "must be a finite number >= 0, got -1"),
        (real(0.0, 1.0, high_open=True), "1", "must be a number in [0, 1), got 1"),
        (positive_int, "0", "must be at least 1, got 0"),
        (positive_int, "2.5", "expected a whole number, got '2.5'"),
        (integer(0, 9), "10", "must be between 0 and 9, got 10"),
        (positive_real, "fast", "expected a number, got 'fast'"),
    ],
)
def test_bad_values_are_refused_with_the_reason(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse(text)


@pytest.mark.parametrize(
    "parse, text, value",
    [(positive_real, "3e-3", 3e-3), (non_negative_real, "0", 0.0), (positive_int, "7", 7),
     (real(0.0, 1.0, high_open=True), "0", 0.0)],
)
def test_good_values_parse(parse, text, value):
    assert parse(text) == value


def test_a_usage_error_is_one_line(capsys):
    parser = OneLineErrorParser(prog="tool")
    parser.add_argument("--lr", type=positive_real)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--lr", "nan"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "tool: error: argument --lr: must be a positive finite number, got nan (see --help)\n"
    )
