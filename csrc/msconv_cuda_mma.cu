// The small-batch tensor-core ("mma") kernel of the fused multi-scale
// convolution: see msconv_cuda_mma.h for what it computes and its plan.
//
// A block is one (branch, pixel tile, 64-channel tile, K chunk) and 4 warps;
// warp w owns output channels 16w..16w+15 of the tile (two n8 fragments) for
// all its BM pixel rows (BM / 16 m16 fragments).  Its K chunk is read in steps
// of 64 bytes of k (32 halves or 16 floats: one tap x that many input channels
// when C allows) through a cp.async pipeline of STAGES steps: the input rows
// its pixels read at a tap (an im2col gather, 16 bytes = 8 halves or 4 floats
// of channels per copy, zero-filled outside the image) and the matching
// 16-byte runs of each output channel's KRSC weights, both laid out [row][k]
// in shared memory, which is what mma.sync's row-major A and column-major B
// fragments read with 32-bit loads.  Rows are padded by 16 bytes (80 bytes)
// so a warp's fragment loads hit 32 banks.
#include "msconv_cuda_mma.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <type_traits>
#include <stdexcept>
#include <string>

#include "msconv_cuda_device.cuh"

namespace fer_edge {
namespace mma {
namespace {
using device::relu_keep_nan;
using device::to_f;

template <typename T>
struct BranchArgs {
  const T* w;      // its KRSC kernel (cout, k, k, C)
  const T* bias;
  int k, cout, offset, chunks;
  int kdim, m_tiles, first_unit, first_counter;
};

template <typename T>
struct Args {
  const T* x;
  T* out;
  float* ws;
  int* counters;
  int M, C, H, W, ctot, kchunk, branches;
  bool relu;
  BranchArgs<T> b[3];
};

// Shared memory holds 32-bit words: a pipeline step is 4 copies of 16 bytes per row (32 halves
// or 16 floats of k), and one mma k-step is 8 words of k either way (m16n8k16 on half pairs,
// m16n8k8 on tf32), so both element types share the staging and the fragment loads.
constexpr int COPIES_PER_ROW = 4;
template <typename T>
__host__ __device__ constexpr int per_copy() { return 16 / static_cast<int>(sizeof(T)); }   // k values per copy

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr int WORDS = 4 * COPIES_PER_ROW;   // words of k per step
constexpr int ROW_WORDS = WORDS + 4;        // padded to 80 bytes: a warp's fragment loads hit 32 banks

// 16 bytes global -> shared without a register round trip; bytes = 0 stores zeros (nothing is read).
__device__ __forceinline__ void copy16(void* smem, const void* gmem, bool full) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_pending() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma_16816(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_1688(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A float32 as the sum of two tf32 values (3xTF32): big * big + big * small + small * big keeps
// about float32's precision on tensor cores (the small * small term is below its rounding).  The
// big part is x truncated to tf32 (rounding could overflow a value near FLT_MAX), the rest exact.
// An Inf input becomes NaN here (Inf - Inf), where three convolutions would give Inf.
template <int N>
__device__ __forceinline__ void split_tf32(const unsigned* x, unsigned* big, unsigned* small) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    big[i] = x[i] & 0xffffe000u;
    const float rest = __uint_as_float(x[i]) - __uint_as_float(big[i]);
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small[i]) : "f"(rest));
  }
}

// Programmatic dependent launch (sm_90): a kernel launched as the dependent of the one before it
// in the stream may start once that one's blocks have all let it (or exited), and must wait
// for it to finish, its memory visible, before reading anything it may have written.  Elsewhere,
// and for a kernel not launched that way, both are no-ops.
__device__ __forceinline__ void wait_for_previous_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_grid_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Two adjacent float32 partial sums into the workspace: one vector atomic on Hopper.
__device__ __forceinline__ void add_pair(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
#endif

// The pixel rows this thread copies in every stage: (tid + i * THREADS) / 4 for
// i < COPIES, each 16 bytes of k (the 4 copies of a row cover a step).
template <int MT>
struct Gather {
  static constexpr int BM = 16 * MT, COPIES = (BM * COPIES_PER_ROW + THREADS - 1) / THREADS;
  long long base[COPIES];  // the pixel's element offset in x, or -1: past the batch or no copy
  int y[COPIES], x[COPIES];
};

template <typename T, int MT>
__global__ void __launch_bounds__(THREADS) mma_kernel(const Args<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = 16 * MT, PER_COPY = per_copy<T>(), STEP_K = COPIES_PER_ROW * PER_COPY;
  __shared__ __align__(16) unsigned s_a[STAGES][BM][ROW_WORDS];
  __shared__ __align__(16) unsigned s_b[STAGES][BN][ROW_WORDS];
  __shared__ int s_last;
  static_assert(sizeof(s_a) + sizeof(s_b) == STAGES * (BM + BN) * ROW_BYTES, "smem_bytes() is out of step");
  // The next layer's kernel may be scheduled beside this one now: its blocks set up and then wait
  // (wait_for_previous_grid) until this grid is done, so its launch latency hides behind this one.
  let_next_grid_launch();

  // Which unit: branches in order, then N tile, K chunk, M tile (fastest: the
  // blocks that read the same weights run side by side and share them in L2).
  // (Constant indices only: a dynamic one would copy the parameters to local memory.)
  const int unit = static_cast<int>(blockIdx.x);
  BranchArgs<T> b = p.b[0];
  if (p.branches > 2 && unit >= p.b[2].first_unit) b = p.b[2];
  else if (p.branches > 1 && unit >= p.b[1].first_unit) b = p.b[1];
  int u = unit - b.first_unit;
  const int mt = u % b.m_tiles;
  u /= b.m_tiles;
  const int kc = u % b.chunks, nt = u / b.chunks;
  const int m0 = mt * BM, n0 = nt * BN;
  const int kbeg = kc * p.kchunk, kend = min(b.kdim, kbeg + p.kchunk);
  const int steps = (kend - kbeg + STEP_K - 1) / STEP_K;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, q = lane % 4;
  const int half_k = b.k / 2;

  Gather<MT> ga;
#pragma unroll
  for (int i = 0; i < Gather<MT>::COPIES; ++i) {
    const int row = (tid + i * THREADS) / COPIES_PER_ROW, m = m0 + row;
    ga.base[i] = -1;
    ga.y[i] = ga.x[i] = 0;
    if (row < BM && m < p.M) {
      const int hw = p.H * p.W, n = m / hw, r = m % hw;
      ga.y[i] = r / p.W;
      ga.x[i] = r % p.W;
      ga.base[i] = ((static_cast<long long>(n) * p.H + ga.y[i]) * p.W + ga.x[i]) * p.C;
    }
  }
  // The weights: rows (tid + i * THREADS) / 4 of the 64-channel tile, 2 copies per thread.
  constexpr int B_COPIES = BN * COPIES_PER_ROW / THREADS;

  auto load = [&](int slot, int step) {
    const int k0 = kbeg + step * STEP_K;
#pragma unroll
    for (int i = 0; i < Gather<MT>::COPIES; ++i) {
      const int idx = tid + i * THREADS, row = idx / COPIES_PER_ROW, ch = idx % COPIES_PER_ROW;
      if (row >= BM) continue;
      const int k = k0 + PER_COPY * ch;
      // k = tap * C + input channel; C is a multiple of 8, so one copy's k share a tap.
      const int tap = k / p.C, ci = k - tap * p.C, dy = tap / b.k - half_k, dx = tap % b.k - half_k;
      const int iy = ga.y[i] + dy, ix = ga.x[i] + dx;
      const bool ok = ga.base[i] >= 0 && k < kend && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
      const T* src = ok ? p.x + ga.base[i] + (static_cast<long long>(dy) * p.W + dx) * p.C + ci : p.x;
      copy16(&s_a[slot][row][4 * ch], src, ok);
    }
#pragma unroll
    for (int i = 0; i < B_COPIES; ++i) {
      const int idx = tid + i * THREADS, row = idx / COPIES_PER_ROW, ch = idx % COPIES_PER_ROW;
      const int k = k0 + PER_COPY * ch, co = n0 + row;
      const bool ok = co < b.cout && k < kend;
      copy16(&s_b[slot][row][4 * ch], ok ? b.w + static_cast<long long>(co) * b.kdim + k : b.w, ok);
    }
  };

  float acc[MT][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const bool busy = n0 + 16 * warp < b.cout;  // a warp past the branch's channels only copies

  auto multiply = [&](int slot) {
    // Fragments in words (PTX ISA, m16n8k16 .f16 / m16n8k8 .tf32): A row g / g + 8, words q and
    // q + 4 of the k-step; B column g, words q and q + 4.
#pragma unroll
    for (int kw = 0; kw < WORDS; kw += 8) {
      unsigned bf[2][2];
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const unsigned* bp = &s_b[slot][16 * warp + 8 * nb + g][kw + q];
        bf[nb][0] = bp[0];
        bf[nb][1] = bp[4];
      }
      unsigned bbig[2][2], bsmall[2][2];
      if constexpr (std::is_same_v<T, float>)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) split_tf32<2>(bf[nb], bbig[nb], bsmall[nb]);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const unsigned* ap = &s_a[slot][16 * mi + g][kw + q];
        const unsigned af[4] = {ap[0], ap[8 * ROW_WORDS], ap[4], ap[8 * ROW_WORDS + 4]};
        if constexpr (std::is_same_v<T, float>) {
          unsigned abig[4], asmall[4];
          split_tf32<4>(af, abig, asmall);
#pragma unroll
          for (int nb = 0; nb < 2; ++nb) {
            mma_1688(acc[mi][nb], asmall, bbig[nb]);
            mma_1688(acc[mi][nb], abig, bsmall[nb]);
            mma_1688(acc[mi][nb], abig, bbig[nb]);
          }
        } else {
#pragma unroll
          for (int nb = 0; nb < 2; ++nb) mma_16816(acc[mi][nb], af, bf[nb]);
        }
      }
    }
  };

