//===- ExpertSlices.h - Each rank's slice of expert parameters -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares how the expert parameters of one global layer are laid
// out over W ranks (PlanFormat.md, "Many ranks"): with E >= W rank j holds
// experts j*L .. j*L+L-1; with E < W each expert is sharded over s = W / E
// ranks and rank j holds shard q = j % s of expert e = j / s (hidden units
// q*h/s .. (q+1)*h/s of w1, w3, b1, w2, and the whole b2). moe-run and the
// tests make each rank's arguments from one global layer with it, and bring
// gradients back.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_EXPERTSLICES_H
#define FLEX_RUNTIME_EXPERTSLICES_H

#include "flex/Runtime/Core/LayerConfig.h"

#include <string_view>
#include <vector>

namespace flex {

/// Whether `name` is an expert parameter (w1, w2, w3, b1, b2) or its
/// gradient (grad_w1, ...).
bool isExpertParameter(std::string_view name);

/// Rank `rank`'s slice of the global expert parameter `name` (or its
/// gradient), given row-major in its one-rank shape ([E, d, h], [E, h, d],
/// [E, h], [E, d]). Empty in, empty out.
std::vector<double> sliceExpertParameter(const LayerConfig &layer,
                                         int64_t worldSize, int64_t rank,
                                         std::string_view name,
                                         const std::vector<double> &global);

/// The inverse: the global parameter from every rank's slice, concatenated in
/// rank order (what an all-gather gives). A b2 replicated over the shards of
/// an expert is taken from its first shard rank.
std::vector<double> assembleExpertParameter(const LayerConfig &layer,
                                            int64_t worldSize,
                                            std::string_view name,
                                            const std::vector<double> &slices);

} // namespace flex

#endif // FLEX_RUNTIME_EXPERTSLICES_H
