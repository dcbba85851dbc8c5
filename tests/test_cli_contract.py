"""What every command of ``fer-edge`` promises, read from the parser itself:
a description, help for every option, fixed sets as choices, ranges checked by
argparse (so a bad value is one line and exit 2 before anything runs), and
--no-progress wherever a command runs long."""
from __future__ import annotations

import argparse

import pytest

from fer_edge import argtypes
from fer_edge.cli import COMMANDS, build_parser

# Commands that can run for minutes: each must be silenceable.
LONG_RUNNING = ("train", "eval", "teacher-logits", "calibrate", "convert", "parity", "benchmark", "predict")
# Options naming a member of a fixed set, wherever a command has them.
FIXED_SETS = ("--target", "--precision", "--amp", "--model", "--detector", "--recipe", "--usage", "--calib-method")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUB = _subparsers()


def _options(name: str) -> list[argparse.Action]:
    return [a for a in SUB[name]._actions if not isinstance(a, argparse._HelpAction)]


def test_every_registered_command_is_built():
    assert set(SUB) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_a_description_and_every_option_help(name):
    assert SUB[name].description and len(SUB[name].description) > 20, name
    missing = [a.option_strings or a.dest for a in _options(name) if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"{name}: options without help: {missing}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_command_has_no_progress(name):
    assert any("--no-progress" in a.option_strings for a in _options(name)), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_fixed_sets_are_choices(name):
    loose = [a.option_strings[0] for a in _options(name)
             if set(a.option_strings) & set(FIXED_SETS) and not a.choices]
    assert not loose, f"{name}: {loose} accept any string"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_numbers_and_devices_are_range_checked_by_the_parser(name):
    """A bare int/float type lets 0, -1, nan and 1e30 through to the work; the
    argtypes types refuse them in one line before anything runs."""
    loose = [a.option_strings[0] for a in _options(name)
             if a.type in (int, float) or (a.option_strings and a.option_strings[0] == "--device"
                                            and not a.choices and a.type is not argtypes.device_name)]
    assert not loose, f"{name}: {loose} are not range-checked"


@pytest.mark.parametrize("text, ok", [("8", True), ("0", False), ("-3", False), ("1e3", False), ("x", False),
                                      (str(1 << 40), False)])
def test_int_ranges(text, ok):
    parse = argtypes.int_in(1, 1 << 20)
    if ok:
        assert parse(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("text, ok", [("0.1", True), ("1", True), ("0", False), ("nan", False), ("inf", False),
                                      ("-0.5", False), ("2", False), ("", False)])
def test_float_ranges(text, ok):
    parse = argtypes.float_in(0, 1, low_open=True)
    if ok:
        assert parse(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("text, ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("auto", True),
                                      ("gpu", False), ("cuda:-1", False), ("cuda:x", False), ("", False)])
def test_device_names(text, ok):
    if ok:
        assert argtypes.device_name(text) == text
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.device_name(text)


def test_a_bad_number_is_one_line_and_exit_2(capsys):
    from fer_edge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "x", "--out", "y", "--lr", "nan"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr" in err[0] and "finite" in err[0], err
