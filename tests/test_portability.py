"""From the P100 desktop to the device: --amp auto by compute capability, the
CUDA architectures by toolkit, and the device install (no compiler, no torch,
no fer_edge._C).

Nothing heavy is built here: the CMake rule is checked with `cmake -P` and a
configure without a compiler; the device runtime runs in a subprocess where
torch and fer_edge._C cannot be found, as on a device that never had them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")


# ---------------------------------------------------------------- --amp auto
@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA GPU of the given compute capability is device 0."""
    torch = pytest.importorskip("torch")
    asked = []

    def set_capability(cap):
        def fake(device=None):
            asked.append(device)
            return cap
        monkeypatch.setattr(torch.cuda, "get_device_capability", fake)
        return asked
    return set_capability


@pytest.mark.parametrize("cap, expect", [((6, 0), "float16"), ((6, 1), "float16"), ((7, 0), "float16"),
                                         ((7, 5), "float16"), ((8, 0), "bfloat16"), ((8, 7), "bfloat16"),
                                         ((9, 0), "bfloat16")])
def test_amp_auto_follows_the_compute_capability(gpu, cap, expect):
    import torch

    from fer_edge.training.trainer import amp_dtype

    asked = gpu(cap)
    notes = []
    assert amp_dtype("auto", torch.device("cuda"), log=notes.append) == getattr(torch, expect)
    assert asked, "the capability must come from the device when none is given"
    assert notes == []  # auto never needs a note
    # The same rule from an explicit capability, without asking torch.
    asked.clear()
    assert amp_dtype("auto", torch.device("cuda"), capability=cap) == getattr(torch, expect)
    assert asked == []


def test_forced_bf16_on_a_gpu_without_it_is_kept_with_one_note(gpu):
    import torch

    from fer_edge.training.trainer import amp_dtype

    gpu((6, 0))  # Tesla P100
    notes = []
    assert amp_dtype("bf16", torch.device("cuda"), log=notes.append) is torch.bfloat16
    assert len(notes) == 1 and "6.0" in notes[0] and "bfloat16" in notes[0] and "--amp auto" in notes[0]
    notes.clear()
    gpu((8, 0))
    assert amp_dtype("bf16", torch.device("cuda"), log=notes.append) is torch.bfloat16
    assert notes == []


def test_amp_fp16_off_and_cpu_do_not_depend_on_the_gpu(gpu):
    import torch

    from fer_edge import UserError
    from fer_edge.training.trainer import amp_dtype

    asked = gpu((6, 0))
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16
    assert amp_dtype("fp16", torch.device("cuda"), capability=(9, 0)) is torch.float16
    assert amp_dtype("off", torch.device("cuda")) is None
    for amp in ("auto", "bf16", "fp16", "off"):
        assert amp_dtype(amp, torch.device("cpu")) is None  # the CPU trains in float32
    assert asked == []
    with pytest.raises(UserError, match="unknown --amp"):
        amp_dtype("fp8", torch.device("cuda"))


# ---------------------------------------------------------------- CUDA architectures
def _cmake_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "check.cmake"
    script.write_text(f'include("{(REPO / "cmake" / "cuda_archs.cmake").as_posix()}")\n' + textwrap.dedent(body))
    return subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)


@needs_cmake
def test_cuda_architectures_follow_the_toolkit(tmp_path):
    versions = ["11.7", "11.8", "12.0", "12.4", "12.6", "12.9", "13.0", "13.1"]
    body = "".join(f'fer_edge_default_cuda_archs("{v}" a)\nmessage(STATUS "{v}=${{a}}")\n' for v in versions)
    proc = _cmake_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.removeprefix("-- ").split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    pascal_on = "60;61;70;75;80;86;87;89;90"  # sm_60: Tesla P100; 87: Jetson Orin
    assert got == {"11.7": "", "11.8": pascal_on, "12.0": pascal_on, "12.4": pascal_on, "12.6": pascal_on,
                   "12.9": pascal_on, "13.0": "75;80;86;87;89;90", "13.1": "75;80;86;87;89;90"}


