// The small-batch ("splitk") CUDA kernel's launch plan: plain host code, so
// that CPU-only builds expose it too and its arithmetic is tested everywhere.
#pragma once

#include <algorithm>
#include <cstdint>

#include "msconv.h"

namespace fer_edge {
namespace splitk {

constexpr int TM = 32;                 // output pixels per block (the batch's pixels, flattened)
constexpr int CPT = 8;                 // channels per thread
constexpr int CGROUPS = 8;             // channel groups per block
constexpr int TN = CPT * CGROUPS;      // channels per block
constexpr int THREADS = TM * CGROUPS;  // 256
constexpr int KC = 4;                  // input channels per shared-memory stage

struct Plan {
  int m_tiles = 0, n_tiles = 0;  // grid x, y
  int splits = 1;                // grid z: slices of the input channels
  int kslice = 0;                // input channels per slice (a multiple of KC)
  std::int64_t workspace_floats = 0;  // float32 partial sums (splits x ctot x n*h*w), 0 without split-K
  std::int64_t counters = 0;          // int32 per-tile arrival counters, zero-initialised once
};

// About two blocks per SM, never a slice of fewer than kc input channels, and no
// empty slice after rounding.
inline Plan plan(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t ctot,
                 int sm_count, int kc = KC) {
  Plan p{};
  const std::int64_t m = n * h * w;
  p.m_tiles = static_cast<int>((m + TM - 1) / TM);
  p.n_tiles = static_cast<int>((ctot + TN - 1) / TN);
  const std::int64_t tiles = static_cast<std::int64_t>(p.m_tiles) * p.n_tiles;
  const std::int64_t want = std::max<std::int64_t>(1, (2LL * sm_count + tiles - 1) / tiles);
  const std::int64_t most = std::max<std::int64_t>(1, (c + kc - 1) / kc);
  const std::int64_t splits = std::min(want, most);
  const std::int64_t slice = (c + splits - 1) / splits;
  p.kslice = static_cast<int>((slice + kc - 1) / kc * kc);
  p.splits = static_cast<int>((c + p.kslice - 1) / p.kslice);
  p.workspace_floats = p.splits > 1 ? static_cast<std::int64_t>(p.splits) * m * ctot : 0;
  p.counters = p.splits > 1 ? tiles : 0;
  return p;
}

#ifdef FER_EDGE_WITH_CUDA
int sm_count_of(int device);
// One launch on `stream`; `workspace`/`counters` as plan() sizes them (unused when splits == 1).
void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int sm_count, std::uintptr_t workspace,
            std::uintptr_t counters);
#endif

}  // namespace splitk
}  // namespace fer_edge
