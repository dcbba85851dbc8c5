"""The fer-edge command line: info and help."""
from __future__ import annotations

import json
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
    assert set(info["runtimes"]) >= {"onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorrt"}
    torch = pytest.importorskip("torch")
    assert info["torch"] == torch.__version__
    try:
        import onnxruntime
    except ImportError:
        assert info["runtimes"]["onnxruntime"] is None
    else:
        assert info["runtimes"]["onnxruntime"] == onnxruntime.__version__
    if torch.cuda.is_available():
        assert info["cuda_device"] == torch.cuda.get_device_name(0)
    else:
        assert info["cuda_device"] is None


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "info" in proc.stdout


def test_unknown_command_is_one_line_error():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid choice" in proc.stderr
