//===- GateInternal.h - The gate's pipelines, for tests and the bench -----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the gate with its pipeline chosen explicitly, and a hook
// called after each launch, so that the gate benchmark (tools/gate-bench)
// times the fused path and the thread-per-token path it replaced, stage by
// stage, on the same card in one process. cuda::gate is gateWith(Auto).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_GATEINTERNAL_H
#define LIB_RUNTIME_CUDA_GATEINTERNAL_H

#include "flex/Runtime/Cuda/CudaKernels.h"

namespace flex::cuda::detail {

/// Auto: the fused token kernel where gateFusedApplies, else Legacy.
/// Legacy: one thread per token over global memory (the pre-fusion gate).
enum class GatePath { Auto, Legacy };

/// The fused path's limits: 2 <= E <= 256 (any k <= 8 after clamping to E).
bool gateFusedApplies(int64_t experts, int64_t topK);

/// Called on the host right after each launch, with the stage's name.
using GateStageHook = void (*)(void *user, const char *stage);

Status gateWith(KernelContext &ctx, const float *logits, int64_t tokens,
                int64_t experts, const GateAttrs &attrs, const GateOutputs &out,
                GatePath path, GateStageHook hook = nullptr,
                void *user = nullptr);

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_GATEINTERNAL_H
