//===- GroupedGemmRule.h - Which kernel a grouped GEMM takes ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The one statement of the rule that picks the CUDA backend's grouped-GEMM
// path (RuntimeOptions::groupedGemm, docs/Runtime.md): the CUDA kernels
// (GroupedGemm.cu, DeviceGroupedGemm.cu) and the cost model
// (docs/CostModel.md) both read it, so the path the model prices is the path
// the runtime takes. Header-only and host-only arithmetic, no CUDA.
//
// A static row space (padded, C known on the host) is one cuBLAS
// strided-batched GEMM. A dynamic one takes the device-sized kernel when the
// options prefer it (below) and its operands fit it (bf16/f16, rows of k and
// n elements 16-byte aligned); otherwise the counts are read to the host
// and, for the forward and input-gradient GEMMs, the experts run as one
// strided-batched GEMM when the segments are blocks of one size (a padded
// layout's e * C) that hold enough of their rows (batchesUniformBlocks), as
// one cuBLAS grouped GEMM when no expert has many rows (groupedCublasTakes),
// else as one cuBLAS GEMM per expert with rows (the weight gradient always
// per expert).
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_GROUPEDGEMMRULE_H
#define FLEX_RUNTIME_CORE_GROUPEDGEMMRULE_H

#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Core/RuntimeOptions.h"

#include <cstdint>

