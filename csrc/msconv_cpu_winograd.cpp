// Winograd F(4x4, 5x5) path of the CPU fused multi-scale convolution.
//
// Why: the direct kernel already runs near this CPU's fp32 FMA peak, so the
// only way to be much faster is fewer multiplies.  Each 8x8 input tile is
// transformed once (V = B^T d B) and shared by all three branches: the 1x1
// and 3x3 kernels are embedded at the centre of a zero 5x5, so every output
// channel's transformed kernel U = G g G^T is 8x8.  The 64 positions of a
// tile are then 64 independent small GEMMs  M[p] = V[p] (tiles x C) * U[p]
// (C x ctot), and the output transform A^T M A gives 4x4 output pixels per
// tile, written with bias and ReLU straight into their slice of the
// concatenated output.  Per output pixel and (input, output) channel pair
// that is 64 / 16 = 4 multiply-adds against 25 / 9 / 1 for the direct
// 5x5 / 3x3 / 1x1: a 3.25x saving on MACNN's c1:c3:c5 = 1/4 : 3/8 : 3/8.
//
// Toom-Cook points 0, +-1, +-2, +-1/2, infinity (the usual, best-conditioned
// choice for an 8-point transform); matrices derived symbolically and checked
// against direct correlation in tests/test_kernels_packed.py.
#include <algorithm>
#include <cstring>

#include "msconv_cpu_internal.h"

