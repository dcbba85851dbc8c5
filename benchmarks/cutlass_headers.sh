# Sourced by the GPU scripts before they build: a machine without internet cannot
# fetch nvidia-cutlass, so the headers packed by benchmarks/cutlass_headers.py
# (.data/cutlass-include.tar.xz) are unpacked and named to CMake through
# FER_EDGE_CUTLASS_INCLUDE.  Without the archive the build goes on without the
# large-batch CUTLASS path (or finds an installed nvidia-cutlass).
if [ -f .data/cutlass-include.tar.xz ]; then
  mkdir -p build/cutlass-include && tar xJf .data/cutlass-include.tar.xz -C build/cutlass-include \
    && export FER_EDGE_CUTLASS_INCLUDE="$PWD/build/cutlass-include"
fi
