//===- NcclCommunicator.h - Collectives over NCCL on GPUs -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the NCCL communicator (lib/Runtime/Comm/
// NcclCommunicator.cpp, built when CMake finds CUDA and NCCL >= 2.14:
// FLEX_HAVE_NCCL) and its three ways to start: from a unique id the caller
// shares (threads of one process, tests), through MPI (rank 0 makes the id,
// MPI broadcasts it), or through a torchrun-style environment (RANK,
// WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the id goes through TcpRendezvous).
// Without NCCL the functions exist and return Unavailable, so callers need no
// #ifdef. No NCCL or CUDA header is included here.
//
// The communicator works on device memory (memory() == Device): every
// pointer passed to a collective is a device pointer of the communicator's
// GPU, and calls are queued on the stream of setStream (null = the legacy
// default stream) and return before the data moves. allToAll is one NCCL
// group of ncclSend/ncclRecv per peer; allReduceMaxInt32, allGather and
// reduceScatterSum (f32, bf16, f16 in NCCL's own type; sums of more than two
// ranks round per NCCL's algorithm, not once) are the NCCL collectives.
//
// Bounded waits. The NCCL communicator is non-blocking (ncclConfig_t
// blocking = 0): initialization and every enqueue are polled with
// ncclCommGetAsyncError until done, and synchronizeStream polls the stream
// the same way, both against the collective timeout (the options', else
// FLEX_COLLECTIVE_TIMEOUT_S or 300 s). On
// a timeout or an NCCL error the communicator calls ncclCommAbort (so no
// kernel keeps waiting for a peer) and the call fails with
// CommunicationError naming the collective; the communicator is then broken
// and later calls fail at once.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_NCCLCOMMUNICATOR_H
#define FLEX_RUNTIME_COMM_NCCLCOMMUNICATOR_H

#include "flex/Runtime/Comm/Communicator.h"

#include <array>
#include <functional>
#include <string_view>

namespace flex {

/// The 128 bytes of an ncclUniqueId.
using NcclUniqueId = std::array<char, 128>;

/// A host all-gather with a deadline: block p of `recv` (`bytes` bytes at
/// recv + p * bytes) = `send` of rank p; the same `bytes` on every rank.
using HostAllGather = std::function<Status(const void *send, int64_t bytes,
                                           void *recv, std::string_view what)>;

/// The all-gather of a host communicator (MPI, local threads), as peer
/// copies take it.
inline HostAllGather hostAllGatherOver(std::shared_ptr<Communicator> host) {
  return [host](const void *send, int64_t bytes, void *recv,
                std::string_view what) {
    return host->allGather(send, bytes, recv, what);
  };
}

struct NcclCommunicatorOptions {
  /// The GPU of this rank; -1 = the calling thread's current device. The
  /// communicator makes it current for its calls.
  int device = -1;
  /// Seconds initialization and every collective may wait; < 0 =
  /// FLEX_COLLECTIVE_TIMEOUT_S or its default.
  double timeoutSeconds = -1;
  /// All-to-all exchanges through the GPUs' copy engines instead of NCCL's
  /// kernels (ranks on one host; docs/Runtime.md, "Peer copies"), with
  /// their handshakes over `hostAllGather`, which must then be set. The
  /// MPI and environment starts take rank 0's flag for every rank and set
  /// `hostAllGather` themselves.
  bool peerCopies = false;
  HostAllGather hostAllGather;
};

/// The options of a communicator on GPU `device` that `runtime` asks for:
/// its collective timeout and all-to-all transport (a2a_transport "ce" =
/// peer copies). The runtime options are taken as given; apply the
/// environment first (RuntimeOptions::fromEnvironment) where it should count.
inline NcclCommunicatorOptions ncclOptionsFrom(const RuntimeOptions &runtime,
                                               int device = -1) {
  NcclCommunicatorOptions options;
  options.device = device;
  options.timeoutSeconds = runtime.collectiveTimeoutSeconds;
  options.peerCopies = runtime.a2aTransport == AllToAllTransport::CopyEngine;
  return options;
}

/// Whether this build has the NCCL communicator.
bool isNcclAvailable();

/// A fresh unique id (ncclGetUniqueId), to be shared with every rank.
Status createNcclUniqueId(NcclUniqueId &id);

/// Rank `rank` of `size` of the communicator named by `id`. Every rank must
/// call it (each on its own GPU, e.g. one thread per GPU) before the
/// timeout.
Status createNcclCommunicator(std::shared_ptr<Communicator> &communicator,
                              const NcclUniqueId &id, int rank, int size,
                              const NcclCommunicatorOptions &options = {});

/// Over the ranks of an MPI communicator (the address of an MPI_Comm; null
/// = MPI_COMM_WORLD), which must be initialized (FailedPrecondition
/// otherwise). Unavailable when this build lacks NCCL or MPI.
Status createNcclCommunicatorFromMpi(
    std::shared_ptr<Communicator> &communicator, const void *mpiComm,
    const NcclCommunicatorOptions &options = {});

/// From a torchrun-style environment (readRendezvousEnvironment in
/// TcpRendezvous.h): rank 0 makes the id and sends it to the others.
Status createNcclCommunicatorFromEnvironment(
    std::shared_ptr<Communicator> &communicator,
    const NcclCommunicatorOptions &options = {});

} // namespace flex

#endif // FLEX_RUNTIME_COMM_NCCLCOMMUNICATOR_H
