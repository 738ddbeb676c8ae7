//===- Elementwise.h - Internal entry of the GEMM epilogue ------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the fused epilogue the grouped GEMM runs after cuBLAS
// when it needs a bias, an activation or the `pre` copy.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_ELEMENTWISE_H
#define LIB_RUNTIME_CUDA_ELEMENTWISE_H

#include "flex/Runtime/Cuda/CudaKernels.h"

namespace flex::cuda {

/// Over the rows of `space`: v = source + biasScale * bias[expert] (bias
/// may be absent; the scale applies in fp32 before the add); pre = v when
/// pre is present; c = epilogue(v). `source` may be pre or c.
Status applyGemmEpilogue(KernelContext &ctx, const void *source,
                         ReadBuffer bias, WriteBuffer pre, WriteBuffer c,
                         int64_t n, const ExpertRowSpace &space,
                         Epilogue epilogue, float biasScale = 1.0f);

} // namespace flex::cuda

#endif // LIB_RUNTIME_CUDA_ELEMENTWISE_H
