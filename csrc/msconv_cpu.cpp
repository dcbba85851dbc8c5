// CPU kernel of the fused multi-scale convolution (float32, NCHW or NHWC).
//
// Direct path: the input is read through one zero-padded NHWC copy and every
// output pixel gets all three branches from the same loads.  Output channels
// are processed in the concatenated order [c1 | c3 | c5], in chunks of CB; a
// chunk only visits the taps its channels need (the centre for 1x1, the inner
// 3x3, or the whole 5x5), which skips most of the zeros a padded-to-5x5 single
// convolution would multiply (only a chunk straddling two branches computes
// a few zero taps).  Results are written straight into the concatenated
// output with bias and ReLU applied, one contiguous vector per chunk in NHWC;
// nothing intermediate reaches memory.  The Winograd path is in
// msconv_cpu_winograd.cpp.
#include "msconv_cpu_internal.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef FER_EDGE_OPENMP
#include <omp.h>
#endif

namespace fer_edge {

int thread_count(int num_threads) {
#ifdef FER_EDGE_OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

void pad_input_nhwc(const MsConvArgs& a, std::int64_t Hp, std::int64_t Wp, std::vector<float>& xp, int nt) {
  const std::int64_t N = a.n, C = a.c, H = a.h, W = a.w;
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
}

namespace {

constexpr int CB = 16;  // output channels per chunk: two 8-wide vectors
constexpr int PB = 4;   // output pixels per register block (weights reused PB times)
constexpr int PBF = 8;  // the same for small maps, pixels taken across rows

struct Plan {
  std::int64_t ctot = 0, nchunks = 0;
  std::vector<int> radius;           // per chunk: the largest radius of its channels
  std::vector<std::int64_t> offset;  // per chunk: start in `weights`
  std::vector<float> weights;        // per chunk: [tap][ci][CB]
  std::vector<float> bias;           // [nchunks * CB], zeros past ctot
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
    // Which 5x5 taps the chunk needs (2 = whole 5x5, 1 = inner 3x3, 0 = centre).
    // The radius grows with the channel index: the chunk's last channel has the largest.
    p.radius[k] = output_channel(a, std::min(k * CB + CB, p.ctot) - 1).k / 2;
    const std::int64_t side = 2 * p.radius[k] + 1;
    p.offset[k + 1] = p.offset[k] + side * side * a.c * CB;
  }
  p.weights.resize(p.offset[p.nchunks]);
  p.bias.assign(p.nchunks * CB, 0.f);
  for (std::int64_t co = 0; co < p.ctot; ++co) p.bias[co] = output_channel(a, co).bias;
  // Scatter each branch's OIHW weights into the chunk that owns the channel,
  // writing every slot (zeros for taps outside a branch's kernel and for the
  // padding channels) so the buffer needs no clearing.  Loop order (chunk, ci,
  // channel, tap): for one ci a chunk's destination is only taps x CB floats,
  // so the strided writes and the contiguous reads both stay in L1.
  const std::int64_t C = a.c;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (std::int64_t k = 0; k < p.nchunks; ++k) {  // one chunk per thread: no false sharing
    const int r = p.radius[k], side = 2 * r + 1;
    float* dst = p.weights.data() + p.offset[k];
    const float* src[CB];
    int ks[CB];  // kernel size of each channel's branch (0: padding channel)
    for (int j = 0; j < CB; ++j) {
      const std::int64_t co = k * CB + j;
      if (co < p.ctot) {
        const OutputChannel oc = output_channel(a, co);
        src[j] = oc.w;
        ks[j] = oc.k;
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

// Writes one pixel's CB output channels (starting at channel co0) into the
// concatenated output, with ReLU.
inline void store_pixel(const float* acc, std::int64_t co0, bool relu, bool nhwc, float* out, std::int64_t n,
                        std::int64_t oh, std::int64_t ow, std::int64_t H, std::int64_t W, std::int64_t ctot) {
  const std::int64_t cn = std::min<std::int64_t>(CB, ctot - co0);
  float v[CB];
#pragma omp simd
  for (int j = 0; j < CB; ++j) v[j] = relu && acc[j] < 0.f ? 0.f : acc[j];
  if (nhwc) {
    std::memcpy(out + ((n * H + oh) * W + ow) * ctot + co0, v, sizeof(float) * cn);
  } else {
    for (int j = 0; j < cn; ++j) out[((n * ctot + co0 + j) * H + oh) * W + ow] = v[j];
  }
}

// The same for a register block of PB pixels of one row.
inline void store_block(const float (&acc)[PB][CB], std::int64_t co0, bool relu, bool nhwc, float* out,
                        std::int64_t n, std::int64_t oh, std::int64_t ow0, std::int64_t H, std::int64_t W,
                        std::int64_t ctot) {
  for (int q = 0; q < PB && ow0 + q < W; ++q) store_pixel(acc[q], co0, relu, nhwc, out, n, oh, ow0 + q, H, W, ctot);
}

// acc[q] = bias + the chunk's taps (radius r) x input channels for P pixels
// whose 5x5 windows start at xq[q] in the padded NHWC input (row stride Wp
// pixels).  The weights of one (tap, input channel) are loaded once and
// reused for all P pixels.
template <int P>
inline void accumulate_chunk(float (&acc)[P][CB], const float* const (&xq)[P], int r, std::int64_t Wp,
                             std::int64_t C, const float* wk, const float* bk) {
  for (int q = 0; q < P; ++q)
    for (int j = 0; j < CB; ++j) acc[q][j] = bk[j];
  std::int64_t t = 0;
  for (int ky = 2 - r; ky <= 2 + r; ++ky)
    for (int kx = 2 - r; kx <= 2 + r; ++kx, ++t) {
      const std::int64_t off = (ky * Wp + kx) * C;
      const float* wt = wk + t * C * CB;
      for (std::int64_t ci = 0; ci < C; ++ci) {
        const float* wv = wt + ci * CB;
        for (int q = 0; q < P; ++q) {
          const float xv = xq[q][off + ci];
#pragma omp simd
          for (int j = 0; j < CB; ++j) acc[q][j] += xv * wv[j];
        }
      }
    }
}

// One output row of one chunk for a single input channel (the grayscale
// stem, L1).  The generic loop spends most of its time on per-tap loop
// overhead when the channel loop has one iteration; here the chunk's
// (2R+1)^2 weight vectors are loaded once per row and the taps are unrolled.
template <int R>
void row_single_channel(const float* xrow, std::int64_t Wp, const float* wk, const float* bk,
                        std::int64_t co0, bool relu, bool nhwc, float* out, std::int64_t n,
                        std::int64_t oh, std::int64_t H, std::int64_t W, std::int64_t ctot) {
  constexpr int S = 2 * R + 1;
  float wr[S * S][CB];
  for (int t = 0; t < S * S; ++t)
    for (int j = 0; j < CB; ++j) wr[t][j] = wk[t * CB + j];
  for (std::int64_t ow0 = 0; ow0 < W; ow0 += PB) {
    float acc[PB][CB];
    for (int q = 0; q < PB; ++q)
      for (int j = 0; j < CB; ++j) acc[q][j] = bk[j];
#pragma GCC unroll 5
    for (int ty = 0; ty < S; ++ty) {
      const float* xs = xrow + (2 - R + ty) * Wp + ow0 + 2 - R;
#pragma GCC unroll 5
      for (int tx = 0; tx < S; ++tx)
#pragma GCC unroll 4
        for (int q = 0; q < PB; ++q) {
          const float xv = xs[q + tx];
#pragma omp simd
          for (int j = 0; j < CB; ++j) acc[q][j] += xv * wr[ty * S + tx][j];
        }
    }
    store_block(acc, co0, relu, nhwc, out, n, oh, ow0, H, W, ctot);
  }
}

// The convolution proper, with weights already packed into `p`.
void run_plan(const MsConvArgs& a, const Plan& p, int nt) {
  const std::int64_t N = a.n, C = a.c, H = a.h, W = a.w;
  // Per-calling-thread scratch, named through a plain reference: OpenMP
  // worker threads must see the caller's buffer, not their own thread_local copy.
  static thread_local std::vector<float> tls_xp;
  std::vector<float>& xp = tls_xp;

  // Width rounded up to PB so register blocks never need a bounds check.
  const std::int64_t Hp = H + 4, Wp = round_up(W, PB) + 4;
  pad_input_nhwc(a, Hp, Wp, xp, nt);

  float* out = reinterpret_cast<float*>(a.out);
  const std::int64_t ctot = p.ctot, nchunks = p.nchunks;
  const bool nhwc = a.layout == Layout::NHWC, relu = a.relu;

  if (C == 1) {
    // Equal-cost halves of the rows for each thread: dynamic scheduling
    // costs more than these sub-microsecond items.
#pragma omp parallel for collapse(3) schedule(static) num_threads(nt)
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t oh = 0; oh < H; ++oh)
        for (std::int64_t k = 0; k < nchunks; ++k) {
          const float* xrow = xp.data() + (n * Hp + oh) * Wp;
          const float* wk = p.weights.data() + p.offset[k];
          const float* bk = p.bias.data() + k * CB;
          const std::int64_t co0 = k * CB;
          switch (p.radius[k]) {
            case 2: row_single_channel<2>(xrow, Wp, wk, bk, co0, relu, nhwc, out, n, oh, H, W, ctot); break;
            case 1: row_single_channel<1>(xrow, Wp, wk, bk, co0, relu, nhwc, out, n, oh, H, W, ctot); break;
            default: row_single_channel<0>(xrow, Wp, wk, bk, co0, relu, nhwc, out, n, oh, H, W, ctot); break;
          }
        }
    return;
  }

  if (W < 2 * PB) {
    // Small maps (MACNN's 6x6 and 3x3 stages): rows are shorter than two
    // register blocks, and with one row per work item every chunk's weights
    // (up to 400 KB at 256 input channels) were streamed once per row.  Here
    // a work item is one chunk of one image, its pixels taken PBF at a time
    // across rows, so the chunk's weights stay in L2 while they serve every
    // pixel.  Chunks are dealt round-robin: their tap counts (1, 9, 25)
    // differ, and contiguous halves would load one thread with the 5x5s.
    const std::int64_t HW = H * W;
#pragma omp parallel for collapse(2) schedule(static, 1) num_threads(nt)
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t k = 0; k < nchunks; ++k) {
        const int r = p.radius[k];
        const float* wk = p.weights.data() + p.offset[k];
        const float* bk = p.bias.data() + k * CB;
        const std::int64_t co0 = k * CB;
        for (std::int64_t p0 = 0; p0 < HW; p0 += PBF) {
          const float* xq[PBF];  // each pixel's 5x5 window, top-left corner
          for (int q = 0; q < PBF; ++q) {
            const std::int64_t pix = std::min(p0 + q, HW - 1);  // past the end: recompute the last pixel, unstored
            xq[q] = xp.data() + ((n * Hp + pix / W) * Wp + pix % W) * C;
          }
          float acc[PBF][CB];
          accumulate_chunk(acc, xq, r, Wp, C, wk, bk);
          for (int q = 0; q < PBF && p0 + q < HW; ++q)
            store_pixel(acc[q], co0, relu, nhwc, out, n, (p0 + q) / W, (p0 + q) % W, H, W, ctot);
        }
      }
    return;
  }

#pragma omp parallel for collapse(3) schedule(dynamic, 1) num_threads(nt)
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t oh = 0; oh < H; ++oh)
      for (std::int64_t k = 0; k < nchunks; ++k) {
        const int r = p.radius[k];
        const float* wk = p.weights.data() + p.offset[k];
        const float* bk = p.bias.data() + k * CB;
        const std::int64_t co0 = k * CB;
        for (std::int64_t ow0 = 0; ow0 < W; ow0 += PB) {
          const float* xq[PB];
          for (int q = 0; q < PB; ++q) xq[q] = xp.data() + ((n * Hp + oh) * Wp + ow0 + q) * C;
          float acc[PB][CB];
          accumulate_chunk(acc, xq, r, Wp, C, wk, bk);
          store_block(acc, co0, relu, nhwc, out, n, oh, ow0, H, W, ctot);
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
  Plan plan;  // direct; empty when algo is Winograd
  // Winograd weights are 64 / (c1 + 9 c3 + 25 c5) * (c1 + c3 + c5) times the
  // direct ones (5x for MACNN's split): in Auto mode they are made on the
  // first call that wants them, from this copy of the weights, so a layer
  // that never runs Winograd (3x3 inputs at batch 1) never pays the memory.
  mutable WinogradPlan winograd;
  mutable std::once_flag winograd_once;
  std::vector<float> w1, b1, w3, b3, w5, b5;  // Auto mode only

  MsConvArgs weight_args(std::int64_t c, std::int64_t c1, std::int64_t c3, std::int64_t c5) const {
    MsConvArgs a;
    a.w1 = reinterpret_cast<std::uintptr_t>(w1.data());
    a.b1 = reinterpret_cast<std::uintptr_t>(b1.data());
    a.w3 = reinterpret_cast<std::uintptr_t>(w3.data());
    a.b3 = reinterpret_cast<std::uintptr_t>(b3.data());
    a.w5 = reinterpret_cast<std::uintptr_t>(w5.data());
    a.b5 = reinterpret_cast<std::uintptr_t>(b5.data());
    a.c = c; a.c1 = c1; a.c3 = c3; a.c5 = c5;
    return a;
  }
};

namespace {

// Winograd's fixed costs (transforms, a 16-wide channel padding) only pay
// with enough input channels to share them.
constexpr std::int64_t kWinogradMinChannels = 16;

// Winograd when it needs clearly fewer multiply-adds than the direct path:
// its count is weighted 1.5x for the transforms and its less regular memory
// traffic (measured: 1.2-1.4x on L2-L4 of benchmarks/bench_msconv.py), and
// when its transformed weights (5x the direct ones) are reused by enough
// tiles: each is read once per call and used once per tile, so a call must
// have a tile per 2 MB of them.  At batch 1 that keeps L4 (6x6, 4 tiles,
// 34 MB) and L5 (3x3, 1 tile, 67 MB) direct: Winograd measured 1-2x and 3x
// slower there.
bool winograd_pays(std::int64_t c, std::int64_t c1, std::int64_t c3, std::int64_t c5, std::int64_t n,
                   std::int64_t h, std::int64_t w) {
  const std::int64_t tiles = n * ((h + 3) / 4) * ((w + 3) / 4), cpad = round_up(c1 + c3 + c5, 16);
  if (c < kWinogradMinChannels) return false;
  const double weight_bytes = 64.0 * c * cpad * sizeof(float);
  if (weight_bytes > double(tiles) * (2 << 20)) return false;
  const double direct = double(n * h * w) * c * (c1 + 9 * c3 + 25 * c5);
  const double wino = 1.5 * double(tiles) * 64 * c * cpad;
  return wino < direct;
}

std::vector<float> copy_floats(std::uintptr_t p, std::int64_t count) {
  const float* f = reinterpret_cast<const float*>(p);
  return std::vector<float>(f, f + count);
}

}  // namespace

CpuPackedWeights::CpuPackedWeights(const MsConvArgs& w, int num_threads, CpuAlgo algo)
    : impl_(new Impl), c_(w.c), c1_(w.c1), c3_(w.c3), c5_(w.c5), algo_(algo) {
  if (!w.w1 || !w.b1 || !w.w3 || !w.b3 || !w.w5 || !w.b5)
    throw std::invalid_argument("fused_ms_conv: null weight pointer");
  if (w.c < 1 || w.c1 < 1 || w.c3 < 1 || w.c5 < 1)
    throw std::invalid_argument("fused_ms_conv: channel counts must be >= 1");
  if (algo != CpuAlgo::Auto && algo != CpuAlgo::Direct && algo != CpuAlgo::Winograd)
    throw std::invalid_argument("fused_ms_conv: unknown CPU algorithm");
  const int nt = thread_count(num_threads);
  if (algo != CpuAlgo::Winograd) make_plan(w, nt, impl_->plan);
  if (algo == CpuAlgo::Winograd) {
    winograd_pack(w, nt, impl_->winograd);
  } else if (algo == CpuAlgo::Auto && w.c >= kWinogradMinChannels) {
    impl_->w1 = copy_floats(w.w1, w.c1 * w.c);
    impl_->b1 = copy_floats(w.b1, w.c1);
    impl_->w3 = copy_floats(w.w3, w.c3 * w.c * 9);
    impl_->b3 = copy_floats(w.b3, w.c3);
    impl_->w5 = copy_floats(w.w5, w.c5 * w.c * 25);
    impl_->b5 = copy_floats(w.b5, w.c5);
  }
}

CpuPackedWeights::~CpuPackedWeights() = default;

CpuAlgo CpuPackedWeights::algorithm_for(std::int64_t n, std::int64_t h, std::int64_t w) const {
  if (algo_ != CpuAlgo::Auto) return algo_;
  return winograd_pays(c_, c1_, c3_, c5_, n, h, w) ? CpuAlgo::Winograd : CpuAlgo::Direct;
}

void CpuPackedWeights::run(const MsConvArgs& a, int num_threads) const {
  if (a.c != c_ || a.c1 != c1_ || a.c3 != c3_ || a.c5 != c5_)
    throw std::invalid_argument("fused_ms_conv: input does not match the packed weights' channels");
  MsConvArgs checked = a;
  // validate() wants weight pointers; the packed copy stands in for them.
  checked.w1 = checked.b1 = checked.w3 = checked.b3 = checked.w5 = checked.b5 = 1;
  validate(checked);
  const int nt = thread_count(num_threads);
  if (algorithm_for(a.n, a.h, a.w) == CpuAlgo::Winograd) {
    if (algo_ == CpuAlgo::Auto)
      std::call_once(impl_->winograd_once,
                     [&] { winograd_pack(impl_->weight_args(c_, c1_, c3_, c5_), nt, impl_->winograd); });
    winograd_run(a, impl_->winograd, nt);
    return;
  }
  run_plan(a, impl_->plan, nt);
}

}  // namespace fer_edge
