//===- Capacity.h - The [cap-1] capacity arithmetic -------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the one implementation of [cap-1] (DESIGN.md section 3)
// that the runtime has: the CPU gate, the CUDA gate kernel, the CUDA
// backend's static capacity, the plan loader's buffer bounds and
// verifyLayerConfig all call these functions, so the capacity a plan was
// sized for and the capacity a gate computes cannot drift apart. They are
// constexpr and host/device (FLEX_HOST_DEVICE), so a CUDA kernel calls them
// as they are. (The fp64 reference in lib/Reference computes C on its own, on
// purpose: it checks this code.)
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_CAPACITY_H
#define FLEX_RUNTIME_CORE_CAPACITY_H

#include "flex/Runtime/Core/LayerConfig.h"

#include <cstdint>

/// Marks a function callable from host and device code under nvcc; nothing
/// for a host compiler.
#ifndef FLEX_HOST_DEVICE
#ifdef __CUDACC__
#define FLEX_HOST_DEVICE __host__ __device__
#else
#define FLEX_HOST_DEVICE
#endif
#endif

namespace flex {

/// The value a capacity saturates to instead of overflowing int64 (only
/// configurations that verifyLayerConfig rejects get there).
inline constexpr int64_t kCapacitySaturated = INT64_MAX;

/// spe = ceil(T / E); 0 without tokens or experts.
FLEX_HOST_DEVICE constexpr int64_t slotsPerExpert(int64_t tokens,
                                                  int64_t experts) {
  return experts > 0 && tokens > 0 ? (tokens + experts - 1) / experts : 0;
}

/// k * int(|f| * spe): the C of Fixed and the bound of Bounded. k is clamped
/// to [1, E] ([gate-2]); the contract's bounded mode writes f < 0 where
/// LayerConfig writes the mode and f > 0, both mean |f|. Saturates to
/// kCapacitySaturated (a NaN factor too) instead of overflowing.
FLEX_HOST_DEVICE constexpr int64_t
fixedCapacity(double factor, int64_t tokens, int64_t experts, int64_t topK) {
  int64_t spe = slotsPerExpert(tokens, experts);
  if (spe == 0)
    return 0;
  double scaled = (factor < 0 ? -factor : factor) * static_cast<double>(spe);
  int64_t k = topK < 1 ? 1 : (topK > experts ? experts : topK);
  constexpr double kLimit = static_cast<double>(int64_t{1} << 62);
  if (!(scaled < kLimit / static_cast<double>(k)))
    return kCapacitySaturated;
  return k * static_cast<int64_t>(scaled);
}

/// C rounded up to a multiple of `alignment` (pipelining degree, sharding);
/// alignment <= 1 leaves C as it is. Saturates like fixedCapacity.
FLEX_HOST_DEVICE constexpr int64_t alignCapacity(int64_t capacity,
                                                 int64_t alignment) {
  if (alignment <= 1)
    return capacity;
  if (capacity > kCapacitySaturated - (alignment - 1))
    return kCapacitySaturated;
  return (capacity + alignment - 1) / alignment * alignment;
}

/// [cap-1] The capacity C for the largest per-expert slot count `maxCount`:
/// Fixed: k * int(f * spe); Dropless: maxCount; Bounded: min(maxCount,
/// k * int(f * spe)); never negative; then rounded up to `alignment`.
/// int(f * spe) == 0 gives C = 0 (every slot is dropped) in Fixed and Bounded.
FLEX_HOST_DEVICE constexpr int64_t
computeCapacity(CapacityMode mode, double factor, int64_t tokens,
                int64_t experts, int64_t topK, int64_t maxCount,
                int64_t alignment = 1) {
  int64_t fixed = fixedCapacity(factor, tokens, experts, topK);
  int64_t capacity = 0;
  switch (mode) {
  case CapacityMode::Fixed:
    capacity = fixed;
    break;
  case CapacityMode::Dropless:
    capacity = maxCount;
    break;
  case CapacityMode::Bounded:
    capacity = maxCount < fixed ? maxCount : fixed;
    break;
  }
  return alignCapacity(capacity < 0 ? 0 : capacity, alignment);
}

/// The capacity bound known before routing: the C of Fixed, the upper bound
/// of Bounded and, for Dropless, the tokens T (no expert gets more than T
/// slots, as the k choices of one token are distinct experts). It is
/// computeCapacity with the largest count any routing can give, T.
FLEX_HOST_DEVICE constexpr int64_t
staticCapacityBound(const LayerConfig &config) {
  return computeCapacity(config.capacityMode, config.capacityFactor,
                         config.tokens, config.experts, config.topK,
                         config.tokens > 0 ? config.tokens : 0);
}

/// staticCapacityBound rounded up to `alignment`: the C a plan's dispatch
/// buffers are sized for.
FLEX_HOST_DEVICE constexpr int64_t
alignedCapacityBound(const LayerConfig &config, int64_t alignment) {
  return alignCapacity(staticCapacityBound(config), alignment);
}

/// The rows the aligned layout (DispatchLayout::Aligned) may use: `kept`
/// rows at most (min(T k, E C)) over `experts` experts of at most
/// `capacity` rows each, every expert's rows rounded up to `align`. The
/// rounding adds less than `align` rows per expert, and no expert uses more
/// than C rounded up, so both bounds hold; the result is a multiple of
/// `align`. Saturates to kCapacitySaturated like fixedCapacity.
FLEX_HOST_DEVICE constexpr int64_t alignedLayoutRows(int64_t kept,
                                                     int64_t experts,
                                                     int64_t capacity,
                                                     int64_t align) {
  if (kept <= 0 || experts <= 0 || capacity <= 0)
    return 0;
  if (align <= 1)
    return kept;
  if (experts > (kCapacitySaturated - kept) / align)
    return kCapacitySaturated;
  int64_t byRows = (kept + experts * (align - 1)) / align * align;
  int64_t perExpert = alignCapacity(capacity, align);
  if (perExpert == kCapacitySaturated ||
      perExpert > kCapacitySaturated / experts)
    return byRows;
  return byRows < experts * perExpert ? byRows : experts * perExpert;
}

} // namespace flex

#endif // FLEX_RUNTIME_CORE_CAPACITY_H