@needs_cmake
def test_cuda_version_is_read_from_nvcc(tmp_path):
    samples = {
        "Cuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4.r12.4/compiler.34097967_0": "12.4",
        "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88": "13.0",
        "clang version 17.0.6": "",
    }
    body = "".join(f'fer_edge_nvcc_version([=[{text}]=] v)\nmessage(STATUS "got=${{v}}")\n' for text in samples)
    proc = _cmake_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    assert [line.split("=", 1)[1] for line in proc.stdout.splitlines()] == list(samples.values())
    # A version that is not one is refused, not mapped to some list.
    proc = _cmake_script(tmp_path, 'fer_edge_default_cuda_archs("twelve" a)\n')
    assert proc.returncode != 0 and "not a CUDA version" in proc.stderr


@needs_cmake
def test_cutlass_path_builds_once_per_major_architecture(tmp_path):
    """The CUTLASS path's SM80 code runs on every 8.x GPU: one 80-real build
    serves 80/86/87/89, 9.0+ get their own, the highest also PTX (for newer
    GPUs), older entries none, and a symbolic list (native) is kept."""
    lists = {"75;80;86;87;89;90": "80-real;90", "60;61;70;75;80;86;87;89;90": "80-real;90",
             "87": "80", "86;87": "80", "90-real;100": "90-real;100", "75": "", "native": "native"}
    body = "".join(f'fer_edge_cutlass_archs("{k}" a)\nmessage(STATUS "{k}=${{a}}")\n' for k in lists)
    proc = _cmake_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.removeprefix("-- ").split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert got == lists
    # The Hopper path: sm_90a code, only when the list builds for 9.0.
    hopper = {"75;80;86;87;89;90": "90a-real", "90-real": "90a-real", "90a": "90a-real", "80;100": "",
              "native": "", "87": ""}
    body = "".join(f'fer_edge_cutlass_sm90_archs("{k}" a)\nmessage(STATUS "{k}=${{a}}")\n' for k in hopper)
    proc = _cmake_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    assert dict(line.removeprefix("-- ").split("=", 1) for line in proc.stdout.splitlines() if "=" in line) == hopper


def _build_backend():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fer_edge_build_backend", REPO / "cmake" / "build_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_asks_for_cutlass_only_when_it_compiles_cuda(monkeypatch, tmp_path):
    """CUTLASS's headers (and their package's large dependencies) are a build
    requirement only of builds that compile CUDA without headers of their own."""
    backend = _build_backend()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert pyproject["build-backend"] == "build_backend" and pyproject["backend-path"] == ["cmake"]
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("")
    for name in ("FER_EDGE_KERNELS", "FER_EDGE_CUDA", "FER_EDGE_CUTLASS", "FER_EDGE_CUTLASS_INCLUDE", "CUDAARCHS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDACXX", str(nvcc))
    assert backend.wants_cutlass() and backend.wants_cutlass({})
    assert not backend.wants_cutlass({"cmake.define.FER_EDGE_CUDA": "OFF"})
    assert not backend.wants_cutlass({"cmake.define.FER_EDGE_KERNELS": ["ON", "0"]})   # the last -C wins
    assert not backend.wants_cutlass({"cmake.define.FER_EDGE_CUTLASS_INCLUDE": "/opt/cutlass/include"})
    assert not backend.wants_cutlass({"cmake.define.CMAKE_CUDA_ARCHITECTURES": "60;75"})   # none is 8.0+
    assert backend.wants_cutlass({"cmake.define.CMAKE_CUDA_ARCHITECTURES": "75;87"})
    assert backend.wants_cutlass({"cmake.define.CMAKE_CUDA_ARCHITECTURES": "native"})
    monkeypatch.setenv("FER_EDGE_KERNELS", "0")   # the device install
    assert not backend.wants_cutlass()
    monkeypatch.delenv("FER_EDGE_KERNELS")
    monkeypatch.setenv("CUDACXX", str(tmp_path / "missing-nvcc"))
    assert not backend.wants_cutlass()
    assert backend.CUTLASS_REQUIREMENT.startswith("nvidia-cutlass==")


