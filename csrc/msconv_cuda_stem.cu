// The "stem" kernel (see msconv_cuda_stem.h): a block owns a 16x16 tile of
// output pixels (16x4 when 16x16 tiles would leave most SMs idle, as at
// batch 1) and 64 combined output channels.  It stages the input tile
// with its 2-pixel halo and the block's weights (all taps, every input
// channel) in shared memory once, then each thread computes 8 consecutive
// combined channels of one pixel at a time, only over the taps of their
// branch's window, and writes them out: 16 contiguous bytes per thread in
// NHWC (a warp covers 4 neighbouring pixels' 64 channels), or 8 stores that
// are each coalesced across a warp's 32 pixels in NCHW.
#include "msconv_cuda_stem.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "msconv_cuda_device.cuh"

namespace fer_edge {
namespace stem {
namespace {
using device::bias_and_channel;
using device::Dims;
using device::from_f;
using device::make_dims;
using device::relu_keep_nan;
using device::to_f;

constexpr int TW = 16;                   // output tile width; height TH: 16 or 4 (template)
constexpr int IW = TW + 4;               // with the 5x5 window's halo
constexpr int CPT = 8;                   // channels per thread
constexpr int CB = 64;                   // combined channels per block
constexpr int GROUPS = CB / CPT;
constexpr int THREADS = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fused_ms_conv (stem): ") + what + ": " +
                                                 cudaGetErrorString(e));
}

// acc[j] += the window of radius R around (py, px) of every input channel times
// the weights of the thread's 8 channels (the packed 5x5 taps of that window).
template <int R, int IH>
__device__ __forceinline__ void accumulate(float (&acc)[CPT], const float* s_in, const float* s_w, int C,
                                           int py, int px, int g) {
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int dy = -R; dy <= R; ++dy) {
#pragma unroll
      for (int dx = -R; dx <= R; ++dx) {
        const float v = s_in[(c * IH + py + 2 + dy) * IW + px + 2 + dx];
        const int tap = (2 + dy) * 5 + (2 + dx);
        const float4* w = reinterpret_cast<const float4*>(s_w + ((tap * C + c) * CB + g * CPT));
        const float4 a = w[0], b = w[1];
        acc[0] += v * a.x; acc[1] += v * a.y; acc[2] += v * a.z; acc[3] += v * a.w;
        acc[4] += v * b.x; acc[5] += v * b.y; acc[6] += v * b.z; acc[7] += v * b.w;
      }
    }
  }
}

