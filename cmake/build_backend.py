"""PEP 517 build backend: scikit-build-core's, asking for CUTLASS's headers
(the ``nvidia-cutlass`` package) only for builds that will compile the CUDA
kernels.

The large-batch CUDA path (csrc/msconv_cuda_cutlass.cu) needs CUTLASS's C++
headers at build time, and nothing of it at run time.  The package that ships
them pulls large Python dependencies, so a build that compiles no CUDA (the
device install with FER_EDGE_KERNELS=0, -C cmake.define.FER_EDGE_CUDA=OFF, a
machine without nvcc, architectures all older than 8.0) does not ask for it.
CMakeLists.txt finds the headers in the build environment, or in
FER_EDGE_CUTLASS_INCLUDE.  Offline, with an index that lacks nvidia-cutlass:
-C cmake.define.FER_EDGE_CUTLASS=OFF, or FER_EDGE_CUTLASS_INCLUDE=DIR.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"
_OFF = {"0", "off", "no", "false", "n"}


def _switched_off(name: str, config_settings: dict | None, from_env: bool = False) -> bool:
    """Whether -C cmake.define.NAME=... (or, for a switch CMake reads from the
    environment, the environment) turns NAME off."""
    value = (config_settings or {}).get(f"cmake.define.{name}")
    if value is None:
        value = os.environ.get(name, "") if from_env else ""
    if isinstance(value, list):  # pip passes a repeated -C key as a list: the last one wins, as in CMake
        value = value[-1] if value else ""
    return str(value).strip().lower() in _OFF


def _cuda_compiler() -> str | None:
    """The CUDA compiler CMake's check_language(CUDA) would find, roughly: CUDACXX,
    nvcc on PATH, then the usual toolkit folders."""
    given = os.environ.get("CUDACXX")
    if given:
        return given if Path(given).exists() else None
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _archs_below_80(config_settings: dict | None) -> bool:
    """Whether the CUDA architectures asked for (-C cmake.define.CMAKE_CUDA_ARCHITECTURES or
    CUDAARCHS) are all numbers below 80: the CUTLASS path is then not built."""
    value = (config_settings or {}).get("cmake.define.CMAKE_CUDA_ARCHITECTURES") or os.environ.get("CUDAARCHS", "")
    if isinstance(value, list):
        value = value[-1] if value else ""
    archs = [a.strip() for a in str(value).replace(",", ";").split(";") if a.strip()]
    numbers = [a.split("-")[0] for a in archs]
    return bool(numbers) and all(n.isdigit() and int(n) < 80 for n in numbers)


def wants_cutlass(config_settings: dict | None = None) -> bool:
    """Whether this build compiles the CUTLASS path and has no headers of its own for it."""
    # FER_EDGE_KERNELS is also an environment switch (pyproject.toml, CMakeLists.txt); the others are -C only.
    if _switched_off("FER_EDGE_KERNELS", config_settings, from_env=True) or any(
            _switched_off(name, config_settings) for name in ("FER_EDGE_CUDA", "FER_EDGE_CUTLASS")):
        return False
    if _archs_below_80(config_settings):
        return False
    own_headers = (config_settings or {}).get("cmake.define.FER_EDGE_CUTLASS_INCLUDE")
    if own_headers or os.environ.get("FER_EDGE_CUTLASS_INCLUDE"):
        return False
    return _cuda_compiler() is not None


def _backend():
    # Imported when a hook runs (in the build environment), not on import: the
    # rule above is then testable where scikit-build-core is not installed.
    from scikit_build_core import build

    return build


def get_requires_for_build_wheel(config_settings=None):
    extra = [CUTLASS_REQUIREMENT] if wants_cutlass(config_settings) else []
    return [*_backend().get_requires_for_build_wheel(config_settings), *extra]


def get_requires_for_build_editable(config_settings=None):
    extra = [CUTLASS_REQUIREMENT] if wants_cutlass(config_settings) else []
    return [*_backend().get_requires_for_build_editable(config_settings), *extra]


def __getattr__(name: str):
    """Every other hook (build_wheel, build_sdist, prepare_metadata_..., ...) is
    scikit-build-core's own; a hook it lacks stays missing (AttributeError), as
    PEP 517 frontends expect of optional hooks."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_backend(), name)