# ---------------------------------------------------------------- the device install
def _configure(tmp_path, *args, env_kernels=None):
    env = {k: v for k, v in os.environ.items() if k not in ("FER_EDGE_KERNELS", "CUDAARCHS")}
    # No compiler anywhere: what a device without build tools has.
    env.update(CC="/nonexistent/cc", CXX="/nonexistent/c++", CUDACXX="/nonexistent/nvcc")
    if env_kernels is not None:
        env["FER_EDGE_KERNELS"] = env_kernels
    build = tmp_path / f"build{len(list(tmp_path.glob('build*')))}"
    return subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), *args], capture_output=True, text=True,
                          timeout=120, env=env)


@needs_cmake
def test_kernels_off_configures_without_any_compiler(tmp_path):
    for args, env_kernels in [(["-DFER_EDGE_KERNELS=OFF", "-DCMAKE_CXX_COMPILER=/nonexistent/c++"], None),
                              ([], "0")]:
        proc = _configure(tmp_path, *args, env_kernels=env_kernels)
        assert proc.returncode == 0, proc.stderr
        assert "FER_EDGE_KERNELS=OFF, no compiled kernels" in proc.stdout
    # The switch is what spares the compiler: with kernels on, this configure needs one.
    proc = _configure(tmp_path)
    assert proc.returncode != 0 and "CMAKE_CXX_COMPILER" in proc.stderr + proc.stdout
    # A typo is refused, not read as OFF.
    proc = _configure(tmp_path, env_kernels="of")
    assert proc.returncode != 0 and "FER_EDGE_KERNELS='of'" in proc.stderr


def _deps(extra_list) -> list[str]:
    import re

    return [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in extra_list]


