"""The argparse types every command shares (cli_types.py)."""

import argparse
import os

import pytest

from polycom_megatron import cli_types as ct


@pytest.mark.parametrize("convert, text, value", [
    (ct.positive_int, "4", 4), (ct.positive_int, " 1 ", 1), (ct.non_negative_int, "0", 0),
    (ct.finite_float, "-2.5", -2.5), (ct.positive_float, "1e-3", 1e-3),
    (ct.non_negative_float, "0", 0.0), (ct.int_list, "8, 64", (8, 64)),
    (ct.real(0.0, 1.0, high_open=True), "0", 0.0), (ct.integer(0, 9), "9", 9),
])
def test_good_values(convert, text, value):
    assert convert(text) == value


@pytest.mark.parametrize("convert, text, says", [
    (ct.positive_int, "0", "must be at least 1, got 0"), (ct.positive_int, "-3", "-3"),
    (ct.positive_int, "1.5", "expected a whole number, got '1.5'"),
    (ct.non_negative_int, "-1", "must be at least 0"),
    (ct.integer(0, 9), "10", "must be between 0 and 9, got 10"),
    (ct.finite_float, "nan", "finite"), (ct.finite_float, "inf", "finite"),
    (ct.positive_float, "0", "must be a positive finite number, got 0"),
    (ct.positive_float, "nan", "must be a positive finite number, got nan"),
    (ct.positive_float, "-inf", "finite"), (ct.positive_float, "fast", "expected a number"),
    (ct.non_negative_float, "-1e-3", "must be a finite number >= 0"),
    (ct.real(0.0, 1.0, high_open=True), "1", r"must be a number in \[0, 1\), got 1"),
    (ct.int_list, "", "empty"), (ct.int_list, "8,0", "at least 1"),
])
def test_bad_values_name_the_problem(convert, text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        convert(text)


def test_an_argparse_error_is_one_line_naming_the_flag(capsys):
    parser = argparse.ArgumentParser(prog="cmd")
    parser.add_argument("--rounds", type=ct.positive_int)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--rounds", "-3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "cmd: error: argument --rounds: must be at least 1, got -3")


def test_the_one_line_parser_prints_no_usage_block(capsys):
    parser = ct.OneLineErrorParser(prog="tool")
    parser.add_argument("--lr", type=ct.positive_float)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--lr", "nan"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "tool: error: argument --lr: must be a positive finite number, got nan "
        "(see tool --help)\n")


def test_output_folders(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert ct.writable_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the argparse type creates nothing
    for bad in (afile, afile / "sub"):
        with pytest.raises(argparse.ArgumentTypeError, match="afile"):
            ct.writable_dir(str(bad))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        ct.writable_file(str(tmp_path))
    made = ct.prepare_output_dir(tmp_path / "out" / "run")
    assert made.is_dir() and os.listdir(made) == []  # created, probed, left empty
    with pytest.raises(ValueError, match="cannot write into"):
        ct.prepare_output_dir(afile / "sub")
