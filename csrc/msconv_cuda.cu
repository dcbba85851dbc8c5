// CUDA kernel of the fused multi-scale convolution (float32, or float16 with
// float32 accumulation; NCHW or NHWC / channels_last).
//
// One pass: a block owns an 8x8 tile of output pixels and 32 combined output
// channels.  For each slice of CK input channels it stages the input tile with
// its 2-pixel halo and the matching weights of all three branches in shared
// memory once, then every thread accumulates 8 channels of one pixel from
// them.  Combined channels are ordered [c5 | c3 | c1] (see msconv_cpu.cpp):
// a block whose channels are all 3x3 or 1x1 visits only the inner taps.
// Weights come packed once by the Python side (MsConvArgs::wp: tap-major
// (25, C, ctot) in that order), so staging them is a coalesced copy.
// Bias and ReLU are applied in registers and results are written straight into
// their slice of the concatenated output: no intermediate tensors, no cat.
//
// This is the portable SIMT version (any sm_75+ GPU, Jetson Orin included).
// For float16 there is also a tensor-core version (msconv_wmma_kernel below,
// an implicit GEMM through the WMMA API), and for small batches the split-K
// kernels of msconv_cuda_splitk.cu and msconv_cuda_mma.cu.  The caller names the variant (the
// dispatch table in fer_edge/dispatch.py); nothing here reads the environment.
#include "msconv.h"
#include "msconv_cuda_device.cuh"
#include "msconv_cuda_igemm.h"
#include "msconv_cuda_mma.h"
#include "msconv_cuda_splitk.h"
#include "msconv_cuda_stem.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fer_edge {
namespace {
using device::bias_and_channel;
using device::Dims;
using device::from_f;
using device::make_dims;
using device::relu_keep_nan;
using device::to_f;

constexpr int TH = 8, TW = 8;          // output tile
constexpr int NPIX = TH * TW;          // pixels per block
constexpr int COB = 8;                 // channels per thread
constexpr int CGROUPS = 4;             // channel groups per block
constexpr int BCO = COB * CGROUPS;     // channels per block
constexpr int THREADS = NPIX * CGROUPS;
constexpr int CK = 8;                  // input channels per shared-memory stage
constexpr int IH = TH + 4, IW = TW + 4;
constexpr int WSTRIDE = BCO + 1;       // odd row stride: conflict-free staging writes


// Packed weight (MsConvArgs::wp) of combined channel co for input channel ci
// at 5x5 tap index `tap` (ky * 5 + kx).
template <typename T>
__device__ __forceinline__ T packed_weight(const T* wp, int tap, int ci, int co, const Dims& d) {
  return wp[(static_cast<long long>(tap) * d.C + ci) * d.ctot + co];
}


// Element idx of an input tile staged for shared memory: KC channels from
// ci0, IH x IW pixels from (ty0 - 2, tx0 - 2), i.e. with the 2-pixel halo.
// Indices run in global-memory order (channels fastest for NHWC, columns for
// NCHW) so consecutive threads read consecutive addresses.  Sets the
// element's (cc, yy, xx) and returns its value, zero outside the image and
// past the last channel.
template <int KC, int IH, int IW, bool NHWC, typename T>
__device__ __forceinline__ float staged_input(const T* x, const Dims& d, int n, int ci0, int ty0, int tx0,
                                              int idx, int& cc, int& yy, int& xx) {
  if (NHWC) {
    cc = idx % KC;
    const int p = idx / KC;
    yy = p / IW;
    xx = p % IW;
  } else {
    cc = idx / (IH * IW);
    const int p = idx % (IH * IW);
    yy = p / IW;
    xx = p % IW;
  }
  const int ih = ty0 + yy - 2, iw = tx0 + xx - 2, ci = ci0 + cc;
  if (ih < 0 || ih >= d.H || iw < 0 || iw >= d.W || ci >= d.C) return 0.f;
  return to_f(x[NHWC ? ((static_cast<long long>(n) * d.H + ih) * d.W + iw) * d.C + ci
                     : ((static_cast<long long>(n) * d.C + ci) * d.H + ih) * d.W + iw]);
}

template <typename T, bool NHWC>
__global__ void __launch_bounds__(THREADS)
msconv_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ wp,
              const T* __restrict__ b1, const T* __restrict__ b3, const T* __restrict__ b5, Dims d) {
  __shared__ float s_in[CK][IH][IW];
  __shared__ float s_w[CK][25][WSTRIDE];

  const int tid = threadIdx.x;
  const int pix = tid % NPIX, cg = tid / NPIX;
  const int py = pix / TW, px = pix % TW;
  const int ty0 = (blockIdx.x / d.tiles_w) * TH, tx0 = (blockIdx.x % d.tiles_w) * TW;
  const int co_block = blockIdx.y * BCO;
  const int n = d.n0 + blockIdx.z;
  const int C = d.C, H = d.H, W = d.W;
  // Taps this block needs: the first channel of the block has the widest kernel.
  const int r = co_block < d.c5 ? 2 : (co_block < d.c5 + d.c3 ? 1 : 0);
  const int side = 2 * r + 1, ntaps = side * side;

  float acc[COB];
#pragma unroll
  for (int j = 0; j < COB; ++j) acc[j] = 0.f;

  for (int ci0 = 0; ci0 < C; ci0 += CK) {
    __syncthreads();  // previous stage fully consumed
    for (int idx = tid; idx < CK * IH * IW; idx += THREADS) {
      int cc, yy, xx;
      const float v = staged_input<CK, IH, IW, NHWC>(x, d, n, ci0, ty0, tx0, idx, cc, yy, xx);
      s_in[cc][yy][xx] = v;
    }
    // Only the taps within radius r (25, 9 or 1): the loop below reads no others.
    for (int idx = tid; idx < CK * ntaps * BCO; idx += THREADS) {
      const int j = idx % BCO;  // output channels fastest: contiguous in the packed weights
      const int rest = idx / BCO;
      const int t = rest % ntaps, cc = rest / ntaps;
      const int tap = (2 - r + t / side) * 5 + (2 - r + t % side);
      const int co = co_block + j, ci = ci0 + cc;
      s_w[cc][tap][j] = ci < C && co < d.ctot ? to_f(packed_weight(wp, tap, ci, co, d)) : 0.f;
    }
    __syncthreads();
    const int cmax = min(CK, C - ci0);
    for (int cc = 0; cc < cmax; ++cc)
      for (int ky = 2 - r; ky <= 2 + r; ++ky)
        for (int kx = 2 - r; kx <= 2 + r; ++kx) {
          const float xv = s_in[cc][py + ky][px + kx];
          const float* wv = &s_w[cc][ky * 5 + kx][cg * COB];
#pragma unroll
          for (int j = 0; j < COB; ++j) acc[j] = fmaf(xv, wv[j], acc[j]);
        }
  }

  const int oh = ty0 + py, ow = tx0 + px;
  if (oh >= H || ow >= W) return;
#pragma unroll
  for (int j = 0; j < COB; ++j) {
    const int co = co_block + cg * COB + j;
    if (co >= d.ctot) break;
    int oc;
    const float b = bias_and_channel(co, d, b1, b3, b5, oc);
    float v = acc[j] + b;
    if (d.relu) v = relu_keep_nan(v);  // keep NaN like torch.relu
    const long long off = NHWC ? ((static_cast<long long>(n) * H + oh) * W + ow) * d.ctot + oc
                               : ((static_cast<long long>(n) * d.ctot + oc) * H + oh) * W + ow;
    out[off] = from_f<T>(v);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fused_ms_conv (CUDA): ") + what + ": " + cudaGetErrorString(e));
}

// The device that owns `p`, or an exception when `p` is not device memory.
int device_of(std::uintptr_t p, const char* name) {
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p));
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    throw std::invalid_argument(std::string("fused_ms_conv: ") + name + " is not a CUDA pointer (" +
                                cudaGetErrorString(e) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string("fused_ms_conv: ") + name + " is not CUDA device memory");
  return attr.device;
}

