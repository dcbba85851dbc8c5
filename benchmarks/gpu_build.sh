# Sourced by the GPU scripts: `gpu_build PIP_ARGS...` builds the CUDA kernels for the local GPU
# with pip (PIP_ARGS: "install ." or "wheel . -w DIR", plus pip options).
#  - GPU_ARCH: the local GPU's architecture as a number (e.g. 90), named rather than "native" so
#    that CMake knows it (the Hopper CUTLASS path is built only for a list that names 90).
#  - CUTLASS's headers: a machine without internet cannot fetch nvidia-cutlass, so those packed
#    by benchmarks/cutlass_headers.py (.data/cutlass-include.tar.xz) are unpacked and named to
#    CMake (FER_EDGE_CUTLASS_INCLUDE).  Should the build fail with them, it is retried without
#    the CUTLASS paths: the other kernels are still checked and timed.
GPU_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
[[ "$GPU_ARCH" =~ ^[0-9]+$ ]] || GPU_ARCH=native
if [ -f .data/cutlass-include.tar.xz ]; then
  mkdir -p build/cutlass-include && tar xJf .data/cutlass-include.tar.xz -C build/cutlass-include \
    && export FER_EDGE_CUTLASS_INCLUDE="$PWD/build/cutlass-include"
fi

gpu_build() {
  mkdir -p build   # a fresh checkout has none; the log below goes there
  local common=(--no-build-isolation --no-deps -C cmake.define.FER_EDGE_CUDA=ON
                -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$GPU_ARCH" -C build-dir=build/native)
  if ! timeout 300 python3 -m pip "$@" "${common[@]}" > build/gpu-build.log 2>&1; then
    tail -15 build/gpu-build.log
    echo "   build failed; again without the CUTLASS paths"
    FER_EDGE_CUTLASS_INCLUDE= timeout 300 python3 -m pip "$@" "${common[@]}" \
      -C cmake.define.FER_EDGE_CUTLASS=OFF > build/gpu-build.log 2>&1 || tail -15 build/gpu-build.log
  fi
  grep -E "fer_edge: .*(CUTLASS|cutlass)" build/gpu-build.log | sed 's/^ */   /'
}
