// The "stem" CUDA kernel: the fused layer for inputs of at most MAX_C channels
// (MACNN's first layer reads one gray channel).  With so few input channels
// there is almost nothing to multiply per output value, so the layer is bound
// by writing its output; the GEMM-shaped kernels waste their tiles on it.
#pragma once

#include <cstdint>

#include "msconv.h"

namespace fer_edge {
namespace stem {

constexpr int MAX_C = 4;

#ifdef FER_EDGE_WITH_CUDA
// One launch on `stream` (fp32 or fp16, NCHW or NHWC); sm_count picks the tile height.
void launch(const MsConvArgs& a, DType dtype, std::uintptr_t stream, int sm_count);
#endif

}  // namespace stem
}  // namespace fer_edge
