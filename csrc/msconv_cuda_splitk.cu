// Small-batch CUDA kernel of the fused multi-scale convolution ("splitk").
//
// At batch 1-8 a MACNN layer has too few output pixels to fill a GPU with
// one block per output tile: L4 at batch 1 is 36 pixels x 512 channels.  Its
// cost is latency, and its largest operand is the weights (up to 6.5 MB in
// fp16), which must be read once, by many SMs at the same time.  So:
//
//   * the GEMM's M is every output pixel of the batch (n x H x W, flattened),
//     N the combined output channels [c5 | c3 | c1] (packed weights' order),
//     K the input channels x the 25 taps;
//   * the grid is (M tiles, N tiles, K splits): the input channels are split
//     over gridDim.z until there are about two blocks per SM, so every SM
//     streams its own slice of the weights once;
//   * a block stages KC input channels' weights (only the taps its channels
//     use: 1 for a 1x1-only block, 9 for 3x3, 25 otherwise) in shared memory,
//     and the input those taps read for its pixels (an im2col gather, zero
//     outside the image): every load of a stage is independent of the others,
//     so they overlap, where reading the input inside the multiply loop made
//     each thread wait on one load after another (Nsight Compute: 164 us for
//     L2 at batch 1, 26% occupancy) and loaded each value once per channel
//     group.  Each thread then accumulates 8 channels of one pixel from shared
//     memory, the window size being a compile-time constant (unrolled taps);
//   * split-K partial sums go to a float32 workspace; the last block of a
//     tile to finish (a counter per tile, reset by that block, so the kernel
//     is re-entrant and CUDA-graph safe) adds them, the bias and the ReLU,
//     and writes its slice of the concatenated output.  One launch, no memset.
#include "msconv.h"
#include "msconv_cuda_device.cuh"
#include "msconv_cuda_splitk.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

