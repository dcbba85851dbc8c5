"""The fer-edge command line: info and help."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

# The console script pip installed beside this interpreter (venv/bin/fer-edge).
SCRIPT = Path(sys.executable).with_name("fer-edge")


def run(*args):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_console_script_is_installed():
    assert SCRIPT.is_file(), f"pip install must install the fer-edge console script ({SCRIPT})"


def test_info_json_reports_kernels_and_runtimes():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    import fer_edge
    from fer_edge import _C

    built = _C.build_info()
    assert info["fer_edge"] == fer_edge.__version__
    assert info["kernels"]["cpu"] is True
    assert info["kernels"]["cuda"] is built["cuda"]
    assert info["kernels"]["cuda_archs"] == list(built["cuda_archs"])
    assert set(info["runtimes"]) >= {"onnxruntime", "ai_edge_litert", "tensorrt"}
    torch = pytest.importorskip("torch")
    assert info["torch"] == torch.__version__
    try:
        import onnxruntime
    except ImportError:
        assert info["runtimes"]["onnxruntime"] is None
    else:
        assert info["runtimes"]["onnxruntime"] == onnxruntime.__version__
    # the kernel dispatch table the package ships: every row names a choice the kernels know
    from fer_edge.dispatch import CHOICES, TABLE_FILE

    table = json.loads(TABLE_FILE.read_text())
    assert info["kernel_dispatch"]["entries"] == table["entries"]
    assert all(r["choice"] in CHOICES for r in table["entries"])
    text = run("info").stdout
    assert f"kernel dispatch on CUDA (kernel_dispatch.json): {len(table['entries'])} measured shape(s)" in text
    if torch.cuda.is_available():
        assert info["cuda_device"] == torch.cuda.get_device_name(0)
    else:
        assert info["cuda_device"] is None


def test_help_lists_every_command_with_its_summary():
    from fer_edge.cli import COMMANDS, build_parser

    proc = run("--help")
    assert proc.returncode == 0
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    summaries = {c.dest: c.help for c in sub._choices_actions}
    assert set(summaries) == set(COMMANDS)
    text = " ".join(proc.stdout.split())  # argparse wraps long summaries
    for name, summary in summaries.items():
        assert summary, f"{name} has no summary"
        assert f"{name} {' '.join(summary.split())}" in text, f"{name} and its summary missing from --help"


def test_unknown_command_is_one_line_error():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid choice" in proc.stderr


# ------------------------------------------------------------------ the embedded default model
def test_default_model_is_embedded_and_used_without_weights(tmp_path):
    """convert, eval and predict need no --weights: the packaged model (its
    card beside it) runs, and it is a trained model, not a placeholder."""
    import hashlib
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import DATA, copy_subset

    from fer_edge.weights import default_card, default_weights

    card, path = default_card(), default_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    assert path.stat().st_size <= 10 * 2**20
    info = json.loads(run("info", "--json").stdout)
    assert info["default_model"]["name"] == card["name"]

    proc = run("convert", "--target", "jetson", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "used the embedded default model" in proc.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source_checkpoint"]["sha256"] == card["sha256"]

    if not (DATA / "fer2013").is_dir():
        pytest.skip(f"real data not found at {DATA}")
    faces = copy_subset(DATA / "fer2013" / "publictest", tmp_path / "faces", 15)  # 105 real faces
    proc = run("eval", "--data", faces, "--json", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "e.json").read_text())
    # 66.9% on all of PublicTest; chance is 1/7.  A 105-face sample sits well above 40%.
    assert rep["images"] == 105 and rep["accuracy"] > 0.40, rep["accuracy"]
    proc = run("eval", "--data", faces, "--limit", "30", "--json", tmp_path / "e30.json")
    assert proc.returncode == 0 and "subset of 30 of 105 faces" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "e30.json").read_text())["images"] == 30
    img = next((faces / "happy").iterdir())
    big = tmp_path / "face.png"  # predict detects faces first: give it one at a detectable size
    import cv2

    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(img)), (192, 192), interpolation=cv2.INTER_CUBIC))
    proc = run("predict", big, "--jsonl", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "used the embedded default model" in proc.stderr
    shutil.rmtree(tmp_path / "b")


def test_an_internal_error_says_it_is_a_bug(monkeypatch, capsys):
    """What fer-edge did not foresee keeps its traceback, plus one line saying it is a bug to report."""
    from fer_edge.cli import main
    from fer_edge.commands import merge

    def broken(args):
        raise RuntimeError("an internal inconsistency")

    monkeypatch.setattr(merge, "cmd_merge", broken)
    assert main(["merge", "--weights", "w", "--out", "m"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal inconsistency" in err
    assert err.strip().splitlines()[-1].startswith("fer-edge merge: internal error: this is a bug in fer-edge")


def test_os_errors_are_one_line(monkeypatch, capsys):
    import errno

    from fer_edge.cli import main
    from fer_edge.commands import merge

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "m.safetensors")

    monkeypatch.setattr(merge, "cmd_merge", full_disk)
    assert main(["merge", "--weights", "w", "--out", "m"]) == 2
    assert capsys.readouterr().err == "fer-edge merge: error: m.safetensors: no space left on the device\n"
