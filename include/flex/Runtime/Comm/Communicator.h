//===- Communicator.h - Collectives between the ranks of a plan -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares Communicator, the collectives the collective steps of a
// multi-rank plan run through (docs/PlanFormat.md, "Many ranks"), and the
// communicators that need no library: "self" (one rank) and "local" (W ranks
// as W threads of one process, for tests and machines without MPI). MPI is
// in MpiCommunicator.h; NCCL (NcclCommunicator.h) implements the same
// interface with device pointers queued on a stream (memory() == Device,
// setStream, synchronizeStream).
//
// Every rank calls the same collectives in the same order. Every collective
// has a bounded wait: the timeout given to the communicator's factory
// (RuntimeOptions::collectiveTimeoutSeconds; FLEX_COLLECTIVE_TIMEOUT_S, or
// 300 s, when it is given none). A
// collective that times out or fails returns CommunicationError naming the
// collective (`what`) and the ranks it waited for; the communicator is then
// broken (later calls fail at once), and abort() ends the job where the
// transport cannot recover (MPI).
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_COMMUNICATOR_H
#define FLEX_RUNTIME_COMM_COMMUNICATOR_H

#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/Status.h"

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

namespace flex {

/// Where the buffers of a communicator's calls live.
enum class CommMemory : uint8_t {
  /// Host memory; calls complete before they return (self, local, MPI).
  Host,
  /// Device memory; calls are queued on the stream of setStream and return
  /// before they complete (NCCL).
  Device,
};

/// The bounded wait of every collective when the caller passes none (a
/// timeout < 0 to a factory): RuntimeOptions' default with the environment
/// applied (RuntimeOptions::fromEnvironment), so FLEX_COLLECTIVE_TIMEOUT_S
/// or 300 s. InvalidArgument when a FLEX_* variable holds a bad value.
Status getCollectiveTimeout(double &seconds);

class Communicator {
public:
  virtual ~Communicator();

  /// "self", "local", "mpi".
  virtual std::string_view name() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  virtual CommMemory memory() const { return CommMemory::Host; }
  /// The stream device calls are queued on; host communicators accept only
  /// null.
  virtual Status setStream(void *stream);

  /// All-to-all of byte blocks. To each rank p this rank sends
  /// `sendBytes[p]` bytes at `send + sendOffsets[p]`, and from each rank p
  /// it receives `recvBytes[p]` bytes into `recv + recvOffsets[p]`; the
  /// arrays have size() entries. recvBytes[p] must be what p sends here.
  /// Send and receive memory must not overlap.
  virtual Status allToAll(const void *send, const int64_t *sendOffsets,
                          const int64_t *sendBytes, void *recv,
                          const int64_t *recvOffsets, const int64_t *recvBytes,
                          std::string_view what) = 0;

  /// A run of bytes one all_to_all sends to, or receives from, `peer`.
  struct Block {
    int peer = 0;
    int64_t offset = 0;
    int64_t bytes = 0;
  };

  /// All-to-all of any number of blocks per peer, each in place: the i-th
  /// send block to p is the i-th receive block on p from this rank (same
  /// byte count). Exchanging rows where they lie needs no packing: a device
  /// communicator sends and receives each block directly (one group of
  /// point-to-point calls). This default packs the blocks per peer into
  /// host memory around allToAll, for host communicators.
  virtual Status allToAllBlocks(const void *send,
                                const std::vector<Block> &sendBlocks,
                                void *recv,
                                const std::vector<Block> &recvBlocks,
                                std::string_view what);

  /// values[i] = the largest values[i] over the ranks.
  virtual Status allReduceMaxInt32(int32_t *values, int64_t count,
                                   std::string_view what) = 0;

  /// Block p of `recv` (`bytes` bytes at recv + p * bytes) = `send` of rank
  /// p.
  virtual Status allGather(const void *send, int64_t bytes, void *recv,
                           std::string_view what) = 0;

  /// recv[i] = sum over ranks p of p's send[rank() * count + i], for `count`
  /// elements of `type` (F32, BF16, F16): `send` is [size(), count]. Sums
  /// are fp32, rounded once into `type`.
  virtual Status reduceScatterSum(const void *send, void *recv, int64_t count,
                                  DType type, std::string_view what) = 0;

  virtual Status barrier(std::string_view what) = 0;

  /// A collective over this communicator: the ranks that pass the same
  /// `color` (>= 0) form one new communicator, ranked by (`key`, rank()),
  /// as MPI_Comm_split. Grouped collective steps (PlanFormat.md, "Groups
  /// of ranks") run through such sub-communicators. The default says the
  /// communicator cannot split (Unavailable).
  virtual Status split(int color, int key, std::shared_ptr<Communicator> &group,
                       std::string_view what);

  /// Device communicators: waits until the work queued on `stream` (a
  /// cudaStream_t) has completed, at most the collective timeout, watching
  /// for transport errors meanwhile; on a timeout or an error the
  /// communicator is aborted and the call fails with CommunicationError
  /// naming `what`. A device backend waits through it instead of
  /// cudaStreamSynchronize, so a dead peer cannot hang the host. Host
  /// communicators: done at once (their calls complete before returning).
  virtual Status synchronizeStream(void *stream, std::string_view what);

  /// Called by the executor when a collective step failed with
  /// CommunicationError (`status` names the step). The MPI communicator
  /// prints the message and calls MPI_Abort (unless built not to); others
  /// stay broken, so later collectives fail at once instead of waiting.
  virtual void abort(const Status &status);
};

/// A partition of W ranks into groups of `size` ranks `stride` apart (the
/// `group_size`, `group_stride` of a collective step; size * stride divides
/// W): rank p's group is the ranks `base + i * stride`, i in [0, size), with
/// `base = p / (size * stride) * (size * stride) + p % stride`; p is the
/// i-th of them. stride 1: `size` consecutive ranks; size * stride == W:
/// the ranks of one residue modulo `stride`.
struct RankGroups {
  int64_t size = 0;
  int64_t stride = 1;

  int64_t color(int64_t rank) const {
    const int64_t block = size * stride;
    return rank / block * stride + rank % stride;
  }
  int64_t index(int64_t rank) const {
    return rank % (size * stride) / stride;
  }
};

/// The sub-communicator of this rank's group of `groups` (split by color
/// and index).
Status splitIntoGroups(Communicator &communicator, const RankGroups &groups,
                       std::shared_ptr<Communicator> &group);

/// The communicator of one rank: W = 1, every collective a local copy.
/// InvalidArgument naming `what` unless every block names a peer in
/// [0, size) with a non-negative offset and byte count.
Status checkBlocks(const std::vector<Communicator::Block> &blocks, int size,
                   std::string_view what);

/// InvalidArgument naming `what` for a negative split color.
Status checkSplitColor(int color, std::string_view what);

std::shared_ptr<Communicator> createSelfCommunicator();

/// W communicators for W threads of this process (rank i is element i);
/// thread i must make rank i's calls. The collectives meet in shared memory
/// and wait at most `timeoutSeconds` (< 0: FLEX_COLLECTIVE_TIMEOUT_S or its
/// default). For tests and for running a multi-rank plan without MPI.
Status
createLocalCommunicators(int size,
                         std::vector<std::shared_ptr<Communicator>> &ranks,
                         double timeoutSeconds = -1);

} // namespace flex

#endif // FLEX_RUNTIME_COMM_COMMUNICATOR_H
