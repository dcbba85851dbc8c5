// The large-batch ("cutlass") CUDA path's tile choice and its input rules:
// plain host code, so that every build (CPU-only too) exposes them and the
// CPU tests check their arithmetic.
//
// The path runs each branch of the fused layer (1x1, 3x3, 5x5) as its own
// implicit-GEMM convolution on tensor cores (CUTLASS's SM80 mma.sync
// pipeline, float16 in, float32 accumulation), with bias and ReLU in the
// epilogue, written straight into the branch's channel slice of the NHWC
// output.  It has two forms (Form): one launch per branch, which multiplies
// none of the zero taps that a merged 5x5 window carries for the 3x3 and 1x1
// kernels, or one launch for the whole layer over that zero-padded window,
// which multiplies them (up to 25x more work for the 1x1 channels) but fills
// the GPU with one grid where small batches leave three grids short of work.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "msconv.h"

namespace fer_edge {
namespace igemm {

// The compiled tile shapes (msconv_cuda_cutlass.cu instantiates exactly these,
// in this order).  m: output pixels (N*H*W flattened), n: output channels,
// k: input channels x taps per pipeline step.
struct Tile {
  int m, n, k;
};
constexpr int NUM_TILES = 3;
constexpr Tile TILES[NUM_TILES] = {{128, 128, 32}, {128, 64, 32}, {64, 64, 32}};
// Every pointer, the input channels, each branch's channels and the output's
// channel offsets are multiples of 8 halves: 16-byte vector loads and stores.
constexpr int ALIGN = 8;

// How fast a tile multiplies, relative to the largest: a block loads m + n
// values per k for m * n multiply-adds, so its rate grows with the tile's
// arithmetic intensity m*n/(m+n) (taken as its square root: loads overlap the
// multiplies in the pipeline).  128x128: 1, 128x64: 0.82, 64x64: 0.71.
inline double tile_rate(const Tile& t) {
  const double big = 128.0 * 128.0 / 256.0;
  return std::sqrt((double(t.m) * t.n / (t.m + t.n)) / big);
}

// The tile for one branch: GEMM M = m pixels, N = cout channels, on a GPU with
// sm_count SMs.  A tile wider than the branch wastes its extra columns, a
// grid that ends in a partial wave leaves SMs idle, and a smaller tile
// multiplies more slowly (tile_rate): pick the best product, the larger tile
// on a tie.
inline int pick_tile(std::int64_t m, std::int64_t cout, int sm_count) {
  int best = NUM_TILES - 1;
  double best_score = -1.0;
  for (int i = 0; i < NUM_TILES; ++i) {
    const Tile& t = TILES[i];
    const std::int64_t mt = (m + t.m - 1) / t.m, nt = (cout + t.n - 1) / t.n;
    const std::int64_t blocks = mt * nt;
    const double useful = double(m) * double(cout) / (double(mt * t.m) * double(nt * t.n));
    const std::int64_t waves = (blocks + sm_count - 1) / sm_count;
    const double busy = double(blocks) / double(waves * sm_count);  // SMs busy, averaged over the waves
    const double score = useful * busy * tile_rate(t);
    if (score > best_score * 1.0001) {  // strictly better (tiles are in decreasing size)
      best = i;
      best_score = score;
    }
  }
  return best;
}

// Serial split-K for a branch whose grid would leave most SMs idle (small
// batches): its input channels are dealt out to `splits` slices that run in
// parallel (in CUTLASS's order: slice k takes the 32-channel steps k, k + S,
// k + 2S, ...), and their partial sums meet in the output one slice after
// another (a per-tile semaphore, the last slice applying the ReLU).  No more
// slices than 32-channel steps, at most MAX_SPLITS (each slice waits for the
// one before it to finish its epilogue), and a grid that already fills half
// the GPU is not split.
constexpr int MAX_SPLITS = 4;
inline int pick_splits(std::int64_t m, std::int64_t cout, std::int64_t c, const Tile& t, int sm_count) {
  const std::int64_t blocks = ((m + t.m - 1) / t.m) * ((cout + t.n - 1) / t.n);
  if (2 * blocks >= sm_count) return 1;
  const std::int64_t by_channels = (c + t.k - 1) / t.k, by_sms = (sm_count + blocks - 1) / blocks;
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>({MAX_SPLITS, by_channels, by_sms})));
}

// The path's two forms.  PerBranch: a launch per branch, weights from
// pack_krsc_weights.  Window: one launch, the 1x1 and 3x3 kernels at the
// centre of a zero 5x5 window, output channels [c1 | c3 | c5] contiguous,
// weights and biases from pack_window_weights: (ctot, 5, 5, C) KRSC, then the
// ctot biases in the same dtype.
enum class Form : int { PerBranch = 0, Window = 1 };

