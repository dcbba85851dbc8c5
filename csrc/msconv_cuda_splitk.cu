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

// The taps a block of combined channels [co0, co0 + TN) needs: the 1x1 part
// uses the centre only, the 3x3 part the inner 3x3, anything with 5x5
// channels all 25.  Returns the first tap row/column and the window size.
__device__ __forceinline__ int window_of(int co0, const Shape& s) {
  const int co1 = min(co0 + TN, s.ctot);
  if (co0 >= s.c5 + s.c3) return 1;            // 1x1 channels only
  if (co0 >= s.c5 && co1 <= s.c5 + s.c3) return 3;
  return 5;
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
  for (int e = tid; e < NT * KC * TN; e += THREADS) {
    const int j = e % TN, k = (e / TN) % KC, t = e / (TN * KC);
    const int tap = (OFF + t / WIN) * 5 + OFF + t % WIN;
    const int ci = ci0 + k, co = co0 + j;
    s_w[t][k][j] = (ci < ci_end && co < s.ctot) ? to_f(wp[(static_cast<long long>(tap) * s.C + ci) * s.ctot + co])
                                                 : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < KC; ++k) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float xv = s_in[t][k][pm];  // a warp: 32 consecutive pixels, no bank conflict
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[j] = fmaf(xv, s_w[t][k][cg + CGROUPS * j], acc[j]);  // broadcast
    }
  }
  __syncthreads();
}

template <typename T, bool NHWC>
__global__ void __launch_bounds__(THREADS)
splitk_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ wp,
              const T* __restrict__ b1, const T* __restrict__ b3, const T* __restrict__ b5,
              float* __restrict__ ws, int* __restrict__ counters, Shape s) {
  __shared__ float s_w[25][KC][TN];
  __shared__ float s_in[25][KC][TM];
  __shared__ int s_n[TM], s_y[TM], s_x[TM];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int pm = tid % TM, cg = tid / TM;           // a warp: 32 pixels, one channel group
  const int m = blockIdx.x * TM + pm;               // flattened output pixel (n, y, x)
  const int co0 = blockIdx.y * TN;
  const int ci_begin = blockIdx.z * s.kslice;
  const int ci_end = min(s.C, ci_begin + s.kslice);
  const int win = window_of(co0, s);

  int n = 0, oy = 0, ox = 0;
  const bool valid = m < s.M;
  if (valid) {
    n = m / (s.H * s.W);
    const int p = m % (s.H * s.W);
    oy = p / s.W;
    ox = p % s.W;
  }
  if (tid < TM) {  // the block's pixels, for the gathers (n = -1: past the batch)
    s_n[tid] = valid ? n : -1;
    s_y[tid] = oy;
    s_x[tid] = ox;
  }
  __syncthreads();
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

  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (s.splits > 1) {
    // Publish this split's partial sums, then let the tile's last block finish it.
    if (valid) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int co = co0 + cg + CGROUPS * j;
        if (co < s.ctot) ws[(static_cast<long long>(blockIdx.z) * s.M + m) * s.ctot + co] = acc[j];
      }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(&counters[tile], 1) == s.splits - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (valid) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int co = co0 + cg + CGROUPS * j;
        if (co >= s.ctot) continue;
        float v = 0.f;
        for (int z = 0; z < s.splits; ++z)  // .cg: straight from L2, never a stale L1 line
          v += __ldcg(&ws[(static_cast<long long>(z) * s.M + m) * s.ctot + co]);
        acc[j] = v;
      }
    }
    if (tid == 0) counters[tile] = 0;  // ready for the next launch (and the next graph replay)
  }
  if (!valid) return;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int co = co0 + cg + CGROUPS * j;
    if (co >= s.ctot) continue;
    int oc;
    const float bias = bias_and_channel(co, s, b1, b3, b5, oc);
    float v = acc[j] + bias;
    if (s.relu) v = relu_keep_nan(v);
    out[NHWC ? static_cast<long long>(m) * s.ctot + oc
             : ((static_cast<long long>(n) * s.ctot + oc) * s.H + oy) * s.W + ox] = from_f<T>(v);
  }
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
  if (p.m_tiles > 2147483647 || p.n_tiles > 65535 || p.splits > 65535)
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