  // Every global read comes after the previous kernel in the stream is done (a no-op unless this
  // one was launched as its programmatic dependent, which then got this far early).
  wait_for_previous_grid();
  // Every slot in flight at once (a 128-deep float16 chunk is 4 steps: all of its copies), each
  // slot refilled right after its step is multiplied.
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    if (s < steps) load(s, s);
    commit();  // an empty group keeps the count: wait_pending below counts groups
  }
  for (int step = 0; step < steps; ++step) {
    wait_pending<STAGES - 1>();  // this thread's copies of `step` have landed (STAGES + step groups)...
    __syncthreads();             // ...and everyone's
    const int slot = step % STAGES;
    if (busy) multiply(slot);
    const int next = step + STAGES;
    if (next < steps) {          // (the same for the whole block)
      __syncthreads();           // every warp is done with the slot before it is refilled
      load(slot, next);
    }
    commit();
  }
  wait_pending<0>();

  // C fragment: rows g and g + 8 of each m16 tile, columns 2q and 2q + 1 of each n8 tile.
  auto store = [&](int m, int col, float v0, float v1) {  // bias, ReLU, a pair into the output slice
    v0 += to_f(b.bias[col]);
    v1 += to_f(b.bias[col + 1]);
    if (p.relu) {
      v0 = relu_keep_nan(v0);
      v1 = relu_keep_nan(v1);
    }
    store_pair(p.out + static_cast<long long>(m) * p.ctot + b.offset + col, v0, v1);
  };
  // Every value this thread holds inside the tile, as (pixel, channel, two adjacent values).
  auto each_pair = [&](auto&& f) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + 16 * mi + g + 8 * h, col = n0 + 16 * warp + 8 * nb + 2 * q;
          if (m < p.M && col < b.cout) f(m, col, acc[mi][nb][2 * h], acc[mi][nb][2 * h + 1]);
        }
  };
  if (b.chunks == 1) {
    if (busy) each_pair(store);
    return;
  }
  if (busy)
    each_pair([&](int m, int col, float v0, float v1) {
      add_pair(p.ws + static_cast<long long>(m) * p.ctot + b.offset + col, v0, v1);
    });
  __threadfence();  // this block's sums are visible before its arrival is
  __syncthreads();
  int* counter = p.counters + b.first_counter + nt * b.m_tiles + mt;
  if (tid == 0) s_last = atomicAdd(counter, 1) == b.chunks - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // The last chunk of this tile: the total, read from L2 (.cg: never a stale L1 line), left at zero.
  for (int e = tid; e < BM * BN / 2; e += THREADS) {
    const int m = m0 + e / (BN / 2), col = n0 + 2 * (e % (BN / 2));
    if (m >= p.M || col >= b.cout) continue;
    float2* w = reinterpret_cast<float2*>(p.ws + static_cast<long long>(m) * p.ctot + b.offset + col);
    const float2 v = __ldcg(w);
    __stcg(w, make_float2(0.f, 0.f));
    store(m, col, v.x, v.y);
  }
  if (tid == 0) *counter = 0;  // ready for the next launch (and the next graph replay)