def test_runtime_extras_need_neither_torch_nor_a_compiler():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    onnx, tflite = set(_deps(extras["runtime-onnx"])), set(_deps(extras["runtime-tflite"]))
    assert {"opencv-python-headless", "onnxruntime"} <= onnx and "ai-edge-litert" not in onnx
    assert {"opencv-python-headless", "ai-edge-litert"} <= tflite and "onnxruntime" not in tflite
    assert "fer-edge[runtime-onnx,runtime-tflite]" in extras["runtime"]
    for name in ("runtime-onnx", "runtime-tflite"):
        assert not {"torch", "litert-torch", "onnx", "pybind11"} & set(_deps(extras[name])), name
    # Every pip build is told the switch (default ON), so a reused build folder never keeps a stale one.
    define = pyproject["tool"]["scikit-build"]["cmake"]["define"]["FER_EDGE_KERNELS"]
    assert define == {"env": "FER_EDGE_KERNELS", "default": "ON"}
    assert "pybind11" in " ".join(pyproject["build-system"]["requires"])


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    """The embedded default model converted to an ONNX bundle (no training, a few seconds)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("port") / "bundle-onnx"
    proc = run_cli("convert", "--target", "onnx", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# Runs first in the subprocess: torch and fer_edge._C are not found, exactly as
# where they were never installed (import fails, importlib.util.find_spec is None).
HIDE = """
import sys
class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HIDDEN):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def _without_torch_and_kernels(code: str, cwd, hidden=("torch", "fer_edge._C")) -> subprocess.CompletedProcess:
    prelude = f"HIDDEN = {tuple(hidden)!r}\n" + HIDE
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_device_runtime_works_without_torch_or_compiled_kernels(onnx_bundle, tmp_path):
    from fer_edge.targets import load_bundle, open_backend, preprocess_faces

    faces = np.random.default_rng(0).integers(0, 256, size=(3, 48, 48), dtype=np.uint8)
    np.save(tmp_path / "faces.npy", faces)
    code = f"""
        import json
        import numpy as np
        import fer_edge, fer_edge.targets
        from fer_edge import info
        from fer_edge.targets import load_bundle, open_backend, preprocess_faces
        bun = load_bundle({str(onnx_bundle)!r})
        art = bun.artifact()
        x = preprocess_faces(np.load("faces.npy"), bun.preprocess)
        logits = open_backend(art.path, art.runtime).run(x)
        facts = info.collect()
        try:
            import fer_edge.kernels
            kernels = "imported"
        except ImportError as exc:
            kernels = str(exc)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "fer_edge._C")))
        print(json.dumps({{"logits": logits.tolist(), "torch": facts["torch"], "kernels": facts["kernels"],
                          "kernels_module": kernels, "loaded": loaded}}))
    """
    proc = _without_torch_and_kernels(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["torch"] is None
    assert got["kernels"]["cpu"] is False and "fer_edge._C does not import" in got["kernels"]["error"]
    assert "torch" in got["kernels_module"]  # the training side is what needs them
    # The same numbers as in a full installation.
    bun = load_bundle(onnx_bundle)
    art = bun.artifact()
    want = open_backend(art.path, art.runtime).run(preprocess_faces(faces, bun.preprocess))
    np.testing.assert_allclose(np.array(got["logits"]), want, rtol=1e-5, atol=1e-5)


def test_training_side_without_compiled_kernels_says_why(tmp_path):
    """torch installed but no fer_edge._C (a device install with torch added
    later): importing the kernels names the build switch instead of failing obscurely."""
    pytest.importorskip("torch")
    code = """
        try:
            import fer_edge.kernels
        except ImportError as exc:
            print(exc)
            sys.exit(3)
    """
    proc = _without_torch_and_kernels(code, tmp_path, hidden=("fer_edge._C",))
    assert proc.returncode == 3, proc.stderr
    assert "FER_EDGE_KERNELS=0" in proc.stdout and "pip install ." in proc.stdout


def test_predict_command_runs_without_torch_or_compiled_kernels(onnx_bundle, tmp_path):
    cv2 = pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photograph")
    cv2.imwrite(str(tmp_path / "a.png"), np.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1]))
    code = f"""
        from fer_edge.cli import main
        rc = main(["predict", "a.png", "--bundle", {str(onnx_bundle)!r}])
        assert "torch" not in sys.modules
        sys.exit(rc)
    """
    proc = _without_torch_and_kernels(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "a.png [0]: #1" in proc.stdout and "onnxruntime (model.onnx" in proc.stdout


def test_bundle_readme_gives_the_device_install(onnx_bundle):
    readme = (onnx_bundle / "README.md").read_text()
    assert 'FER_EDGE_KERNELS=0 pip install "./fer-edge[runtime-onnx]"' in readme
    assert "not on PyPI" in readme
    assert "pip install fer-edge " not in readme  # there is no such package to install


@pytest.mark.parametrize("target, extra", [("jetson", "runtime-onnx"), ("android", "runtime-tflite")])
def test_bundle_readme_install_line_per_runtime(target, extra):
    from fer_edge.converters.formats import FORMATS

    fmt = next(f for f in FORMATS if f.target == target)
    lines = fmt.device.install
    assert f'FER_EDGE_KERNELS=0 pip install "./fer-edge[{extra}]"' in lines
    assert any("cuda-python" in x for x in lines) == (target == "jetson")


@pytest.mark.parametrize("argv, extra", [
    (["train", "--data", "d", "--out", "r"], "train"),
    (["eval", "--data", "d"], "train"),
    (["merge", "--weights", "w.safetensors", "--out", "m.safetensors"], "train"),
    (["predict", "a.png", "--weights", "w.safetensors"], "train"),
    (["convert", "--target", "onnx", "--out", "b"], "convert"),
])
def test_commands_that_need_torch_say_which_extra_without_it(tmp_path, argv, extra):
    """A device install (no torch): a command that needs torch is one line naming the extra, exit 2."""
    code = f"""
        from fer_edge.cli import main
        sys.exit(main({argv!r}))
    """
    (tmp_path / "d").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"\\0" * 64)
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64), np.uint8))
    proc = _without_torch_and_kernels(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'torch'" in lines[0] and f'pip install "fer-edge[{extra}]"' in lines[0], lines[0]
