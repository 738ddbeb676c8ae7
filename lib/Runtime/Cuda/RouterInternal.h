//===- RouterInternal.h - The router's paths, for tests and the bench -----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the router with its path chosen explicitly, so that the
// gate benchmark (tools/gate-bench) times both on the same card and the tests
// check both against an fp64 reference. cuda::router is routerWith(Auto).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_ROUTERINTERNAL_H
#define LIB_RUNTIME_CUDA_ROUTERINTERNAL_H

#include "flex/Runtime/Cuda/CudaKernels.h"

namespace flex::cuda::detail {

/// Auto: FewTokens where routerFewTokensApplies, else Gemm.
/// FewTokens: one kernel, fp32 FMAs on CUDA cores, K split over the warps of
///   a block and summed in a fixed order (any T; Auto takes it for few);
///   where K is also split over blocks, one more kernel adds the splits.
/// FewTokensLastSplit: FewTokens whose last block of each tile adds the
///   splits (the same order and bits: one launch). Auto takes it once a GPU
///   has timed it (Router.cu's kAutoSumsInLastSplit).
/// Gemm: bf16 x through cuBLAS on bf16 parts of wg (3 launches); f32 and
///   f16 x through the tiled fp32 kernel.
enum class RouterPath { Auto, FewTokens, FewTokensLastSplit, Gemm };

/// routerWith's tileTokens: the few-token kernel's tokens a block, 4, 8 or
/// 16 (0: its rule, 4 where 8 would leave SMs idle, else 8, or
/// FLEX_ROUTER_TILE_TOKENS); a token's logits have the same bits whatever
/// the tile.

/// T <= 256 (kRouterFewTokens: the few-token kernel's limit under Auto).
bool routerFewTokensApplies(int64_t tokens);

Status routerWith(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                  float *logits, int64_t tokens, int64_t modelDim,
                  int64_t experts, RouterPath path, int tileTokens = 0);

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_ROUTERINTERNAL_H
