//===- ExpertSlices.cpp - Each rank's slice of the expert parameters ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the mapping between a global expert parameter and the
// slices W ranks hold, both ways, for whole and sharded experts.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/ExpertSlices.h"

#include <cassert>

namespace flex {
namespace {

std::string_view baseName(std::string_view name) {
  if (name.substr(0, 5) == "grad_")
    name.remove_prefix(5);
  return name;
}

/// Calls `copy(globalIndex, sliceIndex)` for every element rank `rank`
/// holds of parameter `base`.
template <typename Fn>
void forEachElement(const LayerConfig &layer, int64_t worldSize, int64_t rank,
                    std::string_view base, Fn copy) {
  const int64_t E = layer.experts, d = layer.modelDim, h = layer.hiddenDim;
  const int64_t s = expertShards(E, worldSize);
  if (s == 1) {
    // Whole experts: a contiguous block of E / W experts.
    int64_t perExpert = base == "w1" || base == "w2" || base == "w3" ? d * h
                        : base == "b1"                               ? h
                                                                     : d;
    int64_t local = E / worldSize, count = local * perExpert;
    for (int64_t i = 0; i < count; ++i)
      copy(rank * count + i, i);
    return;
  }
  // Shard q of expert e: hidden units q*h/s .. (q+1)*h/s.
  const int64_t e = rank / s, q = rank % s, hs = h / s;
  if (base == "w1" || base == "w3") {
    for (int64_t i = 0; i < d; ++i)
      for (int64_t c = 0; c < hs; ++c)
        copy((e * d + i) * h + q * hs + c, i * hs + c);
  } else if (base == "w2") {
    for (int64_t i = 0; i < hs * d; ++i)
      copy((e * h + q * hs) * d + i, i);
  } else if (base == "b1") {
    for (int64_t c = 0; c < hs; ++c)
      copy(e * h + q * hs + c, c);
  } else {
    for (int64_t i = 0; i < d; ++i)
      copy(e * d + i, i);
  }
}

} // namespace

bool isExpertParameter(std::string_view name) {
  std::string_view base = baseName(name);
  return base == "w1" || base == "w2" || base == "w3" || base == "b1" ||
         base == "b2";
}

std::vector<double> sliceExpertParameter(const LayerConfig &layer,
                                         int64_t worldSize, int64_t rank,
                                         std::string_view name,
                                         const std::vector<double> &global) {
  if (global.empty() || worldSize <= 1)
    return global;
  std::vector<double> slice;
  forEachElement(layer, worldSize, rank, baseName(name),
                 [&](int64_t from, int64_t to) {
                   if (static_cast<size_t>(to) >= slice.size())
                     slice.resize(to + 1);
                   assert(static_cast<size_t>(from) < global.size());
                   slice[to] = global[from];
                 });
  return slice;
}

std::vector<double> assembleExpertParameter(const LayerConfig &layer,
                                            int64_t worldSize,
                                            std::string_view name,
                                            const std::vector<double> &slices) {
  if (slices.empty() || worldSize <= 1)
    return slices;
  const int64_t s = expertShards(layer.experts, worldSize);
  std::string_view base = baseName(name);
  const size_t perRank = slices.size() / worldSize;
  // The global size is W * per-rank, except for a b2 replicated s times.
  std::vector<double> global(base == "b2" ? slices.size() / s : slices.size());
  for (int64_t rank = worldSize - 1; rank >= 0; --rank)
    forEachElement(layer, worldSize, rank, base, [&](int64_t to, int64_t from) {
      global[to] = slices[rank * perRank + from];
    });
  return global;
}

} // namespace flex