namespace fer_edge {
namespace splitk {
namespace {
using device::bias_and_channel;
using device::from_f;
using device::relu_keep_nan;
using device::to_f;


struct Shape {
  int N, C, H, W, c1, c3, c5, ctot, M, splits, kslice;
  bool relu;
};

// The taps a block of combined channels [co0, co0 + TN) needs (packed order
// [c5 | c3 | c1]): the 1x1 part uses the centre only, the 3x3 part the inner
// 3x3 (which holds the centre too), anything with 5x5 channels all 25.
__device__ __forceinline__ int window_of(int co0, const Shape& s) {
  if (co0 >= s.c5) return co0 >= s.c5 + s.c3 ? 1 : 3;
  return 5;
}

// What a block and each of its threads work on:
// a warp is 32 pixels of one channel group; the block's pixels go to shared
// memory for the gathers (n = -1: past the batch).
struct Block {
  int tid, pm, cg, m, co0, ci_begin, ci_end, win, n, oy, ox;
  bool valid;
};

__device__ __forceinline__ Block block_of(const Shape& s, int* s_n, int* s_y, int* s_x) {
  Block b{};
  b.tid = threadIdx.x;
  b.pm = b.tid % TM;
  b.cg = b.tid / TM;
  b.m = blockIdx.x * TM + b.pm;  // flattened output pixel (n, y, x)
  b.co0 = blockIdx.y * TN;
  b.ci_begin = blockIdx.z * s.kslice;
  b.ci_end = min(s.C, b.ci_begin + s.kslice);
  b.win = window_of(b.co0, s);
  b.valid = b.m < s.M;
  if (b.valid) {
    b.n = b.m / (s.H * s.W);
    const int p = b.m % (s.H * s.W);
    b.oy = p / s.W;
    b.ox = p % s.W;
  }
  if (b.tid < TM) {
    s_n[b.tid] = b.valid ? b.n : -1;
    s_y[b.tid] = b.oy;
    s_x[b.tid] = b.ox;
  }
  __syncthreads();
  return b;
}

// A thread's j-th channel in its block: 8 consecutive ones per channel group,
// so the SIMT multiply reads a thread's 8 weights as two float4s (a warp is one
// channel group: a broadcast).
static_assert(CPT == 8, "the multiply reads a thread's weights as two float4s");
__device__ __forceinline__ int channel_of(int cg, int j) { return cg * CPT + j; }

// The end of a block: acc holds channels co0 +
// channel_of(cg, j) of pixel m.  With split-K, publish the partial sums; the tile's
// last block to arrive (a counter per tile, reset by that block, so the kernel
// is re-entrant and CUDA-graph safe) adds them all, then bias, ReLU and the
// store into the concatenated output.  Every thread of the block calls it.
template <typename T, bool NHWC>
__device__ __forceinline__ void finish(float* acc, bool valid, int m, int n, int oy, int ox, int co0, int cg,
                                       const Shape& s, T* __restrict__ out, const T* __restrict__ b1,
                                       const T* __restrict__ b3, const T* __restrict__ b5, float* __restrict__ ws,
                                       int* __restrict__ counters, int* s_last) {
  const int tid = threadIdx.x;
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (s.splits > 1) {
    if (valid) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int co = co0 + channel_of(cg, j);
        // [split][channel][pixel]: a warp's 32 consecutive pixels are 128 contiguous bytes.
        if (co < s.ctot) ws[(static_cast<long long>(blockIdx.z) * s.ctot + co) * s.M + m] = acc[j];
      }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) *s_last = atomicAdd(&counters[tile], 1) == s.splits - 1;
    __syncthreads();
    if (!*s_last) return;
    __threadfence();
    if (valid) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int co = co0 + channel_of(cg, j);
        if (co >= s.ctot) continue;
        float v = 0.f;
        for (int z = 0; z < s.splits; ++z)  // .cg: straight from L2, never a stale L1 line
          v += __ldcg(&ws[(static_cast<long long>(z) * s.ctot + co) * s.M + m]);
        acc[j] = v;
      }
    }
    if (tid == 0) counters[tile] = 0;  // ready for the next launch (and the next graph replay)
  }
  if (!valid) return;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int co = co0 + channel_of(cg, j);
    if (co >= s.ctot) continue;
    int oc;
    const float bias = bias_and_channel(co, s, b1, b3, b5, oc);
    float v = acc[j] + bias;
    if (s.relu) v = relu_keep_nan(v);
    out[NHWC ? static_cast<long long>(m) * s.ctot + oc
             : ((static_cast<long long>(n) * s.ctot + oc) * s.H + oy) * s.W + ox] = from_f<T>(v);
  }
}

// 16 bytes of packed weights at once (8 halves or 4 floats): allowed when every
// row of wp starts 16-byte aligned (ctot a multiple of the vector, wp aligned),
// a per-launch fact; otherwise the stages load one weight at a time.
template <typename T>
__host__ __device__ constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T>
__device__ __forceinline__ bool vector_weights(const T* wp, const Shape& s) {
  return s.ctot % vec_of<T>() == 0 && reinterpret_cast<std::uintptr_t>(wp) % 16 == 0;
}

