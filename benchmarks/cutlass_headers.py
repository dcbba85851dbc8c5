#!/usr/bin/env python
"""Pack CUTLASS's C++ headers for a GPU machine without internet, where
`pip install` cannot fetch the nvidia-cutlass build requirement.

    pip download nvidia-cutlass==4.2.0.0 --no-deps -d downloads
    python benchmarks/cutlass_headers.py downloads/nvidia_cutlass-4.2.0.0-py3-none-any.whl

writes .data/cutlass-include.tar.xz; `bash benchmarks/gpu_check.sh` unpacks it
and builds the large-batch path against it (FER_EDGE_CUTLASS_INCLUDE).
Without a wheel argument it packs the headers of an installed nvidia-cutlass.
Where nvcc is found, only the headers the CUTLASS sources include (for the
architectures they are built for, as `nvcc -M` lists them) are packed: a
fraction of the 1 MB, which matters next to a training set in a size-limited
transfer; --all packs every header of cutlass/ and cute/ (with CUTLASS's
tools/util/include merged into the same tree).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# The wheel's include folder, and CUTLASS's tools/util/include (cutlass/util/..., which the
# Hopper collectives include), packed into one tree.
PREFIXES = ("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/")
TOPS = ("cutlass/", "cute/")


def header_files(wheel: Path | None):
    """(relative path, bytes) of every header under include/cutlass and include/cute."""
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                for prefix in PREFIXES:
                    rel = name[len(prefix):] if name.startswith(prefix) else ""
                    if rel.startswith(TOPS) and not name.endswith("/"):
                        yield rel, z.read(name)
        return
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        raise FileNotFoundError("nvidia-cutlass is not installed; pass its wheel")
    package = Path(list(spec.submodule_search_locations)[0])
    for prefix in PREFIXES:
        root = package / Path(prefix).relative_to("cutlass_library")
        for top in TOPS:
            for path in sorted((root / top).rglob("*")):
                if path.is_file():
                    yield path.relative_to(root).as_posix(), path.read_bytes()


CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The CUTLASS sources and the architectures each is built for.
SOURCES = ((CSRC / "msconv_cuda_cutlass.cu", ("80", "90")), (CSRC / "msconv_cuda_cutlass_sm90.cu", ("90a",)))


def used_headers(files: dict[str, bytes]) -> set[str] | None:
    """The headers the CUTLASS sources include, for the architectures they are built
    for (nvcc -M against these files unpacked), or None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", version)
    hopper = found is not None and int(found.group(1)) >= 12   # sm_90a: nvcc 12.0+, as CMakeLists.txt asks
    used = set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for source, arch in ((s, a) for s, archs in SOURCES for a in archs if hopper or a != "90a"):
            proc = subprocess.run(
                [nvcc, "-std=c++17", "-M", str(source), f"-I{CSRC}", "-isystem", str(root),
                 "-DFER_EDGE_WITH_CUDA", "-DFER_EDGE_WITH_CUTLASS", "-DFER_EDGE_WITH_CUTLASS_SM90", "-DNDEBUG",
                 "--expt-relaxed-constexpr", "-gencode", f"arch=compute_{arch},code=sm_{arch}"],
                capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(f"nvcc -M failed: {proc.stderr.strip()[-500:]}")
            for word in proc.stdout.replace("\\\n", " ").split():
                path = Path(word)
                if path.is_absolute() and path.is_relative_to(root):
                    used.add(path.relative_to(root).as_posix())
    return used | {"cutlass/version.h"}  # CMake reads the version from it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", nargs="?", type=Path, help="an nvidia-cutlass wheel (default: the installed package)")
    p.add_argument("--out", type=Path, default=Path(".data/cutlass-include.tar.xz"))
    p.add_argument("--all", action="store_true", help="every header, not only those the CUTLASS path includes")
    args = p.parse_args(argv)
    if args.wheel is not None and not args.wheel.is_file():
        print(f"cutlass_headers: {args.wheel} is not a file", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    # Written next to the target, then renamed: an interrupted run leaves no half archive.
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".part")
    try:
        files = dict(header_files(args.wheel))
        keep = None if args.all else used_headers(files)
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:xz") as tar:
            for rel, data in sorted(files.items()):
                if keep is not None and rel not in keep:
                    continue
                info = tarfile.TarInfo(rel)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                count += 1
    except (zipfile.BadZipFile, OSError) as exc:
        print(f"cutlass_headers: cannot read {args.wheel or 'the installed package'}: {exc}", file=sys.stderr)
        return 2
    else:
        if count == 0:
            print("cutlass_headers: no CUTLASS headers found there", file=sys.stderr)
            return 2
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"{args.out}: {count} headers, {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