#else
  __trap();  // code for an older architecture: launch() refuses it first
#endif
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fused_ms_conv (mma): ") + what + ": " +
                                                 cudaGetErrorString(e));
}

// The architecture the loaded code of the kernel was compiled for (cudaFuncAttributes::ptxVersion,
// JIT or not): the device may be sm_80+ while this build only holds older code for it (the
// driver JIT-compiles compute_75 PTX, whose kernel traps), or sm_90 while the code is sm_80's
// (no griddepcontrol: a programmatic dependent launch would not wait).  Asked once per device.
template <typename T, int MT>
int loaded_arch(int device) {
  static std::atomic<int> known[64];  // 0: not asked yet
  if (device >= 0 && device < 64 && known[device].load() != 0) return known[device].load();
  cudaFuncAttributes fa{};
  const cudaError_t e = cudaFuncGetAttributes(&fa, mma_kernel<T, MT>);
  if (e != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for an unrelated later check
    check(e, "cudaFuncGetAttributes");
  }
  if (device >= 0 && device < 64) known[device].store(fa.ptxVersion);
  return fa.ptxVersion;
}

// pdl: launched as the programmatic dependent of the kernel before it in the stream (the
// caller asks for it on compute capability 9.0+ only; the loaded code must be sm_90's too, or
// it has no wait), so that it is scheduled while that one finishes; the kernel waits for it
// before reading anything.
template <typename T, int MT>
void run(const Args<T>& args, const Plan& p, cudaStream_t stream, bool pdl) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const int arch = loaded_arch<T, MT>(device);
  if (arch < 80)
    throw std::invalid_argument("fused_ms_conv: this build has no sm_80+ code for the mma kernel on this GPU "
                                "(build for its architecture); choose splitk or cudnn");
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(p.units));
  config.blockDim = dim3(THREADS);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl && arch >= 90 ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&config, mma_kernel<T, MT>, args);
  if (e != cudaSuccess) {
    cudaGetLastError();  // the exception says it: leave no error behind for the next launch's check
    check(e, "kernel launch");
  }
}