// ---------------------------------------------------------------- tensor cores
// Implicit GEMM on 16x16x16 WMMA tiles, float16 in, float32 accumulation.
// A block owns WR output rows x 16 output columns (one 16-pixel M tile per
// warp) and WN combined output channels (WN / 16 N tiles per warp).  For each
// slice of 16 input channels it stages the input tile with its halo (channels
// fastest, so one pixel's 16 channels are one row of an A tile) and the
// slice's weights for the taps this channel block needs; then for every tap
// (ky, kx) the A tile is the 16 pixels shifted by the tap, read in place from
// shared memory with a row stride of one pixel: the 5x5/3x3/1x1 windows never
// get unfolded into an im2col buffer.  Epilogue: accumulators go through
// shared memory (reusing the weight buffer), then bias + ReLU + float16 and
// coalesced stores into the concatenated output.
namespace wm {
constexpr int WR = 4;             // output rows per block = warps per block
constexpr int WC = 16;            // output columns per block (one M tile)
constexpr int WN = 32;            // output channels per block (two N tiles)
constexpr int NT = WN / 16;
constexpr int KC = 16;            // input channels per stage (one K step)
constexpr int KCP = 32;           // smem channel stride (halves): 64 B per pixel keeps every A pointer 32-B aligned
constexpr int WNP = WN + 8;       // smem weight row stride (halves), a multiple of 8 as WMMA needs
constexpr int OUTP = WN + 4;      // epilogue row stride (floats), a multiple of 4
constexpr int IH = WR + 4, IW = WC + 4;
constexpr int THREADS = 32 * WR;
constexpr int SW_BYTES = 25 * KC * WNP * 2;
constexpr int SOUT_BYTES = WR * 16 * OUTP * 4;
static_assert(SOUT_BYTES <= SW_BYTES, "the epilogue reuses the weight buffer");
}  // namespace wm

