// Internal to the CPU kernels (msconv_cpu.cpp, msconv_cpu_winograd.cpp): not
// part of the module's interface.
#pragma once

#include <cstdint>
#include <vector>

#include "msconv.h"

namespace fer_edge {

inline std::int64_t round_up(std::int64_t v, std::int64_t m) { return (v + m - 1) / m * m; }

// Output channel co of the concatenated order [c1 | c3 | c5]: its branch's
// kernel size, its OIHW weights (c x k x k) and its bias.  Both packers
// (direct and Winograd) scatter weights through this one definition.
struct OutputChannel {
  int k;
  const float* w;
  float bias;
};

inline OutputChannel output_channel(const MsConvArgs& a, std::int64_t co) {
  const auto f = [](std::uintptr_t ptr) { return reinterpret_cast<const float*>(ptr); };
  if (co < a.c1) return {1, f(a.w1) + co * a.c, f(a.b1)[co]};
  if (co < a.c1 + a.c3) return {3, f(a.w3) + (co - a.c1) * a.c * 9, f(a.b3)[co - a.c1]};
  return {5, f(a.w5) + (co - a.c1 - a.c3) * a.c * 25, f(a.b5)[co - a.c1 - a.c3]};
}

// OpenMP thread count for num_threads (<= 0: the OpenMP default; 1 without OpenMP).
int thread_count(int num_threads);

// Zero-padded NHWC copy of a.x into xp: 2 pixels of halo on the top and left,
// Hp x Wp pixels in all (Hp >= H + 4, Wp >= W + 4; the extra rows/columns on
// the bottom/right are zeros too, so whole tiles never need a bounds check).
void pad_input_nhwc(const MsConvArgs& a, std::int64_t Hp, std::int64_t Wp, std::vector<float>& xp, int nt);

// Winograd F(4x4, 5x5): the three branches share one 8x8 input transform
// (the 1x1 and 3x3 kernels sit at the centre of a zero 5x5), so a tile costs
// 64 multiply-adds per (input, output) channel pair instead of 25 / 9 / 1 per
// output pixel, i.e. 4 per pixel.  Float32 rounding: about 1e-5 relative to
// the output's magnitude (the direct path: about 1e-7).
struct WinogradPlan {
  std::int64_t ctot = 0, cpad = 0;  // cpad: ctot rounded up to 16
  std::vector<float> u;     // transformed weights [64][cpad / 16][c][16], concatenated channel order
  std::vector<float> bias;  // [cpad]
};

void winograd_pack(const MsConvArgs& weights, int nt, WinogradPlan& p);
void winograd_run(const MsConvArgs& a, const WinogradPlan& p, int nt);

}  // namespace fer_edge