template <typename T> struct Pack8;  // 8 values of T as one or two 16-byte stores
template <> struct Pack8<__half> {
  static __device__ __forceinline__ void store(__half* p, const float (&v)[CPT]) {
    __align__(16) __half2 h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
  }
};
template <> struct Pack8<float> {
  static __device__ __forceinline__ void store(float* p, const float (&v)[CPT]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <typename T, bool NHWC, int TH>
__global__ void __launch_bounds__(THREADS)
stem_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ wp, const T* __restrict__ b1,
            const T* __restrict__ b3, const T* __restrict__ b5, Dims d) {
  extern __shared__ float4 smem4[];  // float4: the weight rows are read as float4
  float* s_w = reinterpret_cast<float*>(smem4);  // [25][C][CB]
  constexpr int NPIX = TH * TW, IH = TH + 4;
  constexpr int ITEMS = NPIX * GROUPS;           // (pixel, channel group) pairs per block
  float* s_in = s_w + 25 * d.C * CB;             // [C][IH][IW]

  const int tid = threadIdx.x;
  const int ty0 = (blockIdx.x / d.tiles_w) * TH, tx0 = (blockIdx.x % d.tiles_w) * TW;
  const int cb0 = blockIdx.y * CB;
  const int n = d.n0 + blockIdx.z;
  const int C = d.C, H = d.H, W = d.W;

  // Weights: packed (25, C, ctot) -> (25, C, CB) for this block's channels, zero past ctot.
  for (int i = tid; i < 25 * C * CB; i += THREADS) {
    const int j = i % CB, tc = i / CB;  // tc = tap * C + c
    const int co = cb0 + j;
    s_w[i] = co < d.ctot ? to_f(wp[static_cast<long long>(tc) * d.ctot + co]) : 0.f;
  }
  // Input tile with halo, zero outside the image.
  for (int i = tid; i < C * IH * IW; i += THREADS) {
    int c, yy, xx;
    if (NHWC) {
      c = i % C;
      yy = (i / C) / IW;
      xx = (i / C) % IW;
    } else {
      c = i / (IH * IW);
      yy = (i % (IH * IW)) / IW;
      xx = i % IW;
    }
    const int ih = ty0 + yy - 2, iw = tx0 + xx - 2;
    float v = 0.f;
    if (ih >= 0 && ih < H && iw >= 0 && iw < W)
      v = to_f(x[NHWC ? ((static_cast<long long>(n) * H + ih) * W + iw) * C + c
                      : ((static_cast<long long>(n) * C + c) * H + ih) * W + iw]);
    s_in[(c * IH + yy) * IW + xx] = v;
  }
  __syncthreads();

  const bool vector_ok = NHWC && (d.ctot % CPT == 0);
  for (int item = tid; item < ITEMS; item += THREADS) {
    // NHWC: channel groups fastest (a warp writes 4 pixels' channels contiguously);
    // NCHW: pixels fastest (each channel's store is coalesced over 32 pixels).
    const int g = NHWC ? item % GROUPS : item / NPIX;
    const int p = NHWC ? item / GROUPS : item % NPIX;
    const int py = p / TW, px = p % TW;
    const int oh = ty0 + py, ow = tx0 + px;
    const int co0 = cb0 + g * CPT;
    if (oh >= H || ow >= W || co0 >= d.ctot) continue;
    float acc[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[j] = 0.f;
    // Combined channels run [c5 | c3 | c1]: the group's first channel has the widest window.
    if (co0 < d.c5) accumulate<2, IH>(acc, s_in, s_w, C, py, px, g);
    else if (co0 < d.c5 + d.c3) accumulate<1, IH>(acc, s_in, s_w, C, py, px, g);
    else accumulate<0, IH>(acc, s_in, s_w, C, py, px, g);

    int oc[CPT];
    bool contiguous = vector_ok && co0 + CPT <= d.ctot;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int co = min(co0 + j, d.ctot - 1);
      const float v = acc[j] + bias_and_channel(co, d, b1, b3, b5, oc[j]);
      acc[j] = d.relu ? relu_keep_nan(v) : v;
      contiguous = contiguous && oc[j] == oc[0] + j;
    }
    const long long pix = (static_cast<long long>(n) * H + oh) * W + ow;
    if (contiguous && oc[0] % CPT == 0) {
      Pack8<T>::store(out + pix * d.ctot + oc[0], acc);
    } else {
      for (int j = 0; j < CPT && co0 + j < d.ctot; ++j) {
        const long long at = NHWC ? pix * d.ctot + oc[j]
                                  : ((static_cast<long long>(n) * d.ctot + oc[j]) * H + oh) * W + ow;
        out[at] = from_f<T>(acc[j]);
      }
    }
  }
}

template <typename T, bool NHWC, int TH>
void launch_tiles(const MsConvArgs& a, cudaStream_t s) {
  Dims d = make_dims(a, TW);
  const int tiles = d.tiles_w * ((d.H + TH - 1) / TH);
  const unsigned cblocks = static_cast<unsigned>((d.ctot + CB - 1) / CB);
  const size_t smem = sizeof(float) * (25 * d.C * CB + d.C * (TH + 4) * IW);  // <= 32 KB for C <= 4
  for (long long n0 = 0; n0 < a.n; n0 += 65535) {  // gridDim.z is limited to 65535
    d.n0 = static_cast<int>(n0);
    const unsigned nz = static_cast<unsigned>(std::min<long long>(65535, a.n - n0));
    stem_kernel<T, NHWC, TH><<<dim3(tiles, cblocks, nz), THREADS, smem, s>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), reinterpret_cast<const T*>(a.wp),
        reinterpret_cast<const T*>(a.b1), reinterpret_cast<const T*>(a.b3), reinterpret_cast<const T*>(a.b5), d);
    check(cudaGetLastError(), "kernel launch");
  }
}

// 16x16 tiles, or 16x4 where 16x16 ones would give fewer than two blocks per SM.
template <typename T, bool NHWC>
void launch_typed(const MsConvArgs& a, cudaStream_t s, int sm_count) {
  const long long blocks16 = ((a.w + TW - 1) / TW) * ((a.h + 15) / 16) * ((a.c1 + a.c3 + a.c5 + CB - 1) / CB) * a.n;
  if (blocks16 < 2LL * sm_count)
    launch_tiles<T, NHWC, 4>(a, s);
  else
    launch_tiles<T, NHWC, 16>(a, s);
}

}  // namespace

void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int sm_count) {
  if (a.c > MAX_C)
    throw std::invalid_argument("fused_ms_conv: the stem kernel takes at most " + std::to_string(MAX_C) +
                                " input channels, got " + std::to_string(a.c));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool nhwc = a.layout == Layout::NHWC;
  if (dtype == DType::Float16)
    nhwc ? launch_typed<__half, true>(a, s, sm_count) : launch_typed<__half, false>(a, s, sm_count);
  else
    nhwc ? launch_typed<float, true>(a, s, sm_count) : launch_typed<float, false>(a, s, sm_count);
}

}  // namespace stem
}  // namespace fer_edge
