# Sourced by the GPU scripts before they build.  GPU_ARCH: the local GPU's architecture as a
# number (e.g. 90), which the build names rather than "native" so that CMake knows it (the
# Hopper CUTLASS path is built only for a list that names 90).
GPU_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
[[ "$GPU_ARCH" =~ ^[0-9]+$ ]] || GPU_ARCH=native
# A machine without internet cannot
# fetch nvidia-cutlass, so the headers packed by benchmarks/cutlass_headers.py
# (.data/cutlass-include.tar.xz) are unpacked and named to CMake through
# FER_EDGE_CUTLASS_INCLUDE.  Without the archive the build goes on without the
# large-batch CUTLASS path (or finds an installed nvidia-cutlass).
if [ -f .data/cutlass-include.tar.xz ]; then
  mkdir -p build/cutlass-include && tar xJf .data/cutlass-include.tar.xz -C build/cutlass-include \
    && export FER_EDGE_CUTLASS_INCLUDE="$PWD/build/cutlass-include"
fi
