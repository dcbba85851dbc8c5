// pybind11 module fer_edge._C.  It deliberately does not link PyTorch: the
// Python wrapper (fer_edge/kernels.py) validates tensors and passes raw
// pointers, shapes and (for CUDA) the stream handle, so one build works with
// any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "msconv.h"
#include "msconv_cuda_igemm.h"
#include "msconv_cuda_mma.h"
#include "msconv_cuda_splitk.h"

namespace py = pybind11;
using fer_edge::Layout;
using fer_edge::MsConvArgs;

namespace {

MsConvArgs make_args(std::uintptr_t x, std::uintptr_t out, std::uintptr_t w1, std::uintptr_t b1,
                     std::uintptr_t w3, std::uintptr_t b3, std::uintptr_t w5, std::uintptr_t b5,
                     std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1,
                     std::int64_t c3, std::int64_t c5, int layout, bool relu, bool empty_branches = false) {
  if (layout != 0 && layout != 1) throw std::invalid_argument("fused_ms_conv: layout must be 0 (NCHW) or 1 (NHWC)");
  MsConvArgs a;
  a.x = x; a.out = out; a.w1 = w1; a.b1 = b1; a.w3 = w3; a.b3 = b3; a.w5 = w5; a.b5 = b5;
  a.n = n; a.c = c; a.h = h; a.w = w; a.c1 = c1; a.c3 = c3; a.c5 = c5;
  a.layout = static_cast<Layout>(layout);
  a.relu = relu;
  fer_edge::validate(a, empty_branches);  // the CUDA kernels take an empty 1x1 or 5x5 branch (null pointers)
  return a;
}

fer_edge::igemm::Form form_of(bool window) {
  return window ? fer_edge::igemm::Form::Window : fer_edge::igemm::Form::PerBranch;
}

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fer-edge compiled kernels (fused multi-scale convolution), CPU and CUDA";