// One shared-memory stage of KC input channels [ci0, ci0 + KC) for a block whose
// channels read a WIN x WIN window (offset OFF into the 5x5 taps): gather the
// input its pixels read and the weights, then accumulate.
template <int WIN, typename T, bool NHWC>
__device__ __forceinline__ void stage(const T* __restrict__ x, const T* __restrict__ wp, const Shape& s,
                                      int ci0, int ci_end, int co0, const int* s_n, const int* s_y,
                                      const int* s_x, float (*s_in)[KC][TM], float (*s_w)[KC][TN],
                                      int tid, int pm, int cg, float* acc) {
  constexpr int OFF = (5 - WIN) / 2, NT = WIN * WIN;
  // Input: element e -> (tap, channel, pixel); channels fastest in NHWC (adjacent
  // in memory), pixels fastest in NCHW.  Pixels past the batch and taps outside
  // the image stage zeros, so the multiply loop has no branch.
  for (int e = tid; e < NT * KC * TM; e += THREADS) {
    int k, p;
    if (NHWC) { k = e % KC; p = (e / KC) % TM; } else { p = e % TM; k = (e / TM) % KC; }
    const int t = e / (KC * TM);
    const int ci = ci0 + k, n = s_n[p];
    const int iy = s_y[p] + OFF + t / WIN - 2, ix = s_x[p] + OFF + t % WIN - 2;
    float v = 0.f;
    if (n >= 0 && ci < ci_end && iy >= 0 && iy < s.H && ix >= 0 && ix < s.W)
      v = to_f(x[NHWC ? ((static_cast<long long>(n) * s.H + iy) * s.W + ix) * s.C + ci
                      : ((static_cast<long long>(n) * s.C + ci) * s.H + iy) * s.W + ix]);
    s_in[t][k][p] = v;
  }
  // Weights: consecutive threads read consecutive output channels (coalesced).
  if (vector_weights(wp, s)) {
    constexpr int V = vec_of<T>(), TNV = TN / V;
    for (int e = tid; e < NT * KC * TNV; e += THREADS) {
      const int jv = e % TNV, k = (e / TNV) % KC, t = e / (TNV * KC);
      const int tap = (OFF + t / WIN) * 5 + OFF + t % WIN;
      const int ci = ci0 + k, co = co0 + jv * V;  // co % V == 0 and ctot % V == 0: all V in or all out
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (ci < ci_end && co < s.ctot)
        raw = *reinterpret_cast<const uint4*>(wp + (static_cast<long long>(tap) * s.C + ci) * s.ctot + co);
      const T* v = reinterpret_cast<const T*>(&raw);
      // float4 stores: scalar ones V floats apart would put V threads on one bank.
      float4* dst = reinterpret_cast<float4*>(&s_w[t][k][jv * V]);
#pragma unroll
      for (int i = 0; i < V / 4; ++i)
        dst[i] = make_float4(to_f(v[4 * i]), to_f(v[4 * i + 1]), to_f(v[4 * i + 2]), to_f(v[4 * i + 3]));
    }
  } else {
    for (int e = tid; e < NT * KC * TN; e += THREADS) {
      const int j = e % TN, k = (e / TN) % KC, t = e / (TN * KC);
      const int tap = (OFF + t / WIN) * 5 + OFF + t % WIN;
      const int ci = ci0 + k, co = co0 + j;
      s_w[t][k][j] = (ci < ci_end && co < s.ctot) ? to_f(wp[(static_cast<long long>(tap) * s.C + ci) * s.ctot + co])
                                                   : 0.f;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < KC; ++k) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float xv = s_in[t][k][pm];  // a warp: 32 consecutive pixels, no bank conflict
      const float4* w4 = reinterpret_cast<const float4*>(&s_w[t][k][channel_of(cg, 0)]);  // broadcast
      const float4 wa = w4[0], wb = w4[1];
      acc[0] = fmaf(xv, wa.x, acc[0]);
      acc[1] = fmaf(xv, wa.y, acc[1]);
      acc[2] = fmaf(xv, wa.z, acc[2]);
      acc[3] = fmaf(xv, wa.w, acc[3]);
      acc[4] = fmaf(xv, wb.x, acc[4]);
      acc[5] = fmaf(xv, wb.y, acc[5]);
      acc[6] = fmaf(xv, wb.z, acc[6]);
      acc[7] = fmaf(xv, wb.w, acc[7]);
    }
  }
  __syncthreads();
}

