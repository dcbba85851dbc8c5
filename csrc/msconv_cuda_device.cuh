// Device helpers shared by the CUDA kernels of the fused multi-scale
// convolution (msconv_cuda.cu, msconv_cuda_splitk.cu): float32 accumulation
// whatever the storage type, and the epilogue's channel mapping.
#pragma once

#include <cuda_fp16.h>

#include "msconv.h"

namespace fer_edge {
namespace device {

// A launch's shapes, as the tiled kernels read them: n0 = the first image of
// this launch (gridDim.z is limited to 65535), tiles_w = output tiles per row.
struct Dims {
  int n0, C, H, W, c1, c3, c5, ctot, tiles_w;
  bool relu;
};

inline Dims make_dims(const MsConvArgs& a, int tile_w) {
  Dims d{};
  d.C = static_cast<int>(a.c);
  d.H = static_cast<int>(a.h);
  d.W = static_cast<int>(a.w);
  d.c1 = static_cast<int>(a.c1);
  d.c3 = static_cast<int>(a.c3);
  d.c5 = static_cast<int>(a.c5);
  d.ctot = d.c1 + d.c3 + d.c5;
  d.tiles_w = (d.W + tile_w - 1) / tile_w;
  d.relu = a.relu;
  return d;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// ReLU that keeps NaN, like torch.relu.
__device__ __forceinline__ float relu_keep_nan(float v) { return v > 0.f ? v : (v == v ? 0.f : v); }

// Bias of combined channel co (packed order [c5 | c3 | c1]) and, in oc, its
// channel in the concatenated output [c1 | c3 | c5].  S: any shape with c1, c3, c5.
template <typename T, typename S>
__device__ __forceinline__ float bias_and_channel(int co, const S& d, const T* b1, const T* b3, const T* b5,
                                                  int& oc) {
  if (co < d.c5) {
    oc = d.c1 + d.c3 + co;
    return to_f(b5[co]);
  }
  if (co < d.c5 + d.c3) {
    oc = d.c1 + (co - d.c5);
    return to_f(b3[co - d.c5]);
  }
  oc = co - d.c5 - d.c3;
  return to_f(b1[co - d.c5 - d.c3]);
}

}  // namespace device
}  // namespace fer_edge