template <bool NHWC>
__global__ void __launch_bounds__(wm::THREADS)
msconv_wmma_kernel(const __half* __restrict__ x, __half* __restrict__ out, const __half* __restrict__ wp,
                   const __half* __restrict__ b1, const __half* __restrict__ b3,
                   const __half* __restrict__ b5, Dims d) {
  // WMMA on half needs sm_70+: <mma.h> declares nothing for older device
  // passes (sm_60/61 are built with CUDA 12), and the host never launches this
  // kernel on such a GPU (msconv_cuda checks the compute capability).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  using namespace nvcuda;
  __shared__ __align__(128) __half s_in[wm::IH][wm::IW][wm::KCP];
  __shared__ __align__(128) unsigned char s_buf[wm::SW_BYTES];
  auto s_w = reinterpret_cast<__half (*)[wm::KC][wm::WNP]>(s_buf);  // [25][KC][WNP]
  auto s_out = reinterpret_cast<float (*)[16][wm::OUTP]>(s_buf);  // [WR][16][OUTP]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ty0 = (blockIdx.x / d.tiles_w) * wm::WR, tx0 = (blockIdx.x % d.tiles_w) * wm::WC;
  const int co_block = blockIdx.y * wm::WN;
  const int n = d.n0 + blockIdx.z;
  const int C = d.C, H = d.H, W = d.W;
  const int r = co_block < d.c5 ? 2 : (co_block < d.c5 + d.c3 ? 1 : 0);
  const int side = 2 * r + 1, ntaps = side * side;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[wm::NT];
#pragma unroll
  for (int t = 0; t < wm::NT; ++t) wmma::fill_fragment(acc[t], 0.f);

  for (int ci0 = 0; ci0 < C; ci0 += wm::KC) {
    __syncthreads();  // previous stage fully consumed
    for (int idx = tid; idx < wm::IH * wm::IW * wm::KC; idx += wm::THREADS) {
      int cc, yy, xx;
      const float v = staged_input<wm::KC, wm::IH, wm::IW, NHWC>(x, d, n, ci0, ty0, tx0, idx, cc, yy, xx);
      s_in[yy][xx][cc] = __float2half(v);  // exact: v came from a half
    }
    // Weights of the taps within radius r only (tap t of the block's window
    // is 5x5 tap (2 - r + t / side, 2 - r + t % side)); output channels
    // fastest: coalesced loads from the packed weights, conflict-free stores.
    for (int idx = tid; idx < ntaps * wm::KC * wm::WN; idx += wm::THREADS) {
      const int j = idx % wm::WN;
      const int rest = idx / wm::WN;
      const int cc = rest % wm::KC, t = rest / wm::KC;
      const int tap = (2 - r + t / side) * 5 + (2 - r + t % side);
      const int co = co_block + j, ci = ci0 + cc;
      s_w[t][cc][j] = ci < C && co < d.ctot ? packed_weight(wp, tap, ci, co, d) : __float2half(0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
    for (int t = 0; t < ntaps; ++t) {
      const int ky = 2 - r + t / side, kx = 2 - r + t % side;
      // Row i of A = output pixel (ty0 + warp, tx0 + i) shifted by the tap: input pixel i + kx of row warp + ky.
      wmma::load_matrix_sync(a, &s_in[warp + ky][kx][0], wm::KCP);
#pragma unroll
      for (int nt = 0; nt < wm::NT; ++nt) {
        wmma::load_matrix_sync(b, &s_w[t][0][nt * 16], wm::WNP);
        wmma::mma_sync(acc[nt], a, b, acc[nt]);
      }
    }
  }

  __syncthreads();  // every warp is done with s_w: its memory becomes s_out
#pragma unroll
  for (int nt = 0; nt < wm::NT; ++nt)
    wmma::store_matrix_sync(&s_out[warp][0][nt * 16], acc[nt], wm::OUTP, wmma::mem_row_major);
  __syncwarp();
  const int oh = ty0 + warp;
  if (oh >= H) return;
  for (int e = lane; e < 16 * wm::WN; e += 32) {
    const int i = e / wm::WN, j = e % wm::WN;  // consecutive lanes: consecutive channels of one pixel
    const int ow = tx0 + i, co = co_block + j;
    if (ow >= W || co >= d.ctot) continue;
    int oc;
    const float bias = bias_and_channel(co, d, b1, b3, b5, oc);
    float v = s_out[warp][i][j] + bias;
    if (d.relu) v = relu_keep_nan(v);
    out[NHWC ? ((static_cast<long long>(n) * H + oh) * W + ow) * d.ctot + oc
             : ((static_cast<long long>(n) * d.ctot + oc) * H + oh) * W + ow] = __float2half_rn(v);
  }
#else
  __trap();
#endif
}

template <bool NHWC>
void launch_wmma(const MsConvArgs& a, cudaStream_t s) {
  Dims d = make_dims(a, wm::WC);
  const int tiles = d.tiles_w * ((d.H + wm::WR - 1) / wm::WR);
  const int cblocks = (d.ctot + wm::WN - 1) / wm::WN;
  for (long long n0 = 0; n0 < a.n; n0 += 65535) {
    d.n0 = static_cast<int>(n0);
    const unsigned nz = static_cast<unsigned>(std::min<long long>(65535, a.n - n0));
    msconv_wmma_kernel<NHWC><<<dim3(tiles, cblocks, nz), wm::THREADS, 0, s>>>(
        reinterpret_cast<const __half*>(a.x), reinterpret_cast<__half*>(a.out),
        reinterpret_cast<const __half*>(a.wp), reinterpret_cast<const __half*>(a.b1),
        reinterpret_cast<const __half*>(a.b3), reinterpret_cast<const __half*>(a.b5), d);
    check(cudaGetLastError(), "kernel launch");
  }
}

template <typename T, bool NHWC>
void launch(const MsConvArgs& a, cudaStream_t s) {
  Dims d = make_dims(a, TW);
  const int tiles = d.tiles_w * ((d.H + TH - 1) / TH);
  const int cblocks = (d.ctot + BCO - 1) / BCO;
  // gridDim.z is limited to 65535: launch large batches in slices.
  for (long long n0 = 0; n0 < a.n; n0 += 65535) {
    d.n0 = static_cast<int>(n0);
    const unsigned nz = static_cast<unsigned>(std::min<long long>(65535, a.n - n0));
    msconv_kernel<T, NHWC><<<dim3(tiles, cblocks, nz), THREADS, 0, s>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<T*>(a.out), reinterpret_cast<const T*>(a.wp),
        reinterpret_cast<const T*>(a.b1), reinterpret_cast<const T*>(a.b3), reinterpret_cast<const T*>(a.b5), d);
    check(cudaGetLastError(), "kernel launch");
  }
}

// The CUTLASS kernels: the build must have the one asked for, the layer must be one
// it takes (igemm::unsupported, for both), the GPU one it runs on.
void launch_cutlass(const MsConvArgs& a, DType dtype, std::uintptr_t stream, bool hopper, igemm::Form form,
                    int dev, std::uintptr_t semaphores, int tile_n) {
  const std::string name = std::string(hopper ? "cutlass90" : "cutlass") +
                           (form == igemm::Form::Window ? "_window" : "");
#ifndef FER_EDGE_WITH_CUTLASS
  throw std::invalid_argument("fused_ms_conv: this build has no " + name + " kernel (CUTLASS's headers were not "
                              "found when it was compiled: pip install nvidia-cutlass, then reinstall)");
#else
#ifndef FER_EDGE_WITH_CUTLASS_SM90
  if (hopper)
    throw std::invalid_argument("fused_ms_conv: this build has no " + name + " kernel (built without sm_90 in its "
                                "architectures, or with nvcc older than 12.0)");
#endif
  const std::string why = igemm::unsupported(a, dtype, form);
  if (!why.empty()) throw std::invalid_argument("fused_ms_conv: the " + name + " kernel cannot run this layer: " + why);
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (hopper && (major != 9 || minor != 0))
    throw std::invalid_argument("fused_ms_conv: the " + name + " kernel runs on compute capability 9.0 only "
                                "(sm_90a code); choose " + (form == igemm::Form::Window ? "cutlass_window" : "cutlass") +
                                " on this GPU");
  if (!hopper && major < 8)
    throw std::invalid_argument("fused_ms_conv: the " + name + " kernel needs compute capability 8.0+; "
                                "choose simt, splitk or cudnn on this GPU");
#ifdef FER_EDGE_WITH_CUTLASS_SM90
  if (hopper) return igemm90::launch(a, stream, form, splitk::sm_count_of(dev), tile_n);
#endif
  igemm::launch(a, stream, splitk::sm_count_of(dev), semaphores, form);
#endif
}

// The small-batch tensor-core kernel: the cutlass path's inputs, float32 too (mma::unsupported), sm_80+.
void launch_mma(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int dev, std::uintptr_t workspace,
                std::uintptr_t counters, const KernelOptions& options) {
  const std::string why = mma::unsupported(a, dtype);
  if (!why.empty()) throw std::invalid_argument("fused_ms_conv: the mma kernel cannot run this layer: " + why);
  int major = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  if (major < 8)
    throw std::invalid_argument("fused_ms_conv: the mma kernel needs mma.sync m16n8k16 and cp.async (compute "
                                "capability 8.0+); choose splitk or cudnn on this GPU");
  mma::launch(a, dtype, stream, splitk::sm_count_of(dev), workspace, counters, options.mma_bm, options.mma_kchunk,
              options.mma_pdl && major >= 9);
}

}  // namespace

