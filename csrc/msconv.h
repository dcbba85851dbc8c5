// Fused multi-scale convolution (the merged MACNN layer):
//
//   y = concat_c( act(conv1x1(x) + b1), act(conv3x3(x, pad 1) + b3), act(conv5x5(x, pad 2) + b5) )
//
// stride 1, same spatial size, act = ReLU or identity.  Weights are PyTorch's
// OIHW layout (w1: c1 x C x 1 x 1, w3: c3 x C x 3 x 3, w5: c5 x C x 5 x 5).
//
// These entry points take raw pointers so that the extension never links
// against PyTorch: one build works with any torch version.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace fer_edge {

enum class Layout : int { NCHW = 0, NHWC = 1 };
enum class DType : int { Float32 = 0, Float16 = 1 };

struct MsConvArgs {
  std::uintptr_t x = 0, out = 0;
  std::uintptr_t w1 = 0, b1 = 0, w3 = 0, b3 = 0, w5 = 0, b5 = 0;
  // CUDA only: the three kernels packed by fer_edge.kernels.pack_ms_weights,
  // (25, C, ctot), tap-major, combined channels in the order [c5 | c3 | c1]
  // with the 3x3 and 1x1 kernels at the centre of a zero 5x5 window.  A block
  // then stages its weights with consecutive threads on consecutive output
  // channels: coalesced loads and conflict-free shared-memory stores.
  std::uintptr_t wp = 0;
  std::int64_t n = 0, c = 0, h = 0, w = 0;
  std::int64_t c1 = 0, c3 = 0, c5 = 0;
  Layout layout = Layout::NCHW;
  bool relu = true;
};

// Checks every field the kernels rely on; throws std::invalid_argument (a
// Python ValueError through pybind11) with a plain message.  empty_branches:
// the CUDA kernels also run a layer with no 1x1 or no 5x5 channels (a plain
// 3x3 convolution is c1 = c5 = 0), whose weights and bias are then never read
// (and may be null); the CPU kernel needs all three.
inline void validate(const MsConvArgs& a, bool empty_branches = false) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("fused_ms_conv: " + m); };
  if (!a.x || !a.out || ((a.c1 > 0 || !empty_branches) && (!a.w1 || !a.b1)) || !a.w3 || !a.b3 ||
      ((a.c5 > 0 || !empty_branches) && (!a.w5 || !a.b5)))
    fail("null data pointer");
  if (a.n < 1 || a.c < 1 || a.h < 1 || a.w < 1)
    fail("input must be non-empty (N, C, H, W >= 1), got N=" + std::to_string(a.n) +
         " C=" + std::to_string(a.c) + " H=" + std::to_string(a.h) + " W=" + std::to_string(a.w));
  if (!empty_branches && (a.c1 < 1 || a.c3 < 1 || a.c5 < 1)) fail("c1, c3 and c5 must each be >= 1");
  if (empty_branches && (a.c1 < 0 || a.c3 < 1 || a.c5 < 0)) fail("c3 must be >= 1, c1 and c5 >= 0");
  if (a.layout != Layout::NCHW && a.layout != Layout::NHWC) fail("unknown layout");
  // The CUDA kernel indexes with 32-bit integers; keep both paths to one rule.
  const std::int64_t lim = (std::int64_t(1) << 31) - 1;
  const std::int64_t ctot = a.c1 + a.c3 + a.c5;
  if (a.n * a.c * a.h * a.w > lim || a.n * ctot * a.h * a.w > lim || ctot * a.c * 25 > lim)
    fail("tensor too large (more than 2^31-1 elements)");
}

// CPU, float32 only.  num_threads <= 0 means the OpenMP default.  Packs the
// weights on every call.
void msconv_cpu_f32(const MsConvArgs& a, int num_threads);

