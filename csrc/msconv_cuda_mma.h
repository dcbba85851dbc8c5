// The small-batch tensor-core ("mma") CUDA kernel's launch plan: plain host
// code, so that CPU-only builds expose it too and its arithmetic is tested
// everywhere.
//
// What it computes: the three branches of the fused layer as three implicit
// GEMMs (M = output pixels n*H*W, N = the branch's channels, K = its taps x
// input channels: 1x1 reads C values per pixel, 3x3 9C, 5x5 25C, so no zero
// tap is multiplied), in one launch.  At batch 1 to 8 M is small (MACNN's L4
// at batch 1: 36 pixels) and the cost is reading the weights (up to 6.5 MB),
// so each branch's K is cut into chunks and every (branch, M tile, N tile,
// K chunk) is one block of its own: enough blocks to keep every SM streaming
// a distinct part of the weights, each read once.  Chunks of one output tile
// meet by float32 atomic adds in a workspace that starts at zero; the tile's
// last block to arrive (a counter per tile) adds the bias, applies the ReLU,
// writes the result into the branch's channel slice of the output, and puts the
// workspace and the counter back to zero, so the kernel is re-entrant and
// safe to replay in a CUDA graph with no memset.  A tile with one chunk
// writes its output straight from registers.
//
// Inputs: those of the cutlass path (igemm::unsupported, Form::PerBranch) but
// float32 too: NHWC, channel counts that are multiples of 8, 16-byte aligned,
// pack_krsc_weights's layout; compute capability 8.0+ (cp.async, mma.sync:
// m16n8k16 in float16, m16n8k8 tf32 in float32, each float32 value split
// into two tf32 parts and multiplied three times (3xTF32), which keeps about
// float32's precision).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>

#include "msconv.h"
#include "msconv_cuda_igemm.h"

