//===- GateInternal.h - The gate's pipelines, for tests and the bench -----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the gate with its pipeline chosen explicitly, and a hook
// called after each launch, so that the gate benchmark (tools/gate-bench)
// times the pipelines stage by stage on the same card in one process and the
// tests run each of them against the CPU kernel. cuda::gate is
// gateWith(Auto). It also declares the token kernel of GateFewTokens.cu that
// Gate.cu launches.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_GATEINTERNAL_H
#define LIB_RUNTIME_CUDA_GATEINTERNAL_H

#include "flex/Runtime/Cuda/CudaKernels.h"

namespace flex::cuda::detail {

/// Auto: Lanes routed in its last block where gateLanesRouteApplies, else
///   OneBlock where gateOneBlockPreferred, else LanesScan where
///   gateFusedApplies, else Legacy (kAutoRoutesInLaneKernel in Gate.cu).
/// Legacy: one thread per token over global memory (the pre-fusion gate).
/// Tile: the fused token kernel with 32 rows per block in shared memory and
///   the per-token work one thread per token (Legacy beyond its limits).
/// Lanes: the fused token kernel with a group of lanes per token (E / 8
///   rounded up to a power of two; Legacy beyond the fused limits); where
///   gateLanesRouteApplies, its last block routes the slots (no scan and
///   location launches), else as LanesScan.
/// LanesScan: the lane token kernel, then the scan and location kernels.
/// OneBlock: tokens, order, locations, [cap-1], offsets, rows and l_aux in
///   one launch of one block (GateFewTokens.cu); Unavailable where
///   gateOneBlockApplies is false.
enum class GatePath { Auto, Legacy, Tile, Lanes, LanesScan, OneBlock };

/// The fused paths' limits: 2 <= E <= 256 (any k <= 8 after clamping to E).
bool gateFusedApplies(int64_t experts, int64_t topK);

/// The one-block path's limits: the fused ones, at most 4 tokens per lane
/// group (T * lanes(E) <= 4096), T * k <= 8192 and, with batch-prioritized
/// routing, T <= 256 (its rank count is quadratic in T).
bool gateOneBlockApplies(int64_t tokens, int64_t experts, int64_t topK,
                         bool batchPrioritized);

/// Where Auto takes the one-block path: it applies and, unprioritized,
/// every lane group has at most one token (T * lanes(E) <= 1024).
bool gateOneBlockPreferred(int64_t tokens, int64_t experts, int64_t topK,
                           bool batchPrioritized);

/// Where the lane kernel's last block routes the slots: the fused limits,
/// T > 0, no batch-prioritized order (it needs the sort first) and at most
/// kLaneRoutePairs (2048) (choice, token) pairs: one block's location pass over
/// them costs less than the scan and location launches it replaces.
bool gateLanesRouteApplies(int64_t tokens, int64_t experts, int64_t topK,
                           bool batchPrioritized);

/// Called on the host right after each launch, with the stage's name.
using GateStageHook = void (*)(void *user, const char *stage);

Status gateWith(KernelContext &ctx, const float *logits, int64_t tokens,
                int64_t experts, const GateAttrs &attrs, const GateOutputs &out,
                GatePath path, GateStageHook hook = nullptr,
                void *user = nullptr);

/// What the Lanes token kernel reads and writes: the tokens' outputs, the
/// [loss-1] partial sums and first-choice counts (added), the [loc-1] chunk
/// counts in token order (added; null with batch-prioritized routing, which
/// writes priority and the identity order instead).
struct LaneTokenArgs {
  const float *logits;
  int64_t tokens;
  int32_t experts, k;
  bool normalize;
  double noiseScale;
  uint64_t seed;
  float *scores;
  int32_t *indices;
  float *gates;
  float *priority;
  int32_t *order;
  int32_t *chunkCounts;
  double *scoreSums;
  int32_t *firstChoices;
  /// Non-null (gateLanesRouteApplies; chunkCounts null): the kernel's last
  /// block also routes every slot - locations, [cap-1], the experts' rows
  /// and offsets, l_aux - into `outputs` by `attrs`; the ticket counts the
  /// finished blocks. Ticket, scoreSums and firstChoices start at 0 and the
  /// last block leaves them 0 (no memset per call).
  uint32_t *ticket;
  const GateAttrs *attrs;
  const GateOutputs *outputs;
};

/// Launches the Lanes token kernel on ctx's stream (gateFusedApplies holds).
void launchLaneTokens(KernelContext &ctx, const LaneTokenArgs &args);

/// Launches the whole gate as one block on ctx's stream
/// (gateOneBlockApplies holds; T = 0 is fine).
void launchGateOneBlock(KernelContext &ctx, const float *logits, int64_t tokens,
                        int64_t experts, const GateAttrs &attrs,
                        const GateOutputs &out);

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_GATEINTERNAL_H
