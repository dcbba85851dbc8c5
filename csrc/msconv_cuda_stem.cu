// The "stem" kernel (see msconv_cuda_stem.h): a block owns a 16x16 tile of
// output pixels (16x4 when 16x16 tiles would leave most SMs idle, as at
// batch 1) and 64 combined output channels.  It stages the input tile
// with its 2-pixel halo and the block's weights (all taps, every input
// channel) in shared memory once, then each thread computes 8 consecutive
// combined channels of 4 neighbouring pixels of a row, only over the taps of
// their branch's window (one weight load serves 4 pixels: shared-memory
// loads, not multiplies, bound such a thin layer), and writes them out: 16
// contiguous bytes per pixel in NHWC, scalar stores that neighbouring
// threads complete into whole lines in NCHW.
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
constexpr int PX = 4;                    // neighbouring pixels of one row per thread
constexpr int QW = TW / PX;              // such runs per tile row
constexpr int CB = 64;                   // combined channels per block
constexpr int GROUPS = CB / CPT;
// One (run of PX pixels, channel group) per thread and pass: 256 threads, fewer for a small tile.
__host__ __device__ constexpr int threads_for(int th) { return th * QW * GROUPS < 256 ? th * QW * GROUPS : 256; }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fused_ms_conv (stem): ") + what + ": " +
                                                 cudaGetErrorString(e));
}

// acc[p][j] += the window of radius R around pixel (py, px0 + p) of every
// input channel times the weight of the thread's channel j (the packed 5x5
// taps of that window).  Each weight pair is loaded once for PX pixels, and
// each input row segment once for the 2R + 1 taps along it.
template <int R, int IH>
__device__ __forceinline__ void accumulate(float (&acc)[PX][CPT], const float* s_in, const float* s_w, int C,
                                           int py, int px0, int g) {
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int dy = -R; dy <= R; ++dy) {
      float row[PX + 2 * R];  // columns px0 - R .. px0 + PX - 1 + R of the staged tile
      const float* src = s_in + (c * IH + py + 2 + dy) * IW + px0 + 2 - R;
#pragma unroll
      for (int i = 0; i < PX + 2 * R; ++i) row[i] = src[i];
#pragma unroll
      for (int dx = -R; dx <= R; ++dx) {
        const int tap = (2 + dy) * 5 + (2 + dx);
        const float4* w = reinterpret_cast<const float4*>(s_w + ((tap * C + c) * CB + g * CPT));
        const float4 a = w[0], b = w[1];
        const float wv[CPT] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int p = 0; p < PX; ++p) {
#pragma unroll
          for (int j = 0; j < CPT; ++j) acc[p][j] += row[p + dx + R] * wv[j];
        }
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
__global__ void __launch_bounds__(threads_for(TH))
stem_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ wp, const T* __restrict__ b1,
            const T* __restrict__ b3, const T* __restrict__ b5, Dims d) {
  extern __shared__ float4 smem4[];  // float4: the weight rows are read as float4
  float* s_w = reinterpret_cast<float*>(smem4);  // [25][C][CB]
  constexpr int IH = TH + 4, THREADS = threads_for(TH);
  constexpr int QUADS = TH * QW, ITEMS = QUADS * GROUPS;  // (PX pixels of a row, channel group) pairs
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
    // NHWC: channel groups fastest (a warp writes whole 128-byte lines of 4 pixels' channels);
    // NCHW: pixel runs fastest (a channel's stores of a warp cover 128 neighbouring pixels).
    const int g = NHWC ? item % GROUPS : item / QUADS;
    const int q = NHWC ? item / GROUPS : item % QUADS;
    const int py = q / QW, px0 = (q % QW) * PX;
    const int oh = ty0 + py, ow0 = tx0 + px0;
    const int co0 = cb0 + g * CPT;
    if (oh >= H || ow0 >= W || co0 >= d.ctot) continue;
    float acc[PX][CPT];
#pragma unroll
    for (int p = 0; p < PX; ++p)
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[p][j] = 0.f;
    // Combined channels run [c5 | c3 | c1]: the group's first channel has the widest window.
    if (co0 < d.c5) accumulate<2, IH>(acc, s_in, s_w, C, py, px0, g);
    else if (co0 < d.c5 + d.c3) accumulate<1, IH>(acc, s_in, s_w, C, py, px0, g);
    else accumulate<0, IH>(acc, s_in, s_w, C, py, px0, g);

    int oc[CPT];
    float bias[CPT];
    bool contiguous = vector_ok && co0 + CPT <= d.ctot;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      bias[j] = bias_and_channel(min(co0 + j, d.ctot - 1), d, b1, b3, b5, oc[j]);
      contiguous = contiguous && oc[j] == oc[0] + j;
    }
    contiguous = contiguous && oc[0] % CPT == 0;
#pragma unroll
    for (int p = 0; p < PX; ++p) {
      const int ow = ow0 + p;
      if (ow >= W) break;  // a partial run at the right edge (its extra columns read the zero halo)
      float v[CPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const float t = acc[p][j] + bias[j];
        v[j] = d.relu ? relu_keep_nan(t) : t;
      }
      const long long pix = (static_cast<long long>(n) * H + oh) * W + ow;
      if (contiguous) {
        Pack8<T>::store(out + pix * d.ctot + oc[0], v);
      } else {
        for (int j = 0; j < CPT && co0 + j < d.ctot; ++j) {
          const long long at = NHWC ? pix * d.ctot + oc[j]
                                    : ((static_cast<long long>(n) * d.ctot + oc[j]) * H + oh) * W + ow;
          out[at] = from_f<T>(v[j]);
        }
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
    stem_kernel<T, NHWC, TH><<<dim3(tiles, cblocks, nz), threads_for(TH), smem, s>>>(
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
