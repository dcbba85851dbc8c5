// The large-batch path on Hopper's own instructions (the "cutlass90" kernel
// choice): the same per-branch (or whole-window) implicit-GEMM convolutions as
// msconv_cuda_cutlass.cu, built from CUTLASS 3.x's SM90 collectives (TMA
// loads of the im2col'd input and the filter, wgmma multiplies, a
// warp-specialized pipeline), with the bias and max(x, lower_bound) fused in
// the epilogue and a TMA store into the branch's channel slice: the output's
// pixel stride is the layer's total channels, which the epilogue takes from
// its own stride arguments.  Compiled for sm_90a only (wgmma and the TMA are
// architecture-specific), when CMake finds CUTLASS and the build targets 9.0.
#include "msconv_cuda_igemm.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"  // before the conv collectives: one of them uses it undeclared
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

namespace fer_edge {
namespace igemm90 {
namespace {

using namespace cute;
using Half = cutlass::half_t;
using NHWC = cutlass::layout::TensorNHWC;  // the activation NHWC, the filter KRSC, the output NPQK
constexpr int ALIGN = 8;                   // halves per 16-byte access (TMA: 16-byte strides)
constexpr cutlass::conv::Operator FPROP = cutlass::conv::Operator::kFprop;

// D = max(accumulator + bias[channel], lower_bound): ReLU (0) or identity (-inf) at run time.
// GEMM N is the output channel, so the bias is a per-column one.
using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::LowerBound, Half, float,
                                                                  Half, Half, float>;
using ClusterShape = Shape<_1, _1, _1>;

// One tile shape's kernel: igemm90::TILE_M pixels x TN channels x TILE_K (channels x taps)
// per step (igemm90::tile_n picks TN per launch).
template <int TN>
struct Sm90Conv {
  using TileShape = Shape<Int<igemm90::TILE_M>, Int<TN>, Shape<Int<igemm90::TILE_K>>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, NHWC, ALIGN, Half, NHWC, ALIGN,
      cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, FPROP, Half, NHWC, ALIGN, Half, NHWC, ALIGN, float,
      TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<FPROP, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using StrideD = typename Kernel::StrideD;  // ((pixel q, row p, image n), channel = 1, batch = 0)
};
static_assert(igemm90::TILE_NS[0] == 64 && igemm90::TILE_NS[1] == 128, "the tile table is out of step");

template <int TN>
void run_branch(const MsConvArgs& a, const igemm::Branch& b, int ctot, cudaStream_t stream) {
  using Conv = typename Sm90Conv<TN>::Op;
  using Problem = typename Sm90Conv<TN>::Problem;
  using StrideD = typename Sm90Conv<TN>::StrideD;
  const int n = int(a.n), h = int(a.h), w = int(a.w), c = int(a.c), k = b.k, cout = b.cout, pad = k / 2;
  const int64_t row = int64_t(w) * ctot, image = int64_t(h) * row;
  Problem problem(cutlass::conv::Mode::kCrossCorrelation,
                  {n, h, w, c}, {int64_t(h) * w * c, int64_t(w) * c, int64_t(c), int64_t(1)},
                  {cout, k, k, c}, {int64_t(k) * k * c, int64_t(k) * c, int64_t(c), int64_t(1)},
                  {image, row, int64_t(ctot), int64_t(1)}, {pad, pad}, {pad, pad}, {1, 1}, {1, 1}, 1);
  StrideD out_stride{};
  get<0, 0>(out_stride) = ctot;  // neighbouring pixels: the layer's total channels apart
  get<0, 1>(out_stride) = row;
  get<0, 2>(out_stride) = image;
  typename Conv::Arguments args{
      problem,
      {reinterpret_cast<const Half*>(a.x), reinterpret_cast<const Half*>(a.wp) + b.weights},
      {{}, nullptr, StrideD{}, reinterpret_cast<Half*>(a.out) + b.offset, out_stride}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.bias_ptr = reinterpret_cast<const Half*>(b.bias);
  fusion.activation.lower_bound = a.relu ? 0.0f : -INFINITY;
  // can_implement checks the sizes; the strides and pointers it does not see are
  // unsupported()'s (16-byte aligned, channel counts and offsets in multiples of 8).
  cutlass::Status s = Conv::can_implement(args);
  if (s != cutlass::Status::kSuccess)
    throw std::invalid_argument(std::string("fused_ms_conv: the cutlass90 kernel cannot run this layer (") +
                                cutlass::cutlassGetStatusString(s) + ")");
  Conv op;  // no workspace: a plain (non-persistent) kernel, no split-K
  s = op.initialize(args, nullptr, stream);  // host work only: the TMA descriptors, the shared-memory size
  if (s == cutlass::Status::kSuccess) s = op.run(stream);
  if (s != cutlass::Status::kSuccess)  // (run() has already read and cleared the CUDA error)
    throw std::runtime_error(std::string("fused_ms_conv: cutlass90 kernel launch failed (") +
                             cutlass::cutlassGetStatusString(s) + ")");
}

}  // namespace

void launch(const MsConvArgs& a, std::uintptr_t stream, igemm::Form form, int sm_count, int tile_n) {
  if (a.n * a.h * a.w > INT32_MAX) throw std::invalid_argument("fused_ms_conv: cutlass90: more than 2^31 pixels");
  if (!valid_tile_n(tile_n)) throw std::invalid_argument("fused_ms_conv: cutlass90 tile_n must be 0, 64 or 128");
  const int ctot = int(a.c1 + a.c3 + a.c5);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  for (const igemm::Branch& b : igemm::branches(a, form)) {
    if (!b.cout) continue;  // an empty branch (the single-branch case) is skipped
    if (igemm90::tile_n(a.n * a.h * a.w, b.cout, sm_count, tile_n) == 128)
      run_branch<128>(a, b, ctot, s);
    else
      run_branch<64>(a, b, ctot, s);
  }
}

}  // namespace igemm90
}  // namespace fer_edge