namespace fer_edge {
namespace {

constexpr int VB = 16;  // channels per vector block (one AVX-512 register, two AVX2)
constexpr int RB = 8;   // tiles per GEMM register block

// Kernel transform G (8x5), exact fractions.
constexpr double kG[8][5] = {
    {-1.0, 0.0, 0.0, 0.0, 0.0},
    {-2.0 / 9, -2.0 / 9, -2.0 / 9, -2.0 / 9, -2.0 / 9},
    {-2.0 / 9, 2.0 / 9, -2.0 / 9, 2.0 / 9, -2.0 / 9},
    {1.0 / 90, 2.0 / 90, 4.0 / 90, 8.0 / 90, 16.0 / 90},
    {1.0 / 90, -2.0 / 90, 4.0 / 90, -8.0 / 90, 16.0 / 90},
    {32.0 / 45, 16.0 / 45, 8.0 / 45, 4.0 / 45, 2.0 / 45},
    {32.0 / 45, -16.0 / 45, 8.0 / 45, -4.0 / 45, 2.0 / 45},
    {0.0, 0.0, 0.0, 0.0, 1.0},
};

// Input transform B^T (8x8) and output transform A^T (4x8), applied by the
// two functions below:
//   B^T = [ -1    0    5.25  0    -5.25  0    1  0 ]    A^T = [ 1  1  1  1  1  1     1      0 ]
//         [  0    1    1    -4.25 -4.25  1    1  0 ]          [ 0  1 -1  2 -2  1/2  -1/2    0 ]
//         [  0   -1    1     4.25 -4.25 -1    1  0 ]          [ 0  1  1  4  4  1/4   1/4    0 ]
//         [  0    1/2  1/4  -2.5  -1.25  2    1  0 ]          [ 0  1 -1  8 -8  1/8  -1/8    1 ]
//         [  0   -1/2  1/4   2.5  -1.25 -2    1  0 ]
//         [  0    2    4    -2.5  -5     1/2  1  0 ]
//         [  0   -2    4     2.5  -5    -1/2  1  0 ]
//         [  0   -1    0     5.25  0    -5.25 0  1 ]

// The 8-point input transform B^T along one axis, on VB channels at once:
// in[k * is + j] -> out[i * os + j].  Written out (shared sub-expressions,
// no multiplies by 0 or 1) because the generic matrix loop ran 3x slower.
inline void input_transform_1d(const float* in, std::int64_t is, float* out, std::int64_t os) {
#pragma omp simd
  for (int j = 0; j < VB; ++j) {
    const float d0 = in[j], d1 = in[is + j], d2 = in[2 * is + j], d3 = in[3 * is + j];
    const float d4 = in[4 * is + j], d5 = in[5 * is + j], d6 = in[6 * is + j], d7 = in[7 * is + j];
    const float a12 = d2 + d6 - 4.25f * d4, b12 = d1 + d5 - 4.25f * d3;
    const float a34 = 0.25f * d2 - 1.25f * d4 + d6, b34 = 0.5f * d1 - 2.5f * d3 + 2.f * d5;
    const float a56 = 4.f * d2 - 5.f * d4 + d6, b56 = 2.f * d1 - 2.5f * d3 + 0.5f * d5;
    out[j] = d6 - d0 + 5.25f * (d2 - d4);
    out[os + j] = a12 + b12;
    out[2 * os + j] = a12 - b12;
    out[3 * os + j] = a34 + b34;
    out[4 * os + j] = a34 - b34;
    out[5 * os + j] = a56 + b56;
    out[6 * os + j] = a56 - b56;
    out[7 * os + j] = d7 - d1 + 5.25f * (d3 - d5);
  }
}

// The output transform A^T along one axis: in[k * is + j] (k < 8) -> out[r * os + j] (r < 4).
inline void output_transform_1d(const float* in, std::int64_t is, float* out, std::int64_t os) {
#pragma omp simd
  for (int j = 0; j < VB; ++j) {
    const float m0 = in[j], m1 = in[is + j], m2 = in[2 * is + j], m3 = in[3 * is + j];
    const float m4 = in[4 * is + j], m5 = in[5 * is + j], m6 = in[6 * is + j], m7 = in[7 * is + j];
    const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4, s56 = m5 + m6, d56 = m5 - m6;
    out[j] = m0 + s12 + s34 + s56;
    out[os + j] = d12 + 2.f * d34 + 0.5f * d56;
    out[2 * os + j] = s12 + 4.f * s34 + 0.25f * s56;
    out[3 * os + j] = d12 + 8.f * d34 + 0.125f * d56 + m7;
  }
}

// One output channel's kernel (k x k, k in {1, 3, 5}) centred in a 5x5 and
// transformed: u = G g5 G^T, in double so packing adds no rounding of its own.
void transform_kernel(const float* g, int k, double u[8][8]) {
  double g5[5][5] = {};
  const int off = 2 - k / 2;
  for (int y = 0; y < k; ++y)
    for (int x = 0; x < k; ++x) g5[off + y][off + x] = g[y * k + x];
  double t[8][5];
  for (int i = 0; i < 8; ++i)
    for (int x = 0; x < 5; ++x) {
      double s = 0;
      for (int y = 0; y < 5; ++y) s += kG[i][y] * g5[y][x];
      t[i][x] = s;
    }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = 0;
      for (int x = 0; x < 5; ++x) s += t[i][x] * kG[j][x];
      u[i][j] = s;
    }
}

// M (rb tiles x VB channels) = V (rb x C) * U (C x VB) for one position.
template <int R>
inline void gemm_block(const float* v, std::int64_t C, const float* u, float* m, std::int64_t mstride) {
  float acc[R][VB] = {};
  for (std::int64_t ci = 0; ci < C; ++ci) {
    const float* uv = u + ci * VB;
    for (int r = 0; r < R; ++r) {
      const float xv = v[r * C + ci];
#pragma omp simd
      for (int j = 0; j < VB; ++j) acc[r][j] += xv * uv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < VB; ++j) m[r * mstride + j] = acc[r][j];
}

void gemm_rows(int rb, const float* v, std::int64_t C, const float* u, float* m, std::int64_t mstride) {
  switch (rb) {
    case 8: gemm_block<8>(v, C, u, m, mstride); break;
    case 7: gemm_block<7>(v, C, u, m, mstride); break;
    case 6: gemm_block<6>(v, C, u, m, mstride); break;
    case 5: gemm_block<5>(v, C, u, m, mstride); break;
    case 4: gemm_block<4>(v, C, u, m, mstride); break;
    case 3: gemm_block<3>(v, C, u, m, mstride); break;
    case 2: gemm_block<2>(v, C, u, m, mstride); break;
    default: gemm_block<1>(v, C, u, m, mstride); break;
  }
}

}  // namespace

void winograd_pack(const MsConvArgs& a, int nt, WinogradPlan& p) {
  const std::int64_t C = a.c;
  p.ctot = a.c1 + a.c3 + a.c5;
  p.cpad = round_up(p.ctot, VB);
  const std::int64_t nk = p.cpad / VB;
  p.u.assign(static_cast<size_t>(64 * nk * C * VB), 0.f);
  p.bias.assign(p.cpad, 0.f);
  for (std::int64_t co = 0; co < p.ctot; ++co) p.bias[co] = output_channel(a, co).bias;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (std::int64_t co = 0; co < p.ctot; ++co) {
    const OutputChannel oc = output_channel(a, co);
    const std::int64_t kb = co / VB, j = co % VB;
    double u[8][8];
    for (std::int64_t ci = 0; ci < C; ++ci) {
      transform_kernel(oc.w + ci * oc.k * oc.k, oc.k, u);
      for (int pos = 0; pos < 64; ++pos)
        p.u[((pos * nk + kb) * C + ci) * VB + j] = static_cast<float>(u[pos / 8][pos % 8]);
    }
  }
}

void winograd_run(const MsConvArgs& a, const WinogradPlan& p, int nt) {
  const std::int64_t N = a.n, C = a.c, H = a.h, W = a.w;
  const std::int64_t ctot = p.ctot, cpad = p.cpad, nk = cpad / VB;
  const std::int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, T = N * TH * TW;
  const std::int64_t Hp = TH * 4 + 4, Wp = TW * 4 + 4;

  static thread_local std::vector<float> tls_xp, tls_v, tls_m;  // reused: no page faults per call
  std::vector<float>& xp = tls_xp;
  std::vector<float>& vbuf = tls_v;
  std::vector<float>& mbuf = tls_m;
  pad_input_nhwc(a, Hp, Wp, xp, nt);

  // Tiles are processed in groups so V and M stay a few MB (cache-resident)
  // whatever the batch size.
  // The transformed weights are streamed once per group, though: when they are
  // large (L4/L5 at full width: 34 / 67 MB) groups of at least 64 tiles keep
  // that stream from dominating (batch 32, measured: L4 0.80x -> 0.92-0.98x eager,
  // L5 0.94x -> 1.10-1.13x), at the cost of V and M spilling from L2.
  std::int64_t TG = std::max<std::int64_t>(RB, std::min<std::int64_t>(T, (4 << 20) / (256 * (C + cpad))));
  if (64.0 * C * cpad * sizeof(float) > double(16 << 20)) TG = std::max<std::int64_t>(TG, std::min<std::int64_t>(T, 64));
  vbuf.resize(static_cast<size_t>(64 * TG * C));
  mbuf.resize(static_cast<size_t>(64 * TG * cpad));
  float* V = vbuf.data();
  float* M = mbuf.data();
  const float* X = xp.data();
  float* out = reinterpret_cast<float*>(a.out);
  const bool nhwc = a.layout == Layout::NHWC, relu = a.relu;
  const std::int64_t ncb = (C + VB - 1) / VB;

#pragma omp parallel num_threads(nt)
  for (std::int64_t t0 = 0; t0 < T; t0 += TG) {
    const std::int64_t tg = std::min(TG, T - t0);

    // 1. Input transform V[pos][tile][ci] = (B^T d B)[pos] for each 8x8 patch.
#pragma omp for schedule(static)
    for (std::int64_t it = 0; it < tg * ncb; ++it) {
      const std::int64_t tl = it / ncb, c0 = (it % ncb) * VB, cn = std::min<std::int64_t>(VB, C - c0);
      const std::int64_t t = t0 + tl, n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      // Rows of the 8x8 patch straight from the padded input when a whole
      // channel block is there, else through a zero-filled copy.
      const float* src = X + ((n * Hp + ty * 4) * Wp + tx * 4) * C + c0;
      std::int64_t sy = Wp * C, sx = C;
      float d[8][8][VB];
      if (cn < VB) {
        for (int y = 0; y < 8; ++y)
          for (int x = 0; x < 8; ++x)
            for (int j = 0; j < VB; ++j) d[y][x][j] = j < cn ? src[y * sy + x * sx + j] : 0.f;
        src = &d[0][0][0];
        sy = 8 * VB;
        sx = VB;
      }
      float bd[8][8][VB];  // bd[i][x] = (B^T d)[i][x]
      for (int x = 0; x < 8; ++x) input_transform_1d(src + x * sx, sy, &bd[0][x][0], 8 * VB);
      float v[8][VB];
      for (int i = 0; i < 8; ++i) {
        input_transform_1d(&bd[i][0][0], VB, &v[0][0], VB);  // v[jj] = (B^T d B)[i][jj]
        for (int jj = 0; jj < 8; ++jj) {
          float* dst = V + ((i * 8 + jj) * tg + tl) * C + c0;
          if (cn == VB)
            std::memcpy(dst, v[jj], sizeof(float) * VB);
          else
            for (int j = 0; j < cn; ++j) dst[j] = v[jj][j];
        }
      }
    }

    // 2. 64 GEMMs: M[pos][tile][co] = sum_ci V[pos][tile][ci] U[pos][ci][co].
#pragma omp for schedule(static)
    for (std::int64_t it = 0; it < 64 * nk; ++it) {
      const std::int64_t pos = it / nk, kb = it % nk;
      const float* Vp = V + pos * tg * C;
      const float* Uk = p.u.data() + (pos * nk + kb) * C * VB;
      float* Mp = M + pos * tg * cpad + kb * VB;
      for (std::int64_t r0 = 0; r0 < tg; r0 += RB)
        gemm_rows(static_cast<int>(std::min<std::int64_t>(RB, tg - r0)), Vp + r0 * C, C, Uk, Mp + r0 * cpad, cpad);
    }

    // 3. Output transform y = A^T M A (+ bias, ReLU) into the concatenated output.
#pragma omp for schedule(static)
    for (std::int64_t it = 0; it < tg * nk; ++it) {
      const std::int64_t tl = it / nk, kb = it % nk, co0 = kb * VB;
      const std::int64_t t = t0 + tl, n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
      float am[4][8][VB];  // am[r][jj] = (A^T M)[r][jj]
      const float* src = M + tl * cpad + co0;
      for (int jj = 0; jj < 8; ++jj) output_transform_1d(src + jj * tg * cpad, 8 * tg * cpad, &am[0][jj][0], 8 * VB);
      float yt[4][4][VB];
      for (int r = 0; r < 4; ++r) output_transform_1d(&am[r][0][0], VB, &yt[r][0][0], VB);
      const float* bk = p.bias.data() + co0;
      const std::int64_t cn = std::min<std::int64_t>(VB, ctot - co0);
      for (int r = 0; r < 4; ++r) {
        const std::int64_t oh = ty * 4 + r;
        if (oh >= H) break;
        for (int s_ = 0; s_ < 4; ++s_) {
          const std::int64_t ow = tx * 4 + s_;
          if (ow >= W) break;
          float y[VB];
#pragma omp simd
          for (int j = 0; j < VB; ++j) y[j] = yt[r][s_][j] + bk[j];
          if (relu)
            for (int j = 0; j < VB; ++j) y[j] = y[j] < 0.f ? 0.f : y[j];
          if (nhwc) {
            std::memcpy(out + ((n * H + oh) * W + ow) * ctot + co0, y, sizeof(float) * cn);
          } else {
            for (int j = 0; j < cn; ++j) out[((n * ctot + co0 + j) * H + oh) * W + ow] = y[j];
          }
        }
      }
    }
  }
}

}  // namespace fer_edge