template <typename T, bool NHWC>
__global__ void __launch_bounds__(THREADS)
splitk_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ wp,
              const T* __restrict__ b1, const T* __restrict__ b3, const T* __restrict__ b5,
              float* __restrict__ ws, int* __restrict__ counters, Shape s) {
  __shared__ __align__(16) float s_w[25][KC][TN];
  __shared__ float s_in[25][KC][TM];
  __shared__ int s_n[TM], s_y[TM], s_x[TM];
  __shared__ int s_last;

  const auto [tid, pm, cg, m, co0, ci_begin, ci_end, win, n, oy, ox, valid] = block_of(s, s_n, s_y, s_x);
  float acc[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) acc[j] = 0.f;

  for (int ci0 = ci_begin; ci0 < ci_end; ci0 += KC) {
    if (win == 1)
      stage<1, T, NHWC>(x, wp, s, ci0, ci_end, co0, s_n, s_y, s_x, s_in, s_w, tid, pm, cg, acc);
    else if (win == 3)
      stage<3, T, NHWC>(x, wp, s, ci0, ci_end, co0, s_n, s_y, s_x, s_in, s_w, tid, pm, cg, acc);
    else
      stage<5, T, NHWC>(x, wp, s, ci0, ci_end, co0, s_n, s_y, s_x, s_in, s_w, tid, pm, cg, acc);
  }

  finish<T, NHWC>(acc, valid, m, n, oy, ox, co0, cg, s, out, b1, b3, b5, ws, counters, &s_last);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fused_ms_conv (splitk): ") + what + ": " +
                                                 cudaGetErrorString(e));
}

}  // namespace

int sm_count_of(int dev) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream_handle, int sm_count, std::uintptr_t workspace,
            std::uintptr_t counters) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const std::int64_t ctot = a.c1 + a.c3 + a.c5;
  const Plan p = plan(a.n, a.c, a.h, a.w, ctot, sm_count);
  if (p.splits > 1 && (!workspace || !counters))
    throw std::invalid_argument("fused_ms_conv (splitk): this shape needs a workspace and counters "
                                "(fer_edge.kernels allocates them from splitk_plan)");
  // Pixel indices are 32-bit: the last tile's blockIdx.x * TM + 31 must not overflow.
  if (a.n * a.h * a.w > static_cast<std::int64_t>(INT_MAX) - TM || p.n_tiles > 65535 || p.splits > 65535)
    throw std::invalid_argument("fused_ms_conv (splitk): shape too large for the small-batch kernel");
  Shape s{};
  s.N = static_cast<int>(a.n);
  s.C = static_cast<int>(a.c);
  s.H = static_cast<int>(a.h);
  s.W = static_cast<int>(a.w);
  s.c1 = static_cast<int>(a.c1);
  s.c3 = static_cast<int>(a.c3);
  s.c5 = static_cast<int>(a.c5);
  s.ctot = static_cast<int>(ctot);
  s.M = static_cast<int>(a.n * a.h * a.w);
  s.splits = p.splits;
  s.kslice = p.kslice;
  s.relu = a.relu;
  const dim3 grid(p.m_tiles, p.n_tiles, p.splits);
  float* ws = reinterpret_cast<float*>(workspace);
  int* cnt = reinterpret_cast<int*>(counters);
  const bool nhwc = a.layout == Layout::NHWC;
  if (dtype == DType::Float32) {
    auto k = nhwc ? splitk_kernel<float, true> : splitk_kernel<float, false>;
    k<<<grid, THREADS, 0, stream>>>(reinterpret_cast<const float*>(a.x), reinterpret_cast<float*>(a.out),
                                    reinterpret_cast<const float*>(a.wp), reinterpret_cast<const float*>(a.b1),
                                    reinterpret_cast<const float*>(a.b3), reinterpret_cast<const float*>(a.b5),
                                    ws, cnt, s);
  } else {
    auto k = nhwc ? splitk_kernel<__half, true> : splitk_kernel<__half, false>;
    k<<<grid, THREADS, 0, stream>>>(reinterpret_cast<const __half*>(a.x), reinterpret_cast<__half*>(a.out),
                                    reinterpret_cast<const __half*>(a.wp), reinterpret_cast<const __half*>(a.b1),
                                    reinterpret_cast<const __half*>(a.b3), reinterpret_cast<const __half*>(a.b5),
                                    ws, cnt, s);
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace splitk
}  // namespace fer_edge
