//===- HierarchicalAllToAll.cpp - Two-phase all-to-all over nodes ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the 2DH all-to-all on host memory: reorder, intra-node
// exchange, reorder, inter-node exchange.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/HierarchicalAllToAll.h"

#include <cstring>
#include <string>

namespace flex {

void HierarchicalAllToAll::phaseBlocks(int phase, int64_t blockBytes,
                                       std::vector<int64_t> &offsets,
                                       std::vector<int64_t> &sizes) const {
  const int64_t N = ranksPerNode, M = nodes();
  offsets.assign(static_cast<size_t>(ranks), 0);
  sizes.assign(static_cast<size_t>(ranks), 0);
  for (int64_t p = 0; p < ranks; ++p) {
    if (phase == 1 && p / N == node()) {
      // Segment l' of [N, M] blocks: M blocks for the node peer l'.
      offsets[p] = (p % N) * M * blockBytes;
      sizes[p] = M * blockBytes;
    } else if (phase == 2 && p % N == localIndex()) {
      // Segment n' of [M, N] blocks: N blocks for the peer on node n'.
      offsets[p] = (p / N) * N * blockBytes;
      sizes[p] = N * blockBytes;
    }
  }
}

namespace {

/// dst block i = src block source(i), for the W blocks.
template <typename Source>
void reorderBlocks(const uint8_t *src, uint8_t *dst, int64_t blocks,
                   int64_t blockBytes, Source source) {
  for (int64_t i = 0; i < blocks; ++i)
    std::memcpy(dst + i * blockBytes, src + source(i) * blockBytes,
                static_cast<size_t>(blockBytes));
}

} // namespace

Status hierarchicalAllToAll(Communicator &comm, int64_t ranksPerNode,
                            void *send, void *recv, int64_t blockBytes,
                            std::vector<uint8_t> &scratch,
                            std::string_view what) {
  const int64_t W = comm.size();
  if (ranksPerNode < 1 || W % ranksPerNode != 0)
    return Status(StatusCode::InvalidArgument,
                  std::string(what) + ": ranks_per_node " +
                      std::to_string(ranksPerNode) + " does not divide the " +
                      std::to_string(W) + " ranks");
  if (comm.memory() != CommMemory::Host)
    return Status(StatusCode::Unavailable,
                  std::string(what) +
                      ": the hierarchical all_to_all runs on "
                      "host communicators only; communicator '" +
                      std::string(comm.name()) + "' uses device memory");
  HierarchicalAllToAll h{W, ranksPerNode, comm.rank()};
  auto *sendBytes = static_cast<uint8_t *>(send);
  scratch.resize(static_cast<size_t>(W * blockBytes));
  std::vector<int64_t> offsets, sizes;

  // Phase 1: aggregate per local index, exchange within the node. `send` is
  // free once reordered, so it takes what phase 1 receives.
  reorderBlocks(sendBytes, scratch.data(), W, blockBytes,
                [&](int64_t i) { return h.phase1Source(i); });
  h.phaseBlocks(1, blockBytes, offsets, sizes);
  if (Status status = comm.allToAll(
          scratch.data(), offsets.data(), sizes.data(), send, offsets.data(),
          sizes.data(), std::string(what) + " (2DH intra-node)");
      !status)
    return status;

  // Phase 2: group by destination node, exchange across nodes; the blocks
  // arrive in source-rank order, the flat layout.
  reorderBlocks(sendBytes, scratch.data(), W, blockBytes,
                [&](int64_t i) { return h.phase2Source(i); });
  h.phaseBlocks(2, blockBytes, offsets, sizes);
  return comm.allToAll(scratch.data(), offsets.data(), sizes.data(), recv,
                       offsets.data(), sizes.data(),
                       std::string(what) + " (2DH inter-node)");
}

} // namespace flex
