//===- Topology.h - Collectives priced from a node shape --------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// Past the machines that were measured: with a node shape (DeviceProfile's
// Topology: GPUs per node, an intra-node and an inter-node link, each an
// alpha, a per-peer latency and a beta) the cost model prices a collective
// from the links its messages cross instead of a measured point
// (docs/CostModel.md, "Past the machines"):
//
// - a flat all_to_all over g ranks: its messages to the local members of
//   the group over the intra link and to the remote ones over the inter
//   link, both parts at once (the slower one is the time);
// - a 2DH all_to_all (ranks_per_node N): phase 1 among the N ranks of a
//   plan node with messages N times fewer and g / N times larger, then
//   phase 2 among the g / N ranks of one local index with messages of N
//   blocks, plus the staging copies (pack, two reorders, unpack) at memory
//   bandwidth;
// - all_gather and reduce_scatter as rings over the slowest link the group
//   crosses; all_reduce the cheaper of a ring and a tree.
//
// Pure functions of their arguments; MLIR-free.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COSTMODEL_TOPOLOGY_H
#define FLEX_RUNTIME_COSTMODEL_TOPOLOGY_H

#include "flex/Runtime/CostModel/DeviceProfile.h"

#include <cstdint>

namespace flex {

/// One collective's time on a node shape, by part (seconds).
struct TopologyCost {
  /// The messages over the intra-node link (a 2DH exchange: phase 1).
  double intraSeconds = 0;
  /// The messages over the inter-node link (a 2DH exchange: phase 2).
  double interSeconds = 0;
  /// A 2DH exchange's packing and reordering copies.
  double stagingSeconds = 0;
  /// The whole collective: max(intra, inter) for a flat exchange (its parts
  /// run at once), their sum plus staging for 2DH.
  double seconds = 0;
};

/// How many members of a group of `groupSize` ranks `stride` apart share
/// a node with the group's first rank (itself included): min(groupSize,
/// ceil(gpusPerNode / stride)). Exact for every rank when the stride
/// divides gpusPerNode or is a multiple of it (powers of two).
int64_t membersOnNode(const Topology &topology, int64_t groupSize,
                      int64_t stride);

/// The cost of sending `peers` messages of `bytesPerPeer` bytes over
/// `link`: alpha + peers x perPeer + peers x bytesPerPeer / beta; 0 when
/// peers <= 0.
double linkSeconds(const LinkFigures &link, int64_t peers, double bytesPerPeer);

/// A flat all_to_all among `groupSize` ranks `stride` apart in which each
/// rank sends `bytesPerPeer` bytes to every other member.
TopologyCost flatAllToAllCost(const Topology &topology, int64_t groupSize,
                              int64_t stride, double bytesPerPeer);

/// What a 2DH exchange's staging copies cost.
struct StagingFigures {
  /// Bytes read plus written per second (the profile's memory bandwidth).
  double bytesPerSecond = 1;
  /// One copy call or kernel.
  double launchSeconds = 0;
  /// The two block reorders as one device copy per block (2 x groupSize
  /// copies: the CUDA backend's way) rather than one kernel per phase.
  bool copyPerBlock = true;
};

/// The 2DH all_to_all among `groupSize` ranks on plan nodes of
/// `ranksPerNode` N (1 < N < groupSize, N dividing it), each rank's block
/// for each peer `bytesPerPeer` bytes: phase 1 sends each of its N - 1
/// node peers the g / N blocks bound for that peer's local index (stride
/// 1), phase 2 sends each of the g / N - 1 ranks of its local index on the
/// other nodes one message of N blocks (stride N); then the staging: pack,
/// the two reorders and unpack each read and write the g blocks.
TopologyCost hierarchicalAllToAllCost(const Topology &topology,
                                      int64_t groupSize, int64_t ranksPerNode,
                                      double bytesPerPeer,
                                      const StagingFigures &staging);

/// all_gather or reduce_scatter (`bytesExchanged` = what one rank sends,
/// as getStepWork counts it) as a ring over the slowest link the group
/// crosses: alpha + (g - 1) x perPeer + bytesExchanged / beta. all_reduce
/// of `bytesExchanged` bytes: the cheaper of a ring (2 (g - 1) steps,
/// 2 (g - 1) / g of the bytes) and a tree (2 ceil(log2 g) steps, twice the
/// bytes). An all_to_all kind is priced as flatAllToAllCost.
TopologyCost collectiveCost(const Topology &topology, CollectiveKind kind,
                            int64_t groupSize, int64_t stride,
                            double bytesExchanged);

} // namespace flex

#endif // FLEX_RUNTIME_COSTMODEL_TOPOLOGY_H