void msconv_cuda(const MsConvArgs& a, DType dtype, std::uintptr_t stream, Variant variant,
                 std::uintptr_t workspace, std::uintptr_t counters, KernelOptions options) {
  validate(a, /*empty_branches=*/true);
  if (!a.wp) throw std::invalid_argument("fused_ms_conv: the CUDA kernels need the packed weights (wp)");
  const int dev = device_of(a.x, "x");
  const std::uintptr_t ptrs[] = {a.out, a.wp, a.b1, a.b3, a.b5};
  const char* names[] = {"out", "wp", "b1", "b3", "b5"};
  for (int i = 0; i < 5; ++i)
    if (ptrs[i] && device_of(ptrs[i], names[i]) != dev)  // null: an empty branch's bias (validate())
      throw std::invalid_argument(std::string("fused_ms_conv: ") + names[i] + " is on another GPU than x");
  int prev = 0;
  check(cudaGetDevice(&prev), "cudaGetDevice");
  if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  try {
    const bool nhwc = a.layout == Layout::NHWC;
    if (dtype != DType::Float32 && dtype != DType::Float16)
      throw std::invalid_argument("fused_ms_conv: unsupported dtype code");
    if (variant == Variant::Cutlass || variant == Variant::CutlassSm90 || variant == Variant::CutlassWindow ||
        variant == Variant::CutlassSm90Window) {
      const bool hopper = variant == Variant::CutlassSm90 || variant == Variant::CutlassSm90Window;
      const bool window = variant == Variant::CutlassWindow || variant == Variant::CutlassSm90Window;
      launch_cutlass(a, dtype, stream, hopper, window ? igemm::Form::Window : igemm::Form::PerBranch, dev, counters,
                     options.cutlass90_tile_n);
    } else if (variant == Variant::Stem) {
      stem::launch(a, dtype, stream, splitk::sm_count_of(dev));
    } else if (variant == Variant::Mma) {
      launch_mma(a, dtype, stream, dev, workspace, counters, options);
    } else if (variant == Variant::SplitK) {
      splitk::launch(a, dtype, stream, splitk::sm_count_of(dev), workspace, counters);
    } else if (dtype == DType::Float32) {
      nhwc ? launch<float, true>(a, s) : launch<float, false>(a, s);
    } else if (variant == Variant::Wmma && a.c >= wm::KC) {
      int major = 0;
      check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
      if (major < 7)
        throw std::invalid_argument("fused_ms_conv: the wmma kernel needs tensor cores (compute "
                                    "capability 7.0+); choose simt, splitk or cudnn on this GPU");
      // Tensor cores multiply 16 input channels per step: with fewer (the
      // one-channel stem) most of each step would be zero padding, so those
      // layers stay on the SIMT kernel.
      nhwc ? launch_wmma<true>(a, s) : launch_wmma<false>(a, s);
    } else {
      nhwc ? launch<__half, true>(a, s) : launch<__half, false>(a, s);
    }
  } catch (...) {
    if (prev != dev) cudaSetDevice(prev);
    throw;
  }
  if (prev != dev) check(cudaSetDevice(prev), "cudaSetDevice");
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace fer_edge

namespace fer_edge {
int cuda_runtime_version() { return CUDART_VERSION; }
}  // namespace fer_edge