// One launch's convolution: its window, output channels, first channel in the
// output, where its KRSC kernel starts in the pack (in elements) and its bias.
// PerBranch: the pack is [w1 (c1,1,1,C) | w3 (c3,3,3,C) | w5 (c5,5,5,C)]
// (fer_edge.kernels.pack_krsc_weights), in launch order, heaviest first (the
// 5x5 has 25 taps per pixel).  Window: one 5x5 launch over every channel, its
// biases behind its kernel in the pack.  Unused entries have cout = 0.
struct Branch {
  int k, cout, offset;
  std::int64_t weights;
  std::uintptr_t bias;
};
constexpr std::uintptr_t HALF_BYTES = 2;  // the path computes float16 only
inline std::array<Branch, 3> branches(const MsConvArgs& a, Form form = Form::PerBranch) {
  const int c1 = int(a.c1), c3 = int(a.c3), c5 = int(a.c5);
  if (form == Form::Window) {
    const std::int64_t kernel = 25 * a.c * (c1 + c3 + c5);
    return {{{5, c1 + c3 + c5, 0, 0, a.wp + std::uintptr_t(kernel) * HALF_BYTES}, {}, {}}};
  }
  return {{{5, c5, c1 + c3, a.c * (c1 + 9 * std::int64_t(c3)), a.b5},
           {3, c3, c1, a.c * c1, a.b3},
           {1, c1, 0, 0, a.b1}}};
}

// The int32 semaphores the split launches need: one per output tile of the
// largest split launch (the launches run one after another and each clears
// them first), 0 when none is split.
inline std::int64_t semaphores(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1,
                               std::int64_t c3, std::int64_t c5, int sm_count, Form form = Form::PerBranch) {
  MsConvArgs sizes;  // branches() of the layer's sizes (no pointers read)
  sizes.c = c; sizes.c1 = c1; sizes.c3 = c3; sizes.c5 = c5;
  const std::int64_t m = n * h * w;
  std::int64_t most = 0;
  for (const Branch& b : branches(sizes, form)) {
    if (b.cout == 0) continue;
    const Tile& t = TILES[pick_tile(m, b.cout, sm_count)];
    if (pick_splits(m, b.cout, c, t, sm_count) > 1)
      most = std::max(most, ((m + t.m - 1) / t.m) * ((b.cout + t.n - 1) / t.n));
  }
  return most;
}

// Why this layer cannot run the path, or "" when it can.  Pointers are checked
// for 16-byte alignment (a view into a larger tensor may not be).  The window
// form reads its biases from the pack (16-byte aligned there: C is a multiple of 8).
inline std::string unsupported(const MsConvArgs& a, DType dtype, Form form = Form::PerBranch) {
  if (dtype != DType::Float16) return "it computes float16 only";
  if (a.layout != Layout::NHWC) return "it reads and writes channels_last (NHWC) tensors only";
  if (a.c % ALIGN || a.c1 % ALIGN || a.c3 % ALIGN || a.c5 % ALIGN)
    return "it needs input channels and c1, c3, c5 that are multiples of 8";
  // An empty branch's bias is never read: its address does not matter.
  const bool own = form == Form::PerBranch;
  const std::uintptr_t ptrs[] = {a.x, a.out, a.wp, own && a.c1 ? a.b1 : 0, own && a.c3 ? a.b3 : 0,
                                 own && a.c5 ? a.b5 : 0};
  for (std::uintptr_t p : ptrs)
    if (p % 16) return "it needs 16-byte aligned tensors (no offset views)";
  return "";
}

#ifdef FER_EDGE_WITH_CUTLASS
// The launches on `stream` (the caller checked unsupported() and the
// compute capability, 8.0+), weights from `wp` as branches() reads them.
// `semaphores`: at least semaphores() int32s of device memory (unused, and
// may be 0, when that is 0).
void launch(const MsConvArgs& a, std::uintptr_t stream, int sm_count, std::uintptr_t semaphores, Form form);
#endif

}  // namespace igemm

namespace igemm90 {
// The Hopper launches' tiles (msconv_cuda_cutlass_sm90.cu instantiates exactly these):
// 128 pixels x TILE_N channels x 64 (channels x taps) per step, TILE_N 64 or 128.
constexpr int TILE_M = 128, TILE_K = 64;
constexpr int TILE_NS[] = {64, 128};
// A launch's channel tile for GEMM M = m pixels and N = cout channels on sm_count SMs: 128
// (twice the multiply-adds per value loaded) unless it pads more channels than 64 does
// (192 channels: 256 against 192; 96: 128 either way) or its grid would leave SMs idle
// where 64 gives more blocks (small batches).  override_n other than 0 replaces the choice
// (the benchmarks' sweep).
inline int tile_n(std::int64_t m, std::int64_t cout, int sm_count, int override_n = 0) {
  if (override_n) return override_n;
  const std::int64_t wide = (cout + 127) / 128, narrow = (cout + 63) / 64;
  if (wide * 128 > narrow * 64) return 64;
  const std::int64_t m_tiles = (m + TILE_M - 1) / TILE_M;
  if (m_tiles * wide < sm_count && narrow > wide) return 64;
  return 128;
}
inline bool valid_tile_n(int n) { return n == 0 || n == 64 || n == 128; }

#ifdef FER_EDGE_WITH_CUTLASS_SM90
// The same launches on Hopper's wgmma and TMA (the caller checked unsupported() and
// compute capability 9.0 exactly), no split-K, no buffers; tile_n: tile_n()'s override.
void launch(const MsConvArgs& a, std::uintptr_t stream, igemm::Form form, int sm_count, int tile_n = 0);
#endif
}  // namespace igemm90
}  // namespace fer_edge
