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

/// Over the rows of `space`: v = source + bias[expert] (bias may be absent);
/// pre = v when pre is present; c = epilogue(v). `source` may be pre or c.
Status applyGemmEpilogue(KernelContext &ctx, const void *source,
                         ReadBuffer bias, WriteBuffer pre, WriteBuffer c,
                         int64_t n, const ExpertRowSpace &space,
                         Epilogue epilogue);

} // namespace flex::cuda

#endif // LIB_RUNTIME_CUDA_ELEMENTWISE_H
