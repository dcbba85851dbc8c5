"""Hostile input, generated: every command of ``fer-edge``, driven with argument
vectors drawn from its own parser and from a pool of malformed files (junk
bytes, truncated and absurd checkpoints, decompression bombs, non-UTF-8 CSV,
fake bundles and runs, unwritable outputs), must end with exit 0 or 2, never
a traceback, and a failure is one error line on stderr.

The main input of each command is always hostile, so every example fails (or
succeeds) in its validation, before any long work: the test is bounded in
examples and time, and it checks that validation comes first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fer_edge.cli import COMMANDS, build_parser, main
from helpers import png_bomb

NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e30", "abc", "", "1", "3", "0.5", "99999999999", "1e-30", "7"]
DEVICES = ["cpu", "cuda", "cuda:7", "gpu", "auto", ""]
STRINGS = ["angry,happy", "", ",,,", "x" * 300, "\u00e9\u4e2d", "-", "angry,angry"]
# Options that always get a hostile file, so that no example starts real work.
ANCHORS = {"train": "--data", "eval": "--data", "calibrate": "--data", "teacher-logits": "--data",
           "merge": "--weights", "convert": "--weights", "parity": "--bundle", "benchmark": "--data",
           "predict": "source"}
# Each example is one command; the whole test stays well under a minute or two.
MAX_SECONDS_PER_EXAMPLE = 30


def absurd_checkpoint(src: Path, dst: Path, **config) -> None:
    """The real checkpoint with its metadata's model config changed (the tensors kept)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["fer_edge"])
    meta["config"].update(config)
    header["__metadata__"]["fer_edge"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def hostile_pool(root: Path) -> list[str]:
    """Malformed files and folders under root; returns the paths (and non-paths) to draw from."""
    from fer_edge.weights import default_weights

    real = Path(default_weights())
    (root / "empty.safetensors").write_bytes(b"")
    (root / "junk.safetensors").write_bytes(os.urandom(2048))
    (root / "trunc.safetensors").write_bytes(real.read_bytes()[:5000])
    (root / "huge-header.safetensors").write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    absurd_checkpoint(real, root / "wide.safetensors", width=1e9)
    absurd_checkpoint(real, root / "classes.safetensors", num_classes=10 ** 9)
    absurd_checkpoint(real, root / "typed.safetensors", width="wide", input_size=[1, 2])
    data = root / "data" / "happy"
    data.mkdir(parents=True)
    (data / "bomb.png").write_bytes(png_bomb())
    (data / "trunc.png").write_bytes(png_bomb(48, 48)[:30])
    (data / "text.png").write_text("not an image")
    (data / "empty.jpg").write_bytes(b"")
    (root / "fer.csv").write_bytes(b"emotion,pixels,Usage\n3,\xff\xfe 1 2,Training\n9,1 2 3,PublicTest\n"
                                   + b"1," + b"7 " * 3_000_000 + b",Training\n")
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "fer-edge-bundle", "format_version": 2,
                                                      "files": "x", "artifacts": [{}], "target": 3}))
    (bundle / "labels.json").write_bytes(b"\xff\xfe[")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text("{\"model\": ")
    (run / "resume.safetensors").write_bytes(b"PK\x03\x04" + os.urandom(512))
    (run / "metrics.jsonl").write_text("{\"epoch\": 1}\nnot json\n")
    ro = root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return [str(p) for p in (
        root / "missing", root / "empty.safetensors", root / "junk.safetensors", root / "trunc.safetensors",
        root / "huge-header.safetensors", root / "wide.safetensors", root / "classes.safetensors",
        root / "typed.safetensors", root / "data", data / "bomb.png", data / "trunc.png", data / "text.png",
        root / "fer.csv", bundle, run, ro / "out", root / "empty.safetensors" / "out", root / "new-out",
        root / "new-out.png", root / "new-out.xyz", "/proc/version/out")] + ["", "-"]


def _parser_actions() -> dict[str, list[argparse.Action]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
            for name, p in sub.choices.items()}


ACTIONS = _parser_actions()


def _value(draw, action: argparse.Action, paths: list[str]) -> str:
    if action.choices:
        return draw(st.sampled_from(sorted(map(str, action.choices)) + ["bogus"]))
    name = getattr(action.type, "__name__", "")
    if action.option_strings and action.option_strings[0] == "--device":
        return draw(st.sampled_from(DEVICES))
    if action.type in (int, float) or name in ("int", "float"):
        return draw(st.sampled_from(NUMBERS))
    return draw(st.sampled_from(paths + STRINGS))


@st.composite
def argv(draw, paths: list[str]) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    out = [command]
    anchor = ANCHORS.get(command)
    for action in ACTIONS[command]:
        forced = action.dest == anchor or anchor in action.option_strings
        if not (forced or action.required or draw(st.integers(0, 3)) == 0):
            continue
        if action.nargs == 0:
            out.append(action.option_strings[0])
            continue
        value = draw(st.sampled_from([p for p in paths if p])) if forced else _value(draw, action, paths)
        if action.option_strings:
            out += [action.option_strings[0], value]
        else:
            out.append(value)
    return out


def run_in_process(args: list[str], cwd) -> tuple[int, str]:
    """main(args) in cwd (relative outputs land there), with its exit code and stderr."""
    err = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(args)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(here)
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def pool_root():
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    yield root
    for p in root.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_traceback_for_generated_hostile_arguments(data, pool_root):
    root = Path(tempfile.mkdtemp(dir=pool_root))
    args = data.draw(argv(hostile_pool(root)))
    start = time.monotonic()
    rc, err = run_in_process(args, root)
    took = time.monotonic() - start
    assert "Traceback" not in err and "internal error" not in err, f"{args}\n{err[-3000:]}"
    assert rc in (0, 2), f"{args} -> exit {rc}\n{err[-2000:]}"
    if rc == 2:
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1, f"{args}\n{err}"
    assert took < MAX_SECONDS_PER_EXAMPLE, f"{args} ran {took:.0f} s: validation must come before the work"


def test_the_pool_is_really_hostile(tmp_path):
    """The crafted files are what they claim: a PNG header of 10 gigapixels, a
    checkpoint asking for a billion-wide model (and otherwise intact)."""
    hostile_pool(tmp_path)
    raw = (tmp_path / "data" / "happy" / "bomb.png").read_bytes()
    assert struct.unpack(">II", raw[16:24]) == (100_000, 100_000)
    raw = (tmp_path / "wide.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(json.loads(raw[8:8 + n])["__metadata__"]["fer_edge"])["config"]["width"] == 1e9