template <typename T>
void launch_typed(const MsConvArgs& a, const Plan& p, cudaStream_t stream, std::uintptr_t workspace,
                  std::uintptr_t counters, bool pdl) {
  Args<T> args{};
  args.x = reinterpret_cast<const T*>(a.x);
  args.out = reinterpret_cast<T*>(a.out);
  args.ws = reinterpret_cast<float*>(workspace);
  args.counters = reinterpret_cast<int*>(counters);
  args.M = static_cast<int>(a.n * a.h * a.w);
  args.C = static_cast<int>(a.c);
  args.H = static_cast<int>(a.h);
  args.W = static_cast<int>(a.w);
  args.ctot = static_cast<int>(a.c1 + a.c3 + a.c5);
  args.kchunk = static_cast<int>(p.kchunk);
  args.branches = p.branches;
  args.relu = a.relu;
  int i = 0;  // plan() keeps igemm::branches' order, the empty ones left out
  for (const igemm::Branch& br : igemm::branches(a)) {
    if (br.cout == 0) continue;
    const BranchPlan& s = p.b[i];
    BranchArgs<T>& d = args.b[i++];
    d.w = reinterpret_cast<const T*>(a.wp) + s.weights;
    d.bias = reinterpret_cast<const T*>(br.bias);
    d.k = s.k;
    d.cout = s.cout;
    d.offset = s.offset;
    d.chunks = static_cast<int>(s.chunks);
    d.kdim = static_cast<int>(s.kdim);
    d.m_tiles = static_cast<int>(s.m_tiles);
    d.first_unit = static_cast<int>(s.first_unit);
    d.first_counter = static_cast<int>(s.first_counter);
  }
  switch (p.bm / 16) {
    case 1: run<T, 1>(args, p, stream, pdl); break;
    case 2: run<T, 2>(args, p, stream, pdl); break;
    case 3: run<T, 3>(args, p, stream, pdl); break;
    default: run<T, 4>(args, p, stream, pdl); break;
  }
}

}  // namespace

void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int sm_count, std::uintptr_t workspace,
            std::uintptr_t counters, int bm, std::int64_t kchunk, bool pdl) {
  if (!valid_override(bm, kchunk))
    throw std::invalid_argument("fused_ms_conv (mma): bm must be 16, 32, 48 or 64 and kchunk a multiple of 32 "
                                "(0: the plan's choice)");
  const Plan p = plan(a.n, a.c, a.h, a.w, a.c1, a.c3, a.c5, sm_count, bm, kchunk);
  if (p.counters > 0 && (!workspace || !counters))
    throw std::invalid_argument("fused_ms_conv (mma): this shape needs a workspace and counters "
                                "(fer_edge.kernels allocates them from mma_plan)");
  // Indices are 32-bit where they fit: pixels, K, blocks and a branch's tile counters.
  std::int64_t kmax = 0;
  for (int i = 0; i < p.branches; ++i) kmax = std::max(kmax, p.b[i].kdim + p.kchunk);
  if (a.n * a.h * a.w > static_cast<std::int64_t>(INT_MAX) - 64 || p.units > INT_MAX || kmax > INT_MAX ||
      p.counters > INT_MAX)
    throw std::invalid_argument("fused_ms_conv (mma): shape too large for the small-batch kernel");
  if (p.units == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == DType::Float32)
    launch_typed<float>(a, p, s, workspace, counters, pdl);
  else
    launch_typed<__half>(a, p, s, workspace, counters, pdl);
}

}  // namespace mma
}  // namespace fer_edge
