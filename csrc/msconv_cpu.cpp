// CPU kernel of the fused multi-scale convolution (float32, NCHW or NHWC).
//
// One pass: the input is read through one zero-padded NHWC copy and every
// output pixel gets all three branches from the same loads.  The combined
// output channels are ordered [c5 | c3 | c1] so that the set of taps a channel
// needs shrinks from the outside in: ring 2 of the 5x5 window feeds only the
// 5x5 branch, ring 1 feeds 5x5 and 3x3, the centre feeds all three.  Channels
// are processed in chunks of CB; a chunk only visits the rings its channels
// need, which skips the zeros a padded-to-5x5 single convolution would
// multiply.  Results are written straight into their slice of the concatenated
// output with bias and ReLU applied; nothing intermediate reaches memory.
#include "msconv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef FER_EDGE_OPENMP
#include <omp.h>
#endif

namespace fer_edge {
namespace {

constexpr int CB = 16;  // output channels per chunk: two 8-wide vectors
constexpr int PB = 4;   // output pixels per register block (weights reused PB times)

inline std::int64_t round_up(std::int64_t v, std::int64_t m) { return (v + m - 1) / m * m; }

// Which 5x5 taps a combined channel uses: 2 = whole 5x5, 1 = inner 3x3, 0 = centre.
inline int channel_radius(std::int64_t co, std::int64_t c5, std::int64_t c3) {
  return co < c5 ? 2 : (co < c5 + c3 ? 1 : 0);
}

struct Plan {
  std::int64_t ctot = 0, nchunks = 0;
  std::vector<int> radius;           // per chunk: the largest radius of its channels
  std::vector<std::int64_t> offset;  // per chunk: start in `weights`
  std::vector<float> weights;        // per chunk: [tap][ci][CB]
  std::vector<float> bias;           // [nchunks * CB], combined order
  std::vector<std::int64_t> out_channel;  // combined -> concatenated channel, -1 = padding
};

// Fill `p` for these weights.  `p` is a per-thread scratch object reused
// across calls: first-touch page faults on fresh multi-megabyte buffers cost
// more than the convolution itself at batch 1.
void make_plan(const MsConvArgs& a, int nt, Plan& p) {
  p.ctot = a.c1 + a.c3 + a.c5;
  p.nchunks = (p.ctot + CB - 1) / CB;
  p.radius.resize(p.nchunks);
  p.offset.resize(p.nchunks + 1);
  p.offset[0] = 0;
  for (std::int64_t k = 0; k < p.nchunks; ++k) {
    p.radius[k] = channel_radius(k * CB, a.c5, a.c3);  // first channel has the largest radius
    const std::int64_t side = 2 * p.radius[k] + 1;
    p.offset[k + 1] = p.offset[k] + side * side * a.c * CB;
  }
  p.weights.resize(p.offset[p.nchunks]);
  p.bias.assign(p.nchunks * CB, 0.f);
  p.out_channel.assign(p.nchunks * CB, -1);
  const float* b1 = reinterpret_cast<const float*>(a.b1);
  const float* b3 = reinterpret_cast<const float*>(a.b3);
  const float* b5 = reinterpret_cast<const float*>(a.b5);
  for (std::int64_t co = 0; co < p.ctot; ++co) {
    if (co < a.c5) {
      p.bias[co] = b5[co];
      p.out_channel[co] = a.c1 + a.c3 + co;
    } else if (co < a.c5 + a.c3) {
      p.bias[co] = b3[co - a.c5];
      p.out_channel[co] = a.c1 + (co - a.c5);
    } else {
      p.bias[co] = b1[co - a.c5 - a.c3];
      p.out_channel[co] = co - a.c5 - a.c3;
    }
  }
  // Scatter each branch's OIHW weights into the chunk that owns the channel,
  // writing every slot (zeros for taps outside a branch's kernel and for the
  // padding channels) so the buffer needs no clearing.  Loop order (chunk, ci,
  // channel, tap): for one ci a chunk's destination is only taps x CB floats,
  // so the strided writes and the contiguous reads both stay in L1.
  const std::int64_t C = a.c;
  const float* w1 = reinterpret_cast<const float*>(a.w1);
  const float* w3 = reinterpret_cast<const float*>(a.w3);
  const float* w5 = reinterpret_cast<const float*>(a.w5);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (std::int64_t k = 0; k < p.nchunks; ++k) {  // one chunk per thread: no false sharing
    const int r = p.radius[k], side = 2 * r + 1;
    float* dst = p.weights.data() + p.offset[k];
    const float* src[CB];
    int ks[CB];  // kernel size of each channel's branch (0: padding channel)
    for (int j = 0; j < CB; ++j) {
      const std::int64_t co = k * CB + j;
      if (co < a.c5) {
        src[j] = w5 + co * C * 25;
        ks[j] = 5;
      } else if (co < a.c5 + a.c3) {
        src[j] = w3 + (co - a.c5) * C * 9;
        ks[j] = 3;
      } else if (co < p.ctot) {
        src[j] = w1 + (co - a.c5 - a.c3) * C;
        ks[j] = 1;
      } else {
        src[j] = nullptr;
        ks[j] = 0;
      }
    }
    // Destination order (tap, ci, j): written sequentially, one cache line per (tap, ci).
    for (int ty = 0; ty < side; ++ty)
      for (int tx = 0; tx < side; ++tx)
        for (std::int64_t ci = 0; ci < C; ++ci) {
          float* d = dst + ((ty * side + tx) * C + ci) * CB;
          for (int j = 0; j < CB; ++j) {
            const int sh = r - ks[j] / 2, ky = ty - sh, kx = tx - sh;
            d[j] = (ks[j] > 0 && ky >= 0 && ky < ks[j] && kx >= 0 && kx < ks[j])
                       ? src[j][(ci * ks[j] + ky) * ks[j] + kx]
                       : 0.f;
          }
        }
  }
}

int thread_count(int num_threads) {
#ifdef FER_EDGE_OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// The convolution proper, with weights already packed into `p`.
void run_plan(const MsConvArgs& a, const Plan& p, int nt) {
  const std::int64_t N = a.n, C = a.c, H = a.h, W = a.w;
  // Per-calling-thread scratch, named through a plain reference: OpenMP
  // worker threads must see the caller's buffer, not their own thread_local copy.
  static thread_local std::vector<float> tls_xp;
  std::vector<float>& xp = tls_xp;

  // Zero-padded NHWC copy: 2 pixels of halo on every side, and the width
  // rounded up to PB so register blocks never need a bounds check.
  const std::int64_t Hp = H + 4, Wp = round_up(W, PB) + 4;
  xp.resize(static_cast<size_t>(N * Hp * Wp * C));
  std::fill(xp.begin(), xp.end(), 0.f);
  const float* x = reinterpret_cast<const float*>(a.x);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t ih = 0; ih < H; ++ih) {
      float* dst = xp.data() + ((n * Hp + ih + 2) * Wp + 2) * C;
      if (a.layout == Layout::NHWC) {
        std::memcpy(dst, x + (n * H + ih) * W * C, sizeof(float) * W * C);
      } else {
        for (std::int64_t c = 0; c < C; ++c) {
          const float* src = x + ((n * C + c) * H + ih) * W;
          for (std::int64_t iw = 0; iw < W; ++iw) dst[iw * C + c] = src[iw];
        }
      }
    }

  float* out = reinterpret_cast<float*>(a.out);
  const std::int64_t ctot = p.ctot, nchunks = p.nchunks;
  const bool nhwc = a.layout == Layout::NHWC, relu = a.relu;

#pragma omp parallel for collapse(3) schedule(dynamic, 1) num_threads(nt)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t oh = 0; oh < H; ++oh)
      for (std::int64_t k = 0; k < nchunks; ++k) {
        const int r = p.radius[k];
        const float* wk = p.weights.data() + p.offset[k];
        const float* bk = p.bias.data() + k * CB;
        const std::int64_t* ok = p.out_channel.data() + k * CB;
        for (std::int64_t ow0 = 0; ow0 < W; ow0 += PB) {
          float acc[PB][CB];
          for (int q = 0; q < PB; ++q)
            for (int j = 0; j < CB; ++j) acc[q][j] = bk[j];
          std::int64_t t = 0;
          for (int ky = 2 - r; ky <= 2 + r; ++ky)
            for (int kx = 2 - r; kx <= 2 + r; ++kx, ++t) {
              const float* xs = xp.data() + ((n * Hp + oh + ky) * Wp + ow0 + kx) * C;
              const float* wt = wk + t * C * CB;
              for (std::int64_t ci = 0; ci < C; ++ci) {
                const float* wv = wt + ci * CB;
                for (int q = 0; q < PB; ++q) {
                  const float xv = xs[q * C + ci];
#pragma omp simd
                  for (int j = 0; j < CB; ++j) acc[q][j] += xv * wv[j];
                }
              }
            }
          for (int q = 0; q < PB; ++q) {
            const std::int64_t ow = ow0 + q;
            if (ow >= W) break;
            for (int j = 0; j < CB; ++j) {
              const std::int64_t oc = ok[j];
              if (oc < 0) continue;
              float v = acc[q][j];
              if (relu && v < 0.f) v = 0.f;
              if (nhwc)
                out[((n * H + oh) * W + ow) * ctot + oc] = v;
              else
                out[((n * ctot + oc) * H + oh) * W + ow] = v;
            }
          }
        }
      }
}

}  // namespace

void msconv_cpu_f32(const MsConvArgs& a, int num_threads) {
  validate(a);
  const int nt = thread_count(num_threads);
  static thread_local Plan tls_plan;  // reused: no page faults on fresh buffers
  make_plan(a, nt, tls_plan);
  run_plan(a, tls_plan, nt);
}

struct CpuPackedWeights::Impl {
  Plan plan;
};

CpuPackedWeights::CpuPackedWeights(const MsConvArgs& w, int num_threads)
    : impl_(new Impl), c_(w.c), c1_(w.c1), c3_(w.c3), c5_(w.c5) {
  if (!w.w1 || !w.b1 || !w.w3 || !w.b3 || !w.w5 || !w.b5)
    throw std::invalid_argument("fused_ms_conv: null weight pointer");
  if (w.c < 1 || w.c1 < 1 || w.c3 < 1 || w.c5 < 1)
    throw std::invalid_argument("fused_ms_conv: channel counts must be >= 1");
  make_plan(w, thread_count(num_threads), impl_->plan);
}

CpuPackedWeights::~CpuPackedWeights() = default;

void CpuPackedWeights::run(const MsConvArgs& a, int num_threads) const {
  if (a.c != c_ || a.c1 != c1_ || a.c3 != c3_ || a.c5 != c5_)
    throw std::invalid_argument("fused_ms_conv: input does not match the packed weights' channels");
  MsConvArgs checked = a;
  // validate() wants weight pointers; the packed copy stands in for them.
  checked.w1 = checked.b1 = checked.w3 = checked.b3 = checked.w5 = checked.b5 = 1;
  validate(checked);
  run_plan(a, impl_->plan, thread_count(num_threads));
}

}  // namespace fer_edge