namespace fer_edge {
namespace mma {

constexpr int BN = 64;        // output channels per block: 4 warps x 16
constexpr int BK = 32;        // k per pipeline stage in float16 (16 in float32: 64 bytes of k per row either way)
constexpr int STAGES = 4;     // cp.async stages in flight
constexpr int THREADS = 128;
constexpr int MIN_CHUNK = 4 * BK;  // a chunk fills the pipeline at least once
constexpr int MAX_MT = 4;     // pixel tiles of 16, 32, 48 or 64 rows (BM = 16 * mt)

// Shared memory per block: STAGES stages of BM pixel rows and BN weight rows, 80 bytes each
// (msconv_cuda_mma.cu's s_a and s_b; the same in float16 and float32).
constexpr int ROW_BYTES = 80;
constexpr int smem_bytes(int bm) { return STAGES * (bm + BN) * ROW_BYTES; }
// What a block takes of an SM's shared memory: its own (plus one int, the last-chunk flag)
// in 128-byte units, and the 1 KB the driver reserves per block on sm_80 and later.
constexpr int block_footprint(int bm) { return (smem_bytes(bm) + 4 + 127) / 128 * 128 + 1024; }
// The blocks of one tile shape that fit an SM at once, in the shared memory every sm_80+
// GPU has (A100 and Jetson Orin: 164 KB per SM; H100: 228 KB): 6 blocks of 16 rows, 5
// of 32, 4 of 48, 3 of 64.  Registers (62 to 121 per thread, 128 threads) allow as many.
constexpr int SMEM_PER_SM = 164 * 1024;
constexpr int resident_blocks(int bm) { return SMEM_PER_SM / block_footprint(bm); }

// The fewest padded rows over the tiles, the larger tile on a tie (fewer blocks
// reading the same weights).
inline int fewest_padded_rows(std::int64_t m) {
  int best = 16 * MAX_MT;
  std::int64_t best_rows = -1;
  for (int mt = MAX_MT; mt >= 1; --mt) {
    const std::int64_t bm = 16 * mt, rows = (m + bm - 1) / bm * bm;
    if (best_rows < 0 || rows < best_rows) {
      best = int(bm);
      best_rows = rows;
    }
  }
  return best;
}

// The block's pixel rows.  While the grid of 16-row tiles, unsplit, would not
// fill the GPU's resident blocks (batch 1-2 of MACNN's layers), 16: measured on an
// H200 at batch 1 (L2-L5), the smaller the tile and the more blocks, the faster
// (L4: 16 rows 9.4 us, 48 rows with as many padded rows 11.6 us), since the cost
// is each block's latency, not the weights re-read from L2.  Larger grids: the
// fewest padded rows.  `tiles16`: the 16-row tiles of every branch (M x N tiles).
inline int pick_bm(std::int64_t m, std::int64_t tiles16, int sm_count) {
  if (tiles16 <= std::int64_t(resident_blocks(16)) * sm_count) return 16;
  return fewest_padded_rows(m);
}

// One branch's part of the launch (igemm::branches order: 5x5, 3x3, 1x1).
struct BranchPlan {
  int k = 0, cout = 0, offset = 0;  // window, channels, first output channel
  std::int64_t weights = 0;         // where its KRSC kernel starts in the pack (elements)
  std::int64_t kdim = 0;            // GEMM K: k * k * C
  std::int64_t m_tiles = 0, n_tiles = 0, chunks = 0;
  std::int64_t first_unit = 0;      // its first block in the grid
  std::int64_t first_counter = 0;   // its first tile counter (used when chunks > 1)
};

struct Plan {
  int bm = 0;
  std::int64_t kchunk = 0;  // K per block (a multiple of BK)
  std::int64_t units = 0;   // blocks
  int branches = 0;         // non-empty branches, first in `b`
  std::array<BranchPlan, 3> b{};
  std::int64_t workspace_floats = 0;  // n*H*W x ctot float32 (zero between calls), 0 when nothing is split
  std::int64_t counters = 0;          // int32 per split tile (zero between calls)
};

// The smallest chunk (MIN_CHUNK, doubling) whose blocks all fit the GPU at once
// (resident_blocks per SM): more, shorter blocks finish sooner (the same H200
// sweep: 128-deep chunks fastest on every layer at batch 1, up to 5 blocks per
// SM), and a second wave would wait for the first.  A chunk as long as the
// longest K splits nothing.  bm / kchunk other than 0 replace the choice (a
// valid_override(): for the tile sweep of the benchmarks, which measures what
// these rules should pick).
inline bool valid_override(int bm, std::int64_t kchunk) {
  return (bm == 0 || (bm % 16 == 0 && bm >= 16 && bm <= 16 * MAX_MT)) &&
         (kchunk == 0 || (kchunk % BK == 0 && kchunk >= BK && kchunk <= (std::int64_t(1) << 30)));
}

inline Plan plan(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3,
                 std::int64_t c5, int sm_count, int bm = 0, std::int64_t kchunk = 0) {
  Plan p{};
  const std::int64_t m = n * h * w;
  MsConvArgs sizes;  // igemm::branches of the layer's sizes (no pointers read)
  sizes.c = c; sizes.c1 = c1; sizes.c3 = c3; sizes.c5 = c5;
  std::int64_t n_tiles = 0;
  for (const igemm::Branch& br : igemm::branches(sizes)) n_tiles += (br.cout + BN - 1) / BN;
  p.bm = bm ? bm : pick_bm(m, (m + 15) / 16 * n_tiles, sm_count);
  const std::int64_t m_tiles = (m + p.bm - 1) / p.bm;
  std::int64_t kmax = 0;
  for (const igemm::Branch& br : igemm::branches(sizes)) {
    if (br.cout == 0) continue;
    BranchPlan& b = p.b[p.branches++];
    b.k = br.k;
    b.cout = br.cout;
    b.offset = br.offset;
    b.weights = br.weights;
    b.kdim = std::int64_t(br.k) * br.k * c;
    b.m_tiles = m_tiles;
    b.n_tiles = (br.cout + BN - 1) / BN;
    kmax = std::max(kmax, b.kdim);
  }
  auto units_for = [&](std::int64_t chunk) {
    std::int64_t u = 0;
    for (int i = 0; i < p.branches; ++i) u += p.b[i].m_tiles * p.b[i].n_tiles * ((p.b[i].kdim + chunk - 1) / chunk);
    return u;
  };
  p.kchunk = MIN_CHUNK;
  const std::int64_t resident = std::int64_t(resident_blocks(p.bm)) * sm_count;
  while (p.kchunk < kmax && units_for(p.kchunk) > resident) p.kchunk *= 2;
  if (kchunk) p.kchunk = kchunk;
  for (int i = 0; i < p.branches; ++i) {
    BranchPlan& b = p.b[i];
    b.chunks = (b.kdim + p.kchunk - 1) / p.kchunk;
    b.first_unit = p.units;
    p.units += b.m_tiles * b.n_tiles * b.chunks;
    if (b.chunks > 1) {
      b.first_counter = p.counters;
      p.counters += b.m_tiles * b.n_tiles;
    }
  }
  if (p.counters > 0) p.workspace_floats = m * (c1 + c3 + c5);
  return p;
}

// Why the kernel cannot run this layer ("" when it can): the cutlass path's rules, float32 allowed.
inline std::string unsupported(const MsConvArgs& a, DType dtype) {
  if (dtype != DType::Float16 && dtype != DType::Float32) return "it computes float16 and float32 only";
  return igemm::unsupported(a, DType::Float16);
}

#ifdef FER_EDGE_WITH_CUDA
// One launch on `stream` (the caller checked unsupported() and the compute
// capability, 8.0+); `workspace`/`counters` as plan() sizes them (with the same
// bm / kchunk), zero-filled once by their owner (unused, and may be 0, when
// plan() asks for none).  pdl: as a programmatic dependent launch (compute
// capability 9.0+ only: scheduled while the kernel before it finishes).
void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int sm_count, std::uintptr_t workspace,
            std::uintptr_t counters, int bm = 0, std::int64_t kchunk = 0, bool pdl = false);
#endif

}  // namespace mma
}  // namespace fer_edge
