// The large-batch CUDA path of the fused multi-scale convolution, built on
// CUTLASS's implicit-GEMM convolution (its 2.x conv API: SM80 mma.sync
// m16n8k16, a multistage cp.async pipeline, the "optimized" NHWC iterators).
// See msconv_cuda_igemm.h for what it computes and which inputs it takes.
//
// Each branch is one launch (or, in the window form, the whole layer is one
// 5x5 launch): GEMM M = N*H*W pixels, N = the launch's output channels,
// K = taps x input channels.  The epilogue reads the bias as a
// "C" tensor whose strides are all zero (every pixel sees the same channel
// vector) and writes D into the output with its row stride set to the
// layer's total channels, starting at the branch's channel offset: the
// concatenation costs nothing.
//
// Compiled only when CMake finds CUTLASS's headers (FER_EDGE_WITH_CUTLASS);
// for sm_80 and up (the SM80 kernels also run on sm_86/87/89 and on sm_90).
#include "msconv_cuda_igemm.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_generic.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace fer_edge {
namespace igemm {
namespace {

using Half = cutlass::half_t;
using NHWC = cutlass::layout::TensorNHWC;

// max(x, lower_bound): ReLU with 0, the identity with -inf, a runtime
// parameter, so one instantiation per tile serves both.  The generic
// combination leaves partial sums alone under serial split-K (it skips the
// activation but for the last slice); LinearCombinationRelu would turn them
// into NaN there (its threshold for partial slices is a NaN bit pattern).
using Epilogue = cutlass::epilogue::thread::LinearCombinationGeneric<
    cutlass::epilogue::thread::LowerBound, Half, 128 / cutlass::sizeof_bits<Half>::value, float, float>;

template <int TM, int TN, int TK, int WM, int WN, int Stages>
struct Conv {
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Half, NHWC, Half, NHWC, Half, NHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<TM, TN, TK>, cutlass::gemm::GemmShape<WM, WN, TK>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      Stages, cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kUnity>::Kernel;
  using Op = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
  static_assert(TM == Op::ThreadblockShape::kM && TN == Op::ThreadblockShape::kN, "tile table out of step");
};

// The instantiations behind igemm::TILES, in the same order (4 warps each;
// stages sized to about 48 KB of shared memory).
using Tile0 = Conv<128, 128, 32, 64, 64, 3>;
using Tile1 = Conv<128, 64, 32, 64, 32, 4>;
using Tile2 = Conv<64, 64, 32, 32, 32, 5>;
static_assert(TILES[0].m == 128 && TILES[0].n == 128 && TILES[0].k == 32, "tile 0 out of step");
static_assert(TILES[1].m == 128 && TILES[1].n == 64 && TILES[1].k == 32, "tile 1 out of step");
static_assert(TILES[2].m == 64 && TILES[2].n == 64 && TILES[2].k == 32, "tile 2 out of step");

const char* status_text(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

template <typename C>
void run_branch(const MsConvArgs& a, const Branch& b, int ctot, int splits, int* semaphores, cudaStream_t stream) {
  using Op = typename C::Op;
  const int n = int(a.n), h = int(a.h), w = int(a.w), c = int(a.c);
  cutlass::conv::Conv2dProblemSize problem(
      cutlass::Tensor4DCoord(n, h, w, c), cutlass::Tensor4DCoord(b.cout, b.k, b.k, c),
      cutlass::Tensor4DCoord(b.k / 2, b.k / 2, b.k / 2, b.k / 2), cutlass::MatrixCoord(1, 1),
      cutlass::MatrixCoord(1, 1), cutlass::Tensor4DCoord(n, h, w, b.cout),
      cutlass::conv::Mode::kCrossCorrelation, splits);
  const NHWC x_layout = NHWC::packed(cutlass::Tensor4DCoord(n, h, w, c));
  const NHWC w_layout = NHWC::packed(cutlass::Tensor4DCoord(b.cout, b.k, b.k, c));
  // The output slice: pixel rows ctot apart.  The bias: every stride zero.
  const NHWC out_layout(ctot, w * ctot, h * w * ctot);
  const NHWC bias_layout(0, 0, 0);
  Half* out = reinterpret_cast<Half*>(a.out) + b.offset;
  Half* weights = const_cast<Half*>(reinterpret_cast<const Half*>(a.wp)) + b.weights;
  typename Epilogue::Params epilogue(1.0f, 1.0f);  // alpha * accumulator + beta * bias
  epilogue.lower_bound = a.relu ? 0.0f : -INFINITY;
  typename Op::Arguments args(
      problem, {const_cast<Half*>(reinterpret_cast<const Half*>(a.x)), x_layout},
      {weights, w_layout}, {reinterpret_cast<Half*>(b.bias), bias_layout}, {out, out_layout},
      epilogue, cutlass::conv::SplitKMode::kSerial);
  cutlass::Status s = Op::can_implement(args);
  if (s != cutlass::Status::kSuccess)
    throw std::invalid_argument(std::string("fused_ms_conv: the cutlass kernel cannot run this layer (") +
                                status_text(s) + ")");
  if (splits > 1 && !semaphores)
    throw std::invalid_argument("fused_ms_conv: the cutlass kernel splits this layer and needs its semaphores "
                                "(cutlass_buffers)");
  Op op;
  s = op.initialize(args, splits > 1 ? semaphores : nullptr, stream);  // clears the semaphores first
  if (s == cutlass::Status::kSuccess) s = op.run(stream);
  if (s != cutlass::Status::kSuccess)  // (run() has already read and cleared the CUDA error)
    throw std::runtime_error(std::string("fused_ms_conv: cutlass kernel launch failed (") + status_text(s) + ")");
}

}  // namespace

void launch(const MsConvArgs& a, std::uintptr_t stream, int sm_count, std::uintptr_t semaphores, Form form) {
  const int ctot = int(a.c1 + a.c3 + a.c5);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // CUTLASS refuses an input or a branch output of 2 GiB or more: run such a
  // batch in chunks of whole images (offsets keep 16-byte alignment: c and
  // ctot are multiples of 8).
  const std::int64_t image = a.h * a.w * std::max<std::int64_t>(a.c, ctot) * std::int64_t(sizeof(Half));
  const std::int64_t chunk = std::max<std::int64_t>(1, ((std::int64_t(1) << 31) - 1) / image);
  for (std::int64_t n0 = 0; n0 < a.n; n0 += chunk) {
    MsConvArgs part = a;
    part.n = std::min(chunk, a.n - n0);
    part.x = a.x + std::uintptr_t(n0 * a.h * a.w * a.c) * sizeof(Half);
    part.out = a.out + std::uintptr_t(n0 * a.h * a.w * ctot) * sizeof(Half);
    const std::int64_t m = part.n * a.h * a.w;
    for (const Branch& b : branches(a, form)) {
      if (b.cout == 0) continue;  // the single-branch case (c1 = c5 = 0), the window form's unused entries
      const int tile = pick_tile(m, b.cout, sm_count);
      // A chunked batch never splits: semaphores() sizes the buffer for the whole batch, which does not.
      const int splits = chunk < a.n ? 1 : pick_splits(m, b.cout, a.c, TILES[tile], sm_count);
      int* sem = reinterpret_cast<int*>(semaphores);
      switch (tile) {
        case 0: run_branch<Tile0>(part, b, ctot, splits, sem, s); break;
        case 1: run_branch<Tile1>(part, b, ctot, splits, sem, s); break;
        default: run_branch<Tile2>(part, b, ctot, splits, sem, s); break;
      }
    }
  }
}

}  // namespace igemm
}  // namespace fer_edge