// How the packed CPU kernel computes a layer.  Direct: exact tap-by-tap
// multiply-adds (float32 rounding ~1e-7 relative).  Winograd: F(4x4, 5x5),
// about 3x fewer multiplies, ~1e-5 relative rounding.  Auto: Winograd where
// it is predicted faster (enough input channels, enough 4x4 tiles to reuse
// its larger transformed weights, fewer multiply-adds), else direct.
enum class CpuAlgo : int { Auto = 0, Direct = 1, Winograd = 2 };

// Weights packed once (for a module whose weights do not change between
// calls): at batch 1 packing costs as much as the convolution itself.  Holds
// a copy; the original weights may be freed.
class CpuPackedWeights {
 public:
  // Uses w*/b* and c, c1, c3, c5 of `weights`.
  CpuPackedWeights(const MsConvArgs& weights, int num_threads, CpuAlgo algo = CpuAlgo::Auto);
  ~CpuPackedWeights();
  CpuPackedWeights(const CpuPackedWeights&) = delete;
  CpuPackedWeights& operator=(const CpuPackedWeights&) = delete;
  void run(const MsConvArgs& a, int num_threads) const;  // uses x, out, shapes, layout, relu
  // Direct or Winograd: what run() uses for an n x c x h x w input.
  CpuAlgo algorithm_for(std::int64_t n, std::int64_t h, std::int64_t w) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::int64_t c_, c1_, c3_, c5_;
  CpuAlgo algo_;
};

// fer_edge's CUDA kernels (the caller chooses: fer_edge/dispatch.py's table).
// Mma: the small-batch kernel on tensor cores (float16, or float32 as 3xTF32;
// NHWC, the cutlass path's weight layout, sm_80+: msconv_cuda_mma.h).
// Cutlass: the large-batch path, one implicit GEMM per branch (float16 NHWC,
// sm_80+, builds that found CUTLASS's headers: msconv_cuda_igemm.h).
// Stem: inputs of at most 4 channels (MACNN's first layer: msconv_cuda_stem.h).
// CutlassSm90: Cutlass on Hopper's wgmma and TMA (compute capability 9.0, builds for sm_90).
// CutlassWindow, CutlassSm90Window: the same two as one launch over the zero-padded
// 5x5 window (igemm::Form::Window).
enum class Variant : int {
  Simt = 0, Wmma = 1, SplitK = 2, Mma = 3, Cutlass = 4, Stem = 5, CutlassSm90 = 6,
  CutlassWindow = 7, CutlassSm90Window = 8
};
constexpr int NUM_VARIANTS = 9;

#ifdef FER_EDGE_WITH_CUDA
// CUDA, float32 or float16 (float32 accumulation) on the given stream.
// Reads the weights from `wp` (required; w1/w3/w5 are not read: pack_ms_weights's
// layout, pack_krsc_weights's for Mma and Cutlass, pack_window_weights's for the window
// forms) and the biases from b1/b3/b5 (but the window forms, whose pack holds them).
// SplitK reads and writes `workspace` (float32) and `counters` (int32, zero
// before the first call, left zero by every call), sized by splitk::plan; so does
// Mma, sized by mma::plan (its workspace zero before the first call too);
// Cutlass and CutlassWindow use `counters` as their split-K semaphores, sized by
// igemm::semaphores (they clear them themselves).
// `options`, for the benchmarks' tile sweeps (the defaults are what every caller gets):
// Mma's pixel tile and K chunk instead of its plan's (0: the plan's), buffers sized to
// match; whether it launches as a programmatic dependent of the kernel before it where
// the GPU and the build have that (9.0+); the Hopper CUTLASS kernels' channel tile
// instead of igemm90::tile_n's (0: its choice, else 64 or 128).
struct KernelOptions {
  int mma_bm = 0;
  std::int64_t mma_kchunk = 0;
  bool mma_pdl = true;
  int cutlass90_tile_n = 0;
};
void msconv_cuda(const MsConvArgs& a, DType dtype, std::uintptr_t stream, Variant variant,
                 std::uintptr_t workspace = 0, std::uintptr_t counters = 0, KernelOptions options = {});
int cuda_device_count();
int cuda_runtime_version();  // CUDART_VERSION the module was built with
#endif

}  // namespace fer_edge
