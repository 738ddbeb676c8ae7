//===- Topology.cpp - Collectives priced from a node shape ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the collectives' prices on a node shape
// (docs/CostModel.md, "Past the machines").
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/Topology.h"

#include <algorithm>
#include <cmath>

namespace flex {

int64_t membersOnNode(const Topology &topology, int64_t groupSize,
                      int64_t stride) {
  const int64_t n = std::max<int64_t>(1, groupSize);
  const int64_t s = std::max<int64_t>(1, stride);
  const int64_t p = std::max<int64_t>(1, topology.gpusPerNode);
  // Members i * s of the first node: i * s < p.
  return std::min(n, (p + s - 1) / s);
}

double linkSeconds(const LinkFigures &link, int64_t peers,
                   double bytesPerPeer) {
  if (peers <= 0)
    return 0;
  const double count = static_cast<double>(peers);
  return link.alphaSeconds + count * link.perPeerSeconds +
         count * bytesPerPeer / link.betaBytesPerSecond;
}

TopologyCost flatAllToAllCost(const Topology &topology, int64_t groupSize,
                              int64_t stride, double bytesPerPeer) {
  const int64_t local = membersOnNode(topology, groupSize, stride);
  TopologyCost cost;
  cost.intraSeconds = linkSeconds(topology.intra, local - 1, bytesPerPeer);
  cost.interSeconds =
      linkSeconds(topology.inter, groupSize - local, bytesPerPeer);
  // NCCL posts every peer's send and receive in one group: the NVLink and
  // the network messages move at the same time.
  cost.seconds = std::max(cost.intraSeconds, cost.interSeconds);
  return cost;
}

TopologyCost hierarchicalAllToAllCost(const Topology &topology,
                                      int64_t groupSize, int64_t ranksPerNode,
                                      double bytesPerPeer,
                                      const StagingFigures &staging) {
  const int64_t g = std::max<int64_t>(1, groupSize);
  const int64_t n = std::clamp<int64_t>(ranksPerNode, 1, g);
  const int64_t nodes = g / n;
  TopologyCost cost;
  // Phase 1: to each node peer the g / N blocks bound for its local index.
  cost.intraSeconds =
      flatAllToAllCost(topology, n, 1,
                       bytesPerPeer * static_cast<double>(nodes))
          .seconds;
  // Phase 2: to the same local index on every other node, N blocks at once.
  cost.interSeconds = flatAllToAllCost(topology, nodes, n,
                                       bytesPerPeer * static_cast<double>(n))
                          .seconds;
  // Pack, two reorders and unpack: each reads and writes the g blocks.
  const double blocks = bytesPerPeer * static_cast<double>(g);
  const double launches =
      staging.copyPerBlock ? 2.0 + 2.0 * static_cast<double>(g) : 4.0;
  cost.stagingSeconds = 4.0 * 2.0 * blocks / staging.bytesPerSecond +
                        launches * staging.launchSeconds;
  cost.seconds = cost.intraSeconds + cost.interSeconds + cost.stagingSeconds;
  return cost;
}

TopologyCost collectiveCost(const Topology &topology, CollectiveKind kind,
                            int64_t groupSize, int64_t stride,
                            double bytesExchanged) {
  const int64_t g = std::max<int64_t>(1, groupSize);
  if (kind == CollectiveKind::AllToAll)
    return flatAllToAllCost(topology, g, stride,
                            g > 1 ? bytesExchanged / double(g - 1) : 0.0);
  TopologyCost cost;
  if (g <= 1)
    return cost;
  // A ring moves at the pace of the slowest link it crosses.
  const bool spans = membersOnNode(topology, g, stride) < g;
  const LinkFigures &link = spans ? topology.inter : topology.intra;
  const double steps = static_cast<double>(g - 1);
  double seconds;
  if (kind == CollectiveKind::AllReduce) {
    const double ring = link.alphaSeconds + 2 * steps * link.perPeerSeconds +
                        2 * bytesExchanged * steps / static_cast<double>(g) /
                            link.betaBytesPerSecond;
    const double depth = std::ceil(std::log2(static_cast<double>(g)));
    const double tree = link.alphaSeconds + 2 * depth * link.perPeerSeconds +
                        2 * bytesExchanged / link.betaBytesPerSecond;
    seconds = std::min(ring, tree);
  } else {
    seconds = link.alphaSeconds + steps * link.perPeerSeconds +
              bytesExchanged / link.betaBytesPerSecond;
  }
  (spans ? cost.interSeconds : cost.intraSeconds) = seconds;
  cost.seconds = seconds;
  return cost;
}

} // namespace flex
