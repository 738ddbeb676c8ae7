//===- PeerCopyExchange.h - All-to-all through the copy engines -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The in-place all-to-all of the NCCL communicator for ranks on one host,
// through the GPUs' copy engines instead of NCCL's kernels: each rank
// copies its blocks straight into its peers' receive buffers
// (cudaMemcpyAsync on peer memory, CUDA IPC across processes), so the
// exchange takes no SMs from the expert GEMMs it runs beside
// (bench/RESULTS.md, Runs 5-11). Opt-in (FLEX_A2A_TRANSPORT=ce,
// docs/Runtime.md); a private part of the NCCL communicator.
//
// Ordering, per exchange, over a host all-gather with a deadline:
//   1. each rank records `ready` on its stream (its receive rows are free,
//      its send rows written), then the ranks gather where each receives
//      (its receive allocation, offset and blocks);
//   2. each rank's copies to peer q wait for its own `ready` and q's, then
//      run on a stream per peer; the stream joins them and records `done`;
//   3. the ranks gather again (every `done` is recorded), and each stream
//      waits for every peer's `done`: its receive rows are complete.
// A host gather orders each record before the peers' waits on it; the
// next exchange re-records only after every peer passed that point.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_LIB_RUNTIME_COMM_PEERCOPYEXCHANGE_H
#define FLEX_LIB_RUNTIME_COMM_PEERCOPYEXCHANGE_H

#include "flex/Runtime/Comm/NcclCommunicator.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

struct CUevent_st;
struct CUstream_st;

namespace flex {

class PeerCopyExchange {
public:
  /// A collective over the ranks of `allGather`: creates the events and
  /// streams, shares them, and checks every pair of ranks can copy into
  /// each other (one host; peer access). Unavailable when they cannot.
  static Status create(int rank, int size, int device, HostAllGather allGather,
                       std::unique_ptr<PeerCopyExchange> &exchange);
  ~PeerCopyExchange();

  /// Communicator::allToAllBlocks on `stream`: on return the copies are
  /// queued and `stream` waits for every block that lands here.
  Status allToAllBlocks(void *stream, const void *send,
                        const std::vector<Communicator::Block> &sendBlocks,
                        void *recv,
                        const std::vector<Communicator::Block> &recvBlocks,
                        std::string_view what);

private:
  PeerCopyExchange() = default;
  /// Where `recv` lies in a peer's view: the base of its allocation (raw,
  /// for peers in this process) and the IPC handle of that base.
  Status describeReceiveBuffer(void *recv, uint64_t &base, int64_t &offset,
                               std::string &handle, std::string_view what);
  /// This process's address of peer q's allocation described by
  /// (`base`, `handle`).
  Status peerAllocation(int q, uint64_t base, const std::string &handle,
                        char *&mapped, std::string_view what);

  int rank_ = 0, size_ = 1, device_ = 0;
  HostAllGather allGather_;
  CUevent_st *ready_ = nullptr, *done_ = nullptr;
  /// Per peer (null for this rank): its events, and this rank's copy
  /// stream to it with the event that joins that stream back.
  std::vector<CUevent_st *> peerReady_, peerDone_, joined_;
  std::vector<CUstream_st *> streams_;
  /// Per peer: whether it runs in this process (its pointers and events are
  /// used directly; the others' come through IPC).
  std::vector<bool> samePeerProcess_;

  /// Whether some peer is in another process (IPC handles needed).
  bool anotherProcess() const {
    for (int q = 0; q < size_; ++q)
      if (q != rank_ && !samePeerProcess_[q])
        return true;
    return false;
  }
  /// Per peer in another process: the allocation it receives into (handle
  /// bytes) and where it is mapped here; replaced when the handle changes.
  std::map<int, std::pair<std::string, char *>> opened_;
};

} // namespace flex

#endif // FLEX_LIB_RUNTIME_COMM_PEERCOPYEXCHANGE_H
