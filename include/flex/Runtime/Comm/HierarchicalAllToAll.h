//===- HierarchicalAllToAll.h - Two-phase all-to-all over nodes -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the two-dimensional hierarchical ("2DH", as in Tutel)
// all-to-all of W equal blocks, for W = M * N ranks on M nodes of N ranks
// each (`ranks_per_node` N of the `all_to_all` step, docs/PlanFormat.md).
// Rank r is (node r / N, local index r % N).
//
// A flat all-to-all sends W - 1 blocks per rank, so a pair of nodes exchanges
// N * N small messages. 2DH moves the same bytes in two phases:
//  1. intra-node: rank (n, l) sends to its node peer (n, l') the M blocks
//     bound for (any node, l'), aggregated into one message;
//  2. inter-node: rank (n, l) then holds, from every (n, l''), the blocks
//     bound for (n', l) and forwards the N of them to (n', l) in one message.
// A pair of nodes thus exchanges one message of N blocks per local index.
// Each phase is a byte-block Communicator::allToAll in which only the peers
// of the phase (same node, resp. same local index) get non-empty blocks;
// between the phases a local reordering of blocks. The result is exactly the
// flat all-to-all's: block p of `recv` is what rank p had for this rank.
//
// HierarchicalAllToAll is the index math only (which block goes where, the
// per-peer offsets of each phase), so a device communicator can reuse it with
// device copies; hierarchicalAllToAll runs it on host memory.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_HIERARCHICALALLTOALL_H
#define FLEX_RUNTIME_COMM_HIERARCHICALALLTOALL_H

#include "flex/Runtime/Comm/Communicator.h"

#include <cstdint>
#include <string_view>
#include <vector>

namespace flex {

struct HierarchicalAllToAll {
  int64_t ranks = 1;        ///< W
  int64_t ranksPerNode = 1; ///< N, divides W
  int64_t rank = 0;         ///< this rank

  int64_t nodes() const { return ranks / ranksPerNode; } ///< M
  int64_t node() const { return rank / ranksPerNode; }
  int64_t localIndex() const { return rank % ranksPerNode; }

  /// The block of the flat send buffer ([W] blocks, block p for rank p) at
  /// position i of the phase-1 send buffer, which is [N, M] blocks: position
  /// (l', n') holds the block for rank n' * N + l'. Segment l' goes to the
  /// node peer of local index l'.
  int64_t phase1Source(int64_t i) const {
    const int64_t M = nodes();
    return (i % M) * ranksPerNode + i / M;
  }
  /// The block of the phase-1 receive buffer at position i of the phase-2
  /// send buffer. Phase 1 receives [N, M] blocks: (l'', n') is what node
  /// peer l'' had for rank n' * N + localIndex(). Phase 2 sends [M, N]:
  /// segment n' (those N blocks, in the order of l'') goes to rank
  /// n' * N + localIndex(), and the phase-2 receive buffer is then [M, N] =
  /// [W] blocks by source rank, the flat result.
  int64_t phase2Source(int64_t i) const {
    const int64_t M = nodes(), N = ranksPerNode;
    return (i % N) * M + i / N;
  }

  /// The per-peer byte offsets and sizes of phase 1 or 2 (the same for
  /// sending and receiving): non-empty only for the peers on this node
  /// (phase 1) or of this local index (phase 2). Both have W entries.
  void phaseBlocks(int phase, int64_t blockBytes, std::vector<int64_t> &offsets,
                   std::vector<int64_t> &sizes) const;
};

/// All-to-all of W blocks of `blockBytes` each through the two phases of
/// HierarchicalAllToAll with `ranksPerNode` N (dividing W): `recv` block p
/// ends up with block rank() of rank p's `send`, byte for byte as with the
/// flat Communicator::allToAll. Host communicators only. `send` is
/// overwritten (it receives phase 1); `scratch` grows to W blocks. `what`
/// names the step; messages add which phase failed.
Status hierarchicalAllToAll(Communicator &comm, int64_t ranksPerNode,
                            void *send, void *recv, int64_t blockBytes,
                            std::vector<uint8_t> &scratch,
                            std::string_view what);

} // namespace flex

#endif // FLEX_RUNTIME_COMM_HIERARCHICALALLTOALL_H
