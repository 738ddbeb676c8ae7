//===- Router.cpp - router and router_backward ----------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the router GEMM of [gate-1] and its backward: both are
// one dense typed GEMM with fp32 accumulation.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

namespace flex::cpu {

void router(ReadBuffer x, ReadBuffer wg, float *logits, int64_t tokens,
            int64_t modelDim, int64_t experts) {
  detail::typedGemm(x, 0, wg, 0, ReadBuffer{}, 0,
                    WriteBuffer{logits, DType::F32}, 0, WriteBuffer{}, tokens,
                    modelDim, experts, GroupedGemmOptions{});
}

void routerBackward(ReadBuffer x, ReadBuffer wg, const float *gradLogits,
                    int64_t tokens, int64_t modelDim, int64_t experts,
                    WriteBuffer gradX, WriteBuffer gradWg) {
  ReadBuffer gradLogitsBuffer{gradLogits, DType::F32};
  if (gradX.data) {
    // wg [d, E] read as b^T of a [T, E] x [E, d] product.
    GroupedGemmOptions options;
    options.transB = true;
    options.accumulate = true;
    detail::typedGemm(gradLogitsBuffer, 0, wg, 0, ReadBuffer{}, 0, gradX, 0,
                      WriteBuffer{}, tokens, experts, modelDim, options);
  }
  if (gradWg.data)
    detail::typedWgrad(x, gradLogitsBuffer, 0, tokens, modelDim, experts,
                       gradWg, 0, WriteBuffer{}, 0);
}

} // namespace flex::cpu
