//===- AllToAllLayout.h - The row mapping of all_to_all ---------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the index mapping of the `all_to_all` step
// (docs/PlanFormat.md, "Many ranks") and the packing of its rows into a
// contiguous staging buffer, one block per peer, so that any communicator's
// byte-block allToAll moves them.
//
// With W ranks, L local experts, the runtime capacity C split into D chunks
// of Cq = C / D rows, for chunk q:
//  - the dispatch layout [W, L, C, n]: the rows exchanged with peer p are L
//    runs of Cq rows, run l starting at row (p * L + l) * C + q * Cq;
//  - the received layout [D, L, W, Cq, n]: run l of peer p starts at row
//    ((q * L + l) * W + p) * Cq.
// Direction `dispatch` sends from the dispatch layout and receives into the
// received layout; `combine` is the exact inverse. The staging buffer is
// [W, L, Cq, n]: block p holds the L runs exchanged with peer p, in order.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_ALLTOALLLAYOUT_H
#define FLEX_RUNTIME_COMM_ALLTOALLLAYOUT_H

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Plan.h"

#include <cstdint>

namespace flex {

struct AllToAllLayout {
  int64_t ranks = 1;        ///< W
  int64_t localExperts = 1; ///< L
  int64_t capacity = 0;     ///< C, a multiple of chunks
  int64_t chunks = 1;       ///< D
  int64_t chunk = 0;        ///< q

  int64_t chunkRows() const { return capacity / chunks; } ///< Cq
  /// Rows exchanged with each peer: L * Cq.
  int64_t blockRows() const { return localExperts * chunkRows(); }

  /// First row of run l exchanged with peer p, in the dispatch layout.
  int64_t dispatchLayoutRow(int64_t peer, int64_t local) const {
    return (peer * localExperts + local) * capacity + chunk * chunkRows();
  }
  /// First row of run l exchanged with peer p, in the received layout.
  int64_t receivedLayoutRow(int64_t peer, int64_t local) const {
    return ((chunk * localExperts + local) * ranks + peer) * chunkRows();
  }

  /// Copies the rows this rank sends (`rowBytes` bytes each) from `input`
  /// into `staging` ([W, L, Cq] rows).
  void pack(AllToAllDirection direction, const void *input, int64_t rowBytes,
            void *staging) const;
  /// Copies the received rows from `staging` into `output`.
  void unpack(AllToAllDirection direction, const void *staging,
              int64_t rowBytes, void *output) const;

  /// The same exchange in place, for Communicator::allToAllBlocks: one run
  /// of Cq rows per (peer, local expert), sent from its row in the sending
  /// layout and received at its row in the other one, in (peer, l) order on
  /// both sides, so the i-th block to p is p's i-th block from here.
  void blocks(AllToAllDirection direction, int64_t rowBytes,
              std::vector<Communicator::Block> &send,
              std::vector<Communicator::Block> &recv) const;
};

} // namespace flex

#endif // FLEX_RUNTIME_COMM_ALLTOALLLAYOUT_H
