//===- CallbackCommunicator.h - Collectives an embedder gives -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// A host-memory communicator whose collectives are functions the embedder
// gives: a framework's own process group (flexmoe's CPU ranks run through
// torch.distributed over gloo this way), or any transport Flex does not link.
// Each function returns a Status; a failure fails the collective with
// CommunicationError naming the step, and the communicator stays broken
// (later calls fail at once, as the other communicators do). The functions
// run on the thread that runs the plan, in the same order on every rank;
// the communicator is for one thread (as an executor is). It has no timeout
// of its own: the functions' transport bounds the waits. It cannot split:
// grouped collectives (sharded experts with r < s, 2DH) need MPI or NCCL,
// and say so.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_CALLBACKCOMMUNICATOR_H
#define FLEX_RUNTIME_COMM_CALLBACKCOMMUNICATOR_H

#include "flex/Runtime/Comm/Communicator.h"

#include <functional>
#include <string>

namespace flex {

/// The collectives, with Communicator's meanings (Communicator.h); every
/// one is required. Arrays of per-peer offsets and bytes have `size`
/// entries.
struct HostCollectives {
  std::function<Status(const void *send, const int64_t *sendOffsets,
                       const int64_t *sendBytes, void *recv,
                       const int64_t *recvOffsets, const int64_t *recvBytes)>
      allToAll;
  std::function<Status(const void *send, int64_t bytes, void *recv)> allGather;
  std::function<Status(const void *send, void *recv, int64_t count,
                       DType type)>
      reduceScatterSum;
  std::function<Status(int32_t *values, int64_t count)> allReduceMaxInt32;
  std::function<Status()> barrier;
};

/// Rank `rank` of `size` over `collectives`; `name` is what name() says
/// ("callbacks" when empty). InvalidArgument for a bad rank or size or a
/// missing function.
Status createCallbackCommunicator(std::shared_ptr<Communicator> &communicator,
                                  int rank, int size,
                                  HostCollectives collectives,
                                  std::string name = "");

} // namespace flex

#endif // FLEX_RUNTIME_COMM_CALLBACKCOMMUNICATOR_H
