"""cli/args.py: comma-separated numbers as argparse types, refused in one usage line."""

from __future__ import annotations

import argparse

import pytest

from cli.args import numbers, parse_numbers


def test_a_list_reads_its_numbers_and_skips_blanks() -> None:
    assert parse_numbers("0.1, 0.05,,1e-3") == [0.1, 0.05, 0.001]


@pytest.mark.parametrize("text", ["", " , ", "a,0.1", "0.1,nan", "inf"])
def test_an_empty_or_non_finite_list_is_a_usage_error_naming_the_option(text, capsys) -> None:
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--rhos", type=numbers("rhos"), default="0.1")
    assert parser.parse_args([]).rhos == [0.1]  # argparse parses a string default too
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--rhos", text])
    assert exit_.value.code == 2
    assert f"argument --rhos: invalid rhos value: {text!r}" in capsys.readouterr().err