namespace flex {

/// Mean rows per expert up to which `grouped_gemm=auto` takes the
/// device-sized kernel for a weight gradient. H100, bf16 (bench/RESULTS.md
/// Runs 20, 29): it wins at 64 rows per expert (65 vs 124 us per expert on
/// cuBLAS) and at 192 (490 vs 561 us) and loses at 1536 (2433 vs 1153 us:
/// mma.sync against cuBLAS's wgmma kernels).
inline constexpr int64_t kDeviceGemmRowsPerExpert = 256;

/// The same for the forward and input-gradient GEMMs, which have cuBLAS's
/// grouped call once the counts are on the host. H100, bf16, 64 experts
/// (Run 29; the host read included): device 155 vs grouped 164 us at 24
/// rows per expert, 236 vs 167 at 48, 454 vs 290 at 192.
inline constexpr int64_t kDeviceGemmForwardRowsPerExpert = 40;

/// The same where the device-sized kernel has its wgmma tiles (Hopper,
/// RuntimeOptions::wgmma). H100, bf16: Run 32, 64 experts: wgmma 201 us
/// against cuBLAS grouped 291 at 192 rows per expert, 152 against 167 at
/// 48; Run 43 (the store through shared memory), dropless layers with
/// grouped_gemm=device against auto at 512: C3 (1536 rows per expert, 64
/// experts) forward 2509 against 2701 us, training 2530 / 4962 against
/// 2772 / 4987, G3 3345 against 3449; C1 (4096 rows per expert, 8
/// experts) 3537 against 3482 (fc1 1620 against 1633, fc2 1470 against
/// 1387). The crossover lies between 1536 and 4096: 2048.
inline constexpr int64_t kWgmmaForwardRowsPerExpert = 2048;

/// The same for a gathered A (row_tokens): the wgmma kernel's cp.async
/// producer is measured at decode sizes only, and at prefill its gathered
/// forms lose to copying the rows first (H100, Runs 35-36: C3's gathered
/// fc1 2137 us on wgmma, 2992 on mma.sync, against 1236 for cuBLAS on the
/// dispatched rows); above it the rows are copied and the GEMM takes the
/// plain rule.
inline constexpr int64_t kWgmmaGatheredRowsPerExpert = 512;

/// Mean rows per expert up to which auto runs a fused backward in the wgmma
/// kernel's store (autoFusesBackwardInStore; Run 37 below). Between it and
/// kWgmmaForwardRowsPerExpert a fused backward runs as the device kernel's
/// GEMM and the pass.
inline constexpr int64_t kWgmmaFusedBackwardRowsPerExpert = 512;

/// Whether grouped_gemm=auto runs a fused backward
/// (grouped_gemm_activation_backward, grouped_gemm_glu_backward) in the wgmma
/// kernel's store rather than as the GEMM on grouped_gemm's path and the
/// activation's pass: up to kWgmmaFusedBackwardRowsPerExpert mean rows per
/// expert (`rows` the declared rows, E * C for a fixed capacity), or while a
/// graph records a dynamic row space (`capturing`; its GEMM then runs on the
/// device kernel anyway, and the store saves the pass). Above it the kernel's
/// product is slower than cuBLAS's by more than the pass it saves. H100
/// (bench/RESULTS.md Run 37): fused 1595 us against cuBLAS + pass 1334 at C3,
/// 1901 against 1714 at C1, 2094 against 1500 at G3 (the GLU's backward); with
/// wgmma on by default the
/// `+act_backward` variants' backward ran 5% slower than with it off at C3
/// dropless (Run 39).
/// The rows autoFusesBackwardInStore weighs for a step's row space: E x C
/// where the capacity is known on the host (a fixed capacity, a pipelined
/// chunk's n), else the declared rows R (from a chunk's first row on).
inline constexpr int64_t fusedBackwardRows(int64_t staticCapacity,
                                           int64_t experts,
                                           int64_t declaredRows) {
  return staticCapacity >= 0 ? staticCapacity * experts : declaredRows;
}

inline constexpr bool autoFusesBackwardInStore(int64_t rows, int64_t experts,
                                               bool capturing) {
  return capturing || rows <= kWgmmaFusedBackwardRowsPerExpert * experts;
}

/// The largest count up to which the host path of a forward or
/// input-gradient GEMM issues one cublasGemmGroupedBatchedEx over the
/// experts instead of a GEMM per expert. H100, bf16, 64 experts (Run 29):
/// grouped 290 vs per expert 531 us at 192 rows each, 755 vs 760 at 1536,
/// but 1790 vs 1177 on a skewed routing of the same mean (a few experts of
/// thousands of rows): one kernel shape for every group then fits the large
/// ones badly.
inline constexpr int64_t kGroupedCublasMaxRows = 1024;

/// Whether the host path runs a forward or input-gradient GEMM whose
/// largest expert has `maxRows` rows as one cuBLAS grouped call.
inline constexpr bool groupedCublasTakes(int64_t maxRows) {
  return maxRows <= kGroupedCublasMaxRows;
}

/// Mean rows per expert up to which the device-sized kernel runs its small
/// (32 x 128) CTA tile, else the large (128 x 128) one. H100 (Run 20): small
/// 149 vs large 233 us at 24 rows per expert, 266 vs 241 us at 48.
inline constexpr int64_t kDeviceGemmSmallTileRowsPerExpert = 32;

/// The device-sized kernel's CTA tiles (rows x columns of C).
enum class DeviceGemmTile : uint8_t {
  Small, ///< 32 x 128
  Large, ///< 128 x 128
};

/// Rows of C per CTA tile (the M padding of each expert's rows).
inline constexpr int64_t deviceGemmTileRows(DeviceGemmTile tile) {
  return tile == DeviceGemmTile::Small ? 32 : 128;
}

/// The tile the forward kernel takes for `rowBound` declared rows over
/// `experts` groups. (The weight gradient always runs the large tile.)
inline constexpr DeviceGemmTile deviceGemmTile(int64_t rowBound,
                                               int64_t experts) {
  return rowBound <= kDeviceGemmSmallTileRowsPerExpert * experts
             ? DeviceGemmTile::Small
             : DeviceGemmTile::Large;
}

/// Whether the options send a dynamic grouped GEMM of `rowBound` declared
/// rows (R, T * k on one rank for ragged) over `experts` groups to the
/// device-sized kernel: `device` always, `cublas` never, `auto` when the
/// mean rows per expert R / E <= kDeviceGemmForwardRowsPerExpert (a weight
/// gradient: kDeviceGemmRowsPerExpert) or while a CUDA graph is being
/// recorded (the cuBLAS paths' host read cannot be). Where the device has
/// the wgmma kernel (`wgmma`: Hopper, HopperGemmKernel.cuh), the forward
/// and input-gradient bound is kWgmmaForwardRowsPerExpert, with a gathered
/// A (`gathered`) kWgmmaGatheredRowsPerExpert.
inline constexpr bool prefersDeviceGemm(GroupedGemmImpl impl, int64_t rowBound,
                                        int64_t experts, bool capturing,
                                        bool weightGradient = false,
                                        bool wgmma = false,
                                        bool gathered = false) {
  switch (impl) {
  case GroupedGemmImpl::Device:
    return true;
  case GroupedGemmImpl::Cublas:
    return false;
  case GroupedGemmImpl::Auto:
    break;
  }
  const int64_t perExpert = weightGradient ? kDeviceGemmRowsPerExpert
                            : !wgmma       ? kDeviceGemmForwardRowsPerExpert
                            : gathered     ? kWgmmaGatheredRowsPerExpert
                                           : kWgmmaForwardRowsPerExpert;
  return capturing || rowBound <= perExpert * experts;
}

/// The most rows a dynamic routing's uniform blocks may compute per row
/// they hold and still run as one strided-batched GEMM of C rows per expert
/// instead of a GEMM per expert with rows. One batched call fills the device
/// where per-expert calls of a few hundred rows leave SMs idle and pay a
/// launch each: H100 (bench/RESULTS.md Runs 20, 22): C3's 64 per-expert GEMMs
/// 965 us against 744 us batched over the same rows; l37 (capacity 1.25,
/// 25% padding) 690 us padded-batched against 1393 us per expert.
inline constexpr double kBatchedBlockRowsPerHeldRow = 1.5;

/// Whether `experts` blocks of `block` rows, holding `held` rows in all,
/// run as one strided-batched GEMM (forward and input gradient only: a
/// row of C depends on its own row of A alone, so the padding rows it
/// computes stay padding; the weight gradient sums over rows and stays per
/// expert).
inline constexpr bool batchesUniformBlocks(int64_t experts, int64_t block,
                                           int64_t held) {
  return experts > 0 && block > 0 && held > 0 &&
         static_cast<double>(experts) * static_cast<double>(block) <=
             kBatchedBlockRowsPerHeldRow * static_cast<double>(held);
}

/// Whether the device-sized kernel takes operands of `type` with rows of k
/// and n elements: bf16/f16, each row a multiple of 16 bytes (k and n
/// multiples of 8). The CUDA backend also checks the pointers' alignment,
/// the compute capability (8.0+) and the grid's limits, which the cost
/// model assumes met.
inline constexpr bool deviceGemmShapeFits(DType type, int64_t k, int64_t n) {
  return (type == DType::BF16 || type == DType::F16) && k % 8 == 0 &&
         n % 8 == 0;
}

} // namespace flex

#endif // FLEX_RUNTIME_CORE_GROUPEDGEMMRULE_H