  m.def(
      "msconv_cpu",
      [](std::uintptr_t x, std::uintptr_t out, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w3,
         std::uintptr_t b3, std::uintptr_t w5, std::uintptr_t b5, std::int64_t n, std::int64_t c,
         std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3, std::int64_t c5, int layout,
         bool relu, int num_threads) {
        MsConvArgs a = make_args(x, out, w1, b1, w3, b3, w5, b5, n, c, h, w, c1, c3, c5, layout, relu);
        py::gil_scoped_release nogil;
        fer_edge::msconv_cpu_f32(a, num_threads);
      },
      py::arg("x"), py::arg("out"), py::arg("w1"), py::arg("b1"), py::arg("w3"), py::arg("b3"),
      py::arg("w5"), py::arg("b5"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"),
      py::arg("c1"), py::arg("c3"), py::arg("c5"), py::arg("layout"), py::arg("relu"),
      py::arg("num_threads") = 0,
      "float32 fused multi-scale conv on host pointers (layout 0 = NCHW, 1 = NHWC).");

  py::class_<fer_edge::CpuPackedWeights>(m, "CpuPackedWeights",
                                         "float32 weights of one fused layer, packed once for the CPU kernel")
      .def(py::init([](std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w3, std::uintptr_t b3, std::uintptr_t w5,
                       std::uintptr_t b5, std::int64_t c, std::int64_t c1, std::int64_t c3, std::int64_t c5,
                       int num_threads, int algo) {
             if (algo < 0 || algo > 2)
               throw std::invalid_argument("fused_ms_conv: algo must be 0 (auto), 1 (direct) or 2 (winograd)");
             MsConvArgs a;
             a.w1 = w1; a.b1 = b1; a.w3 = w3; a.b3 = b3; a.w5 = w5; a.b5 = b5;
             a.c = c; a.c1 = c1; a.c3 = c3; a.c5 = c5;
             py::gil_scoped_release nogil;
             return new fer_edge::CpuPackedWeights(a, num_threads, static_cast<fer_edge::CpuAlgo>(algo));
           }),
           py::arg("w1"), py::arg("b1"), py::arg("w3"), py::arg("b3"), py::arg("w5"), py::arg("b5"), py::arg("c"),
           py::arg("c1"), py::arg("c3"), py::arg("c5"), py::arg("num_threads") = 0, py::arg("algo") = 0)
      .def(
          "algorithm_for",
          [](const fer_edge::CpuPackedWeights& self, std::int64_t n, std::int64_t h, std::int64_t w) {
            return self.algorithm_for(n, h, w) == fer_edge::CpuAlgo::Winograd ? "winograd" : "direct";
          },
          py::arg("n"), py::arg("h"), py::arg("w"),
          "the algorithm run() uses for an n x c x h x w input: 'direct' or 'winograd'")
      .def(
          "run",
          [](const fer_edge::CpuPackedWeights& self, std::uintptr_t x, std::uintptr_t out, std::int64_t n,
             std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3, std::int64_t c5,
             int layout, bool relu, int num_threads) {
            if (layout != 0 && layout != 1)
              throw std::invalid_argument("fused_ms_conv: layout must be 0 (NCHW) or 1 (NHWC)");
            MsConvArgs a;
            a.x = x; a.out = out; a.n = n; a.c = c; a.h = h; a.w = w; a.c1 = c1; a.c3 = c3; a.c5 = c5;
            a.layout = static_cast<Layout>(layout);
            a.relu = relu;
            py::gil_scoped_release nogil;
            self.run(a, num_threads);
          },
          py::arg("x"), py::arg("out"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("c1"),
          py::arg("c3"), py::arg("c5"), py::arg("layout"), py::arg("relu"), py::arg("num_threads") = 0);

  // The small-batch kernel's launch plan (host arithmetic, in every build: the CPU tests check it).
  m.def(
      "splitk_plan",
      [](std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t ctot, int sm_count) {
        if (n < 1 || c < 1 || h < 1 || w < 1 || ctot < 1 || sm_count < 1)
          throw std::invalid_argument("splitk_plan: every size must be >= 1");
        const auto p = fer_edge::splitk::plan(n, c, h, w, ctot, sm_count);
        py::dict d;
        d["m_tiles"] = p.m_tiles; d["n_tiles"] = p.n_tiles; d["splits"] = p.splits; d["kslice"] = p.kslice;
        d["workspace_floats"] = p.workspace_floats; d["counters"] = p.counters;
        d["tile_m"] = fer_edge::splitk::TM; d["tile_n"] = fer_edge::splitk::TN; d["kc"] = fer_edge::splitk::KC;
        return d;
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("ctot"), py::arg("sm_count"));

  // The small-batch tensor-core kernel's plan (host arithmetic, in every build).
  m.def(
      "mma_plan",
      [](std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3,
         std::int64_t c5, int sm_count, int bm, std::int64_t kchunk) {
        if (n < 1 || c < 1 || h < 1 || w < 1 || c1 < 0 || c3 < 0 || c5 < 0 || c1 + c3 + c5 < 1 || sm_count < 1)
          throw std::invalid_argument("mma_plan: sizes must be >= 1 (each branch's channels >= 0)");
        if (!fer_edge::mma::valid_override(bm, kchunk))
          throw std::invalid_argument("mma_plan: bm must be 16, 32, 48 or 64 and kchunk a multiple of 32 (0: chosen)");
        const auto p = fer_edge::mma::plan(n, c, h, w, c1, c3, c5, sm_count, bm, kchunk);
        py::list branches;
        for (int i = 0; i < p.branches; ++i) {
          const auto& b = p.b[i];
          py::dict e;
          e["k"] = b.k; e["cout"] = b.cout; e["offset"] = b.offset; e["weights"] = b.weights; e["kdim"] = b.kdim;
          e["m_tiles"] = b.m_tiles; e["n_tiles"] = b.n_tiles; e["chunks"] = b.chunks;
          e["first_unit"] = b.first_unit; e["first_counter"] = b.first_counter;
          branches.append(e);
        }
        py::dict d;
        d["tile_m"] = p.bm; d["tile_n"] = fer_edge::mma::BN; d["tile_k"] = fer_edge::mma::BK;
        d["kchunk"] = p.kchunk; d["units"] = p.units; d["branches"] = branches;
        d["workspace_floats"] = p.workspace_floats; d["counters"] = p.counters;
        d["smem_bytes"] = fer_edge::mma::smem_bytes(p.bm); d["resident_blocks"] = fer_edge::mma::resident_blocks(p.bm);
        return d;
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("c1"), py::arg("c3"), py::arg("c5"),
      py::arg("sm_count"), py::arg("bm") = 0, py::arg("kchunk") = 0,
      "the mma kernel's blocks (bm / kchunk: its pixel tile and K chunk instead of the chosen ones; tile_k: "
      "k per pipeline step in float16, 16 in float32): its pixel tile, K chunk, each non-empty branch's tiles and chunks (5x5, 3x3, "
      "1x1 order), the float32 workspace / int32 counters it needs (0: none), a block's shared memory and "
      "the blocks per SM the plan counts as resident at once");

  // The Hopper CUTLASS kernels' channel tile for a launch of `cout` channels (host code, in every build).
  m.def(
      "igemm90_tile",
      [](std::int64_t m, std::int64_t cout, int sm_count, int tile_n) {
        if (m < 1 || cout < 1 || sm_count < 1) throw std::invalid_argument("igemm90_tile: every size must be >= 1");
        if (!fer_edge::igemm90::valid_tile_n(tile_n)) throw std::invalid_argument("igemm90_tile: tile_n must be 0, 64 or 128");
        py::dict d;
        d["m"] = fer_edge::igemm90::TILE_M; d["n"] = fer_edge::igemm90::tile_n(m, cout, sm_count, tile_n);
        d["k"] = fer_edge::igemm90::TILE_K;
        return d;
      },
      py::arg("m"), py::arg("cout"), py::arg("sm_count"), py::arg("tile_n") = 0,
      "the cutlass90 kernels' tile (pixels m, channels n, k per step) for a launch of m = n*h*w pixels and "
      "`cout` channels on sm_count SMs (tile_n: 64 or 128 instead of the choice)");

  // The large-batch path's tile per branch and its input rules (host code, in every build).
  m.def(
      "igemm_tile",
      [](std::int64_t m, std::int64_t cout, int sm_count) {
        if (m < 1 || cout < 1 || sm_count < 1) throw std::invalid_argument("igemm_tile: every size must be >= 1");
        const auto& t = fer_edge::igemm::TILES[fer_edge::igemm::pick_tile(m, cout, sm_count)];
        return py::make_tuple(t.m, t.n, t.k);
      },
      py::arg("m"), py::arg("cout"), py::arg("sm_count"),
      "the (pixels, channels, k) tile the cutlass path uses for one branch of m output pixels and cout channels");
  m.def(
      "igemm_semaphores",
      [](std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3,
         std::int64_t c5, int sm_count, bool window) {
        if (n < 1 || c < 1 || h < 1 || w < 1 || c1 < 0 || c3 < 0 || c5 < 0 || sm_count < 1)
          throw std::invalid_argument("igemm_semaphores: sizes must be >= 1 (channels >= 0)");
        return fer_edge::igemm::semaphores(n, c, h, w, c1, c3, c5, sm_count, form_of(window));
      },
      py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("c1"), py::arg("c3"), py::arg("c5"),
      py::arg("sm_count"), py::arg("window") = false,
      "int32 split-K semaphores the cutlass path (window=True: its one-launch window form) needs for this "
      "layer (0: none)");
  m.def(
      "igemm_splits",
      [](std::int64_t m, std::int64_t cout, std::int64_t c, int sm_count) {
        if (m < 1 || cout < 1 || c < 1 || sm_count < 1) throw std::invalid_argument("igemm_splits: sizes must be >= 1");
        const int tile = fer_edge::igemm::pick_tile(m, cout, sm_count);
        return fer_edge::igemm::pick_splits(m, cout, c, fer_edge::igemm::TILES[tile], sm_count);
      },
      py::arg("m"), py::arg("cout"), py::arg("c"), py::arg("sm_count"),
      "how many slices the cutlass path cuts one branch's input channels into (1: not split)");
  m.def(
      "igemm_unsupported",
      [](std::int64_t c, std::int64_t c1, std::int64_t c3, std::int64_t c5, int layout, int dtype,
         std::vector<std::uintptr_t> ptrs, bool window) {
        if (ptrs.size() != 6) throw std::invalid_argument("igemm_unsupported: 6 pointers (x, out, wp, b1, b3, b5)");
        MsConvArgs a;
        a.c = c; a.c1 = c1; a.c3 = c3; a.c5 = c5;
        a.layout = static_cast<Layout>(layout);
        a.x = ptrs[0]; a.out = ptrs[1]; a.wp = ptrs[2]; a.b1 = ptrs[3]; a.b3 = ptrs[4]; a.b5 = ptrs[5];
        return fer_edge::igemm::unsupported(a, static_cast<fer_edge::DType>(dtype), form_of(window));
      },
      py::arg("c"), py::arg("c1"), py::arg("c3"), py::arg("c5"), py::arg("layout"), py::arg("dtype"),
      py::arg("ptrs"), py::arg("window") = false,
      "why the cutlass path (window=True: its window form, which reads no b1/b3/b5) cannot run a layer "
      "(\"\" when it can); ptrs: x, out, wp, b1, b3, b5");

  m.def(
      "mma_unsupported",
      [](std::int64_t c, std::int64_t c1, std::int64_t c3, std::int64_t c5, int layout, int dtype,
         std::vector<std::uintptr_t> ptrs) {
        if (ptrs.size() != 6) throw std::invalid_argument("mma_unsupported: 6 pointers (x, out, wp, b1, b3, b5)");
        MsConvArgs a;
        a.c = c; a.c1 = c1; a.c3 = c3; a.c5 = c5;
        a.layout = static_cast<Layout>(layout);
        a.x = ptrs[0]; a.out = ptrs[1]; a.wp = ptrs[2]; a.b1 = ptrs[3]; a.b3 = ptrs[4]; a.b5 = ptrs[5];
        return fer_edge::mma::unsupported(a, static_cast<fer_edge::DType>(dtype));
      },
      py::arg("c"), py::arg("c1"), py::arg("c3"), py::arg("c5"), py::arg("layout"), py::arg("dtype"),
      py::arg("ptrs"), "why the mma kernel cannot run a layer (\"\" when it can); ptrs: x, out, wp, b1, b3, b5");

#ifdef FER_EDGE_WITH_CUDA
  m.def(
      "msconv_cuda",
      [](std::uintptr_t x, std::uintptr_t out, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w3,
         std::uintptr_t b3, std::uintptr_t w5, std::uintptr_t b5, std::int64_t n, std::int64_t c,
         std::int64_t h, std::int64_t w, std::int64_t c1, std::int64_t c3, std::int64_t c5, int layout,
         bool relu, int dtype, std::uintptr_t stream, std::uintptr_t wp, int variant, std::uintptr_t workspace,
         std::uintptr_t counters, int mma_bm, std::int64_t mma_kchunk, bool mma_pdl, int cutlass90_tile_n) {
        if (dtype != 0 && dtype != 1) throw std::invalid_argument("fused_ms_conv: dtype must be 0 (float32) or 1 (float16)");
        if (variant < 0 || variant >= fer_edge::NUM_VARIANTS)
          throw std::invalid_argument("fused_ms_conv: variant must be 0 (simt), 1 (wmma), 2 (splitk), 3 (mma), "
                                      "4 (cutlass), 5 (stem), 6 (cutlass90), 7 (cutlass_window) or "
                                      "8 (cutlass90_window)");
        if (!fer_edge::igemm90::valid_tile_n(cutlass90_tile_n))
          throw std::invalid_argument("fused_ms_conv: cutlass90_tile_n must be 0, 64 or 128");
        MsConvArgs a = make_args(x, out, w1, b1, w3, b3, w5, b5, n, c, h, w, c1, c3, c5, layout, relu,
                                 /*empty_branches=*/true);
        a.wp = wp;
        py::gil_scoped_release nogil;
        fer_edge::msconv_cuda(a, static_cast<fer_edge::DType>(dtype), stream,
                              static_cast<fer_edge::Variant>(variant), workspace, counters,
                              {mma_bm, mma_kchunk, mma_pdl, cutlass90_tile_n});
      },
      py::arg("x"), py::arg("out"), py::arg("w1"), py::arg("b1"), py::arg("w3"), py::arg("b3"),
      py::arg("w5"), py::arg("b5"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"),
      py::arg("c1"), py::arg("c3"), py::arg("c5"), py::arg("layout"), py::arg("relu"), py::arg("dtype"),
      py::arg("stream"), py::arg("wp"), py::arg("variant"), py::arg("workspace") = 0, py::arg("counters") = 0,
      py::arg("mma_bm") = 0, py::arg("mma_kchunk") = 0, py::arg("mma_pdl") = true, py::arg("cutlass90_tile_n") = 0,
      "fused multi-scale conv on CUDA device pointers (dtype 0 = float32, 1 = float16) on `stream`; "
      "`wp`: the weights packed by fer_edge.kernels.pack_ms_weights (25, C, c1 + c3 + c5); `variant`: "
      "0 simt, 1 wmma, 2 splitk (with `workspace`/`counters` sized by splitk_plan), 3 mma (small batches on "
      "tensor cores; `wp` from pack_krsc_weights, `workspace` (zeros)/`counters` sized by mma_plan), 4 cutlass (one implicit GEMM per branch; `wp` from pack_krsc_weights), 5 stem (at most 4 "
      "input channels), 6 cutlass90 (cutlass on Hopper's wgmma and TMA), 7 cutlass_window and 8 "
      "cutlass90_window (the same as one launch over the zero-padded 5x5 window; `wp` from "
      "pack_window_weights, biases included).  mma_bm / mma_kchunk: the mma kernel's pixel tile and K chunk "
      "instead of its plan's (0: the plan's; buffers from mma_plan with the same values); mma_pdl: launch it as a "
      "programmatic dependent of the kernel before it (compute capability 9.0+; False: an ordinary launch); "
      "cutlass90_tile_n: the Hopper CUTLASS kernels' channel tile, 64 or 128 (0: igemm90_tile's choice).");
  m.def("sm_count", [](int device) { return fer_edge::splitk::sm_count_of(device); }, py::arg("device"));
  m.def("cuda_device_count", &fer_edge::cuda_device_count);
#endif

  m.def("build_info", []() {
    py::dict d;
    d["version"] = FER_EDGE_VERSION;
    d["cpu"] = true;
#ifdef FER_EDGE_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef FER_EDGE_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = split_archs(FER_EDGE_CUDA_ARCHS);
    d["cuda_runtime_version"] = fer_edge::cuda_runtime_version();
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::vector<std::string>{};
#endif
    // The CUTLASS paths (only ever built with CUDA).
#ifdef FER_EDGE_WITH_CUTLASS
    d["cutlass"] = true;
#else
    d["cutlass"] = false;
#endif
#ifdef FER_EDGE_WITH_CUTLASS_SM90
    d["cutlass_sm90"] = true;
#else
    d["cutlass_sm90"] = false;
#endif
    return d;
  });
}
