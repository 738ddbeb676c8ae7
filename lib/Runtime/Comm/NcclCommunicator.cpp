//===- NcclCommunicator.cpp - Collectives over NCCL on GPUs ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the NCCL communicator of NcclCommunicator.h on a
// non-blocking ncclComm_t: every NCCL call that answers ncclInProgress is
// polled with ncclCommGetAsyncError until it is enqueued, against the
// collective deadline, and synchronizeStream polls cudaStreamQuery the same
// way. Bootstrap through MPI (when built with it) or TcpRendezvous.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/NcclCommunicator.h"
#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Comm/TcpRendezvous.h"

#include "PeerCopyExchange.h"

#include <cuda_runtime.h>
#include <nccl.h>

#ifdef FLEX_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace flex {
namespace {

using Clock = std::chrono::steady_clock;

Clock::time_point deadlineAfter(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(seconds));
}

/// Spins briefly, then sleeps: collectives of a step usually finish in
/// microseconds, a stuck one should not burn a core.
void backOff(int &polls) {
  if (++polls < 2000)
    std::this_thread::yield();
  else
    std::this_thread::sleep_for(std::chrono::microseconds(50));
}

std::string ncclText(ncclResult_t result, ncclComm_t comm) {
  std::string text = std::string(ncclGetErrorString(result));
  const char *last = ncclGetLastError(comm);
  if (last && *last)
    text += " (" + std::string(last) + ")";
  return text;
}

Status cudaStatus(cudaError_t error, const std::string &what) {
  if (error == cudaSuccess)
    return Status::ok();
  cudaGetLastError();
  return Status(StatusCode::Internal, what + ": " + cudaGetErrorName(error) +
                                          " (" + cudaGetErrorString(error) +
                                          ")");
}

/// Waits until a non-blocking communicator has no operation in progress.
/// ncclSuccess, the error, or ncclInProgress at the deadline.
ncclResult_t pollComm(ncclComm_t comm, ncclResult_t result,
                      Clock::time_point deadline) {
  int polls = 0;
  while (result == ncclInProgress) {
    if (Clock::now() >= deadline)
      return ncclInProgress;
    backOff(polls);
    if (ncclResult_t r = ncclCommGetAsyncError(comm, &result);
        r != ncclSuccess)
      return r;
  }
  return result;
}

class NcclCommunicator final
    : public Communicator,
      public std::enable_shared_from_this<NcclCommunicator> {
public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device,
                   double timeoutSeconds)
      : comm_(comm), rank_(rank), size_(size), device_(device),
        timeoutSeconds_(timeoutSeconds) {}
  ~NcclCommunicator() override {
    if (!comm_)
      return;
    cudaSetDevice(device_);
    if (barrierFlag_)
      cudaFree(barrierFlag_);
    // Finalize flushes queued work; a peer that never comes must not hang
    // the destructor, so a late finalize aborts instead (with the
    // communicators split from this one).
    ncclResult_t result =
        pollComm(comm_, ncclCommFinalize(comm_), deadlineAfter(timeoutSeconds_));
    if (result == ncclSuccess) {
      ncclCommDestroy(comm_);
      comm_ = nullptr;
      return;
    }
    brokenReason_ = "its communicator did not finalize in time";
    abortFamily();
  }

  std::string_view name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  CommMemory memory() const override { return CommMemory::Device; }

  Status setStream(void *stream) override {
    stream_ = static_cast<cudaStream_t>(stream);
    return Status::ok();
  }

  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    if (peerCopies_) {
      std::vector<Block> sendBlocks, recvBlocks;
      for (int p = 0; p < size_; ++p) {
        sendBlocks.push_back({p, sendOffsets[p], sendBytes[p]});
        recvBlocks.push_back({p, recvOffsets[p], recvBytes[p]});
      }
      return allToAllBlocks(send, sendBlocks, recv, recvBlocks, what);
    }
    if (Status s = begin(what); !s)
      return s;
    if (sendBytes[rank_] != recvBytes[rank_])
      return Status(StatusCode::InvalidArgument,
                    std::string(what) + ": rank " + std::to_string(rank_) +
                        " sends " + std::to_string(sendBytes[rank_]) +
                        " bytes to itself but expects " +
                        std::to_string(recvBytes[rank_]));
    // The own block is a device copy; the rest one group of point-to-point
    // calls, so NCCL runs them concurrently without deadlock.
    if (sendBytes[rank_] > 0)
      if (Status s = cudaStatus(
              cudaMemcpyAsync(static_cast<char *>(recv) + recvOffsets[rank_],
                              static_cast<const char *>(send) +
                                  sendOffsets[rank_],
                              static_cast<size_t>(sendBytes[rank_]),
                              cudaMemcpyDeviceToDevice, stream_),
              std::string(what) + ": copying this rank's own block");
          !s)
        return s;
    ncclResult_t result = ncclGroupStart();
    for (int p = 0; p < size_ && result == ncclSuccess; ++p) {
      if (p == rank_)
        continue;
      if (recvBytes[p] > 0)
        result = ncclRecv(static_cast<char *>(recv) + recvOffsets[p],
                          static_cast<size_t>(recvBytes[p]), ncclUint8, p,
                          comm_, stream_);
      if (result == ncclSuccess && sendBytes[p] > 0)
        result = ncclSend(static_cast<const char *>(send) + sendOffsets[p],
                          static_cast<size_t>(sendBytes[p]), ncclUint8, p,
                          comm_, stream_);
    }
    // The group must be closed whatever happened inside it.
    ncclResult_t end = ncclGroupEnd();
    return finish(result != ncclSuccess && result != ncclInProgress ? result
                                                                    : end,
                  what, "ncclSend/ncclRecv group");
  }

  Status allToAllBlocks(const void *send, const std::vector<Block> &sendBlocks,
                        void *recv, const std::vector<Block> &recvBlocks,
                        std::string_view what) override {
    if (Status s = begin(what); !s)
      return s;
    if (peerCopies_) {
      Status copied = peerCopies_->allToAllBlocks(stream_, send, sendBlocks,
                                                  recv, recvBlocks, what);
      // A failed handshake leaves the ranks out of step: break, as NCCL.
      if (copied.code() == StatusCode::CommunicationError)
        return breakWith(what, copied.message());
      return copied;
    }
    // One group of point-to-point calls, this rank's own blocks included
    // (NCCL copies them in the same kernels, alongside the transfers),
    // which NCCL matches in order per peer and runs without deadlock.
    for (const std::vector<Block> *blocks : {&sendBlocks, &recvBlocks})
      if (Status s = checkBlocks(*blocks, size_, what); !s)
        return s;
    int64_t ownSent = 0, ownReceived = 0;
    for (const Block &block : sendBlocks)
      if (block.peer == rank_)
        ownSent += block.bytes;
    for (const Block &block : recvBlocks)
      if (block.peer == rank_)
        ownReceived += block.bytes;
    if (ownSent != ownReceived)
      return Status(StatusCode::InvalidArgument,
                    std::string(what) + ": rank " + std::to_string(rank_) +
                        " sends itself " + std::to_string(ownSent) +
                        " bytes but expects " + std::to_string(ownReceived));
    ncclResult_t result = ncclGroupStart();
    for (const Block &block : recvBlocks)
      if (result == ncclSuccess && block.bytes > 0)
        result = ncclRecv(static_cast<char *>(recv) + block.offset,
                          static_cast<size_t>(block.bytes), ncclUint8,
                          block.peer, comm_, stream_);
    for (const Block &block : sendBlocks)
      if (result == ncclSuccess && block.bytes > 0)
        result = ncclSend(static_cast<const char *>(send) + block.offset,
                          static_cast<size_t>(block.bytes), ncclUint8,
                          block.peer, comm_, stream_);
    ncclResult_t end = ncclGroupEnd();
    return finish(result != ncclSuccess && result != ncclInProgress ? result
                                                                    : end,
                  what, "ncclSend/ncclRecv group of blocks");
  }

  Status allReduceMaxInt32(int32_t *values, int64_t count,
                           std::string_view what) override {
    if (Status s = begin(what); !s)
      return s;
    return finish(ncclAllReduce(values, values, static_cast<size_t>(count),
                                ncclInt32, ncclMax, comm_, stream_),
                  what, "ncclAllReduce");
  }

  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view what) override {
    if (Status s = begin(what); !s)
      return s;
    return finish(ncclAllGather(send, recv, static_cast<size_t>(bytes),
                                ncclUint8, comm_, stream_),
                  what, "ncclAllGather");
  }

  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    if (Status s = begin(what); !s)
      return s;
    ncclDataType_t ncclType;
    switch (type) {
    case DType::F32:
      ncclType = ncclFloat32;
      break;
    case DType::BF16:
      ncclType = ncclBfloat16;
      break;
    case DType::F16:
      ncclType = ncclFloat16;
      break;
    default:
      return Status(StatusCode::InvalidArgument,
                    std::string(what) +
                        ": reduce_scatter sums f32, bf16 or f16, not i32");
    }
    return finish(ncclReduceScatter(send, recv, static_cast<size_t>(count),
                                    ncclType, ncclSum, comm_, stream_),
                  what, "ncclReduceScatter");
  }

  Status barrier(std::string_view what) override {
    if (Status s = begin(what); !s)
      return s;
    if (!barrierFlag_)
      if (Status s = cudaStatus(cudaMalloc(&barrierFlag_, sizeof(int32_t)),
                                std::string(what) + ": cudaMalloc");
          !s)
        return s;
    if (Status s = finish(ncclAllReduce(barrierFlag_, barrierFlag_, 1,
                                        ncclInt32, ncclMax, comm_, stream_),
                          what, "ncclAllReduce (barrier)");
        !s)
      return s;
    return synchronizeStream(stream_, what);
  }

  Status synchronizeStream(void *stream, std::string_view what) override {
    if (broken_)
      return brokenStatus(what);
    if (Status s = cudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s)
      return s;
    auto deadline = deadlineAfter(timeoutSeconds_);
    auto s = static_cast<cudaStream_t>(stream);
    int polls = 0;
    for (;;) {
      cudaError_t query = cudaStreamQuery(s);
      if (query == cudaSuccess)
        return Status::ok();
      if (query != cudaErrorNotReady)
        return cudaStatus(query, "rank " + std::to_string(rank_) + ": " +
                                     std::string(what) +
                                     " (an earlier kernel or collective "
                                     "failed)");
      // The stream may hold this communicator's collectives and those of
      // communicators split from it.
      if (std::string failed = asyncFailure(); !failed.empty())
        return breakWith(what, "NCCL failed while the stream ran: " + failed);
      if (Clock::now() >= deadline)
        return breakWith(what, "the stream did not finish within " +
                                   std::to_string(timeoutSeconds_) +
                                   " s (FLEX_COLLECTIVE_TIMEOUT_S); a peer "
                                   "may have left or be stuck");
      backOff(polls);
    }
  }

  void abort(const Status &status) override {
    if (broken_)
      return;
    broken_ = true;
    brokenReason_ = status.message();
    abortComm();
  }

private:
  /// The first asynchronous NCCL error of this communicator or one split
  /// from it, or "".
  std::string asyncFailure() {
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress)
      return ncclText(async, comm_);
    for (const std::weak_ptr<NcclCommunicator> &weak : children_)
      if (std::shared_ptr<NcclCommunicator> child = weak.lock())
        if (!child->broken_ && child->comm_) {
          ncclCommGetAsyncError(child->comm_, &async);
          if (async != ncclSuccess && async != ncclInProgress)
            return "a communicator split from it: " +
                   ncclText(async, child->comm_);
        }
    return "";
  }

  Status begin(std::string_view what) {
    if (broken_)
      return brokenStatus(what);
    return cudaStatus(cudaSetDevice(device_),
                      std::string(what) + ": cudaSetDevice");
  }

public:
  /// ncclCommSplit (non-blocking, polled against the deadline): the
  /// sub-communicator of grouped collective steps. The child is aborted
  /// with this communicator, so a bounded wait that gives up on the world
  /// also stops a grouped collective that hangs.
  Status split(int color, int key, std::shared_ptr<Communicator> &group,
               std::string_view what) override {
    group.reset();
    if (Status status = checkSplitColor(color, what); !status)
      return status;
    if (Status s = begin(what); !s)
      return s;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    // On a failure NCCL may still write a handle into `comm` (from its own
    // thread, until the parent's abort joins it): that one is aborted too.
    auto fail = [&](const std::string &reason) {
      Status failed = breakWith(what, reason);
      if (ncclComm_t late = __atomic_load_n(&comm, __ATOMIC_ACQUIRE))
        ncclCommAbort(late);
      return failed;
    };
    ncclResult_t result = ncclCommSplit(comm_, color, key, &comm, &config);
    if (result != ncclSuccess && result != ncclInProgress)
      return fail("ncclCommSplit: " + ncclText(result, comm_));
    // On a non-blocking parent NCCL finishes the split on a thread of its
    // own and writes the new handle only at the end (NCCL's init.cc), so
    // the handle is polled for, not read once after the call returns.
    const std::string timeLimit = " within " + std::to_string(timeoutSeconds_) +
                                  " s (FLEX_COLLECTIVE_TIMEOUT_S)";
    auto deadline = deadlineAfter(timeoutSeconds_);
    ncclComm_t made = nullptr;
    for (int polls = 0;;) {
      ncclResult_t parent = ncclSuccess;
      if (ncclResult_t r = ncclCommGetAsyncError(comm_, &parent);
          r != ncclSuccess)
        parent = r;
      if (parent != ncclSuccess && parent != ncclInProgress)
        return fail("ncclCommSplit: " + ncclText(parent, comm_));
      made = __atomic_load_n(&comm, __ATOMIC_ACQUIRE);
      if (made && parent == ncclSuccess)
        break;
      if (Clock::now() >= deadline)
        return fail("ncclCommSplit did not finish" + timeLimit +
                    (made ? "" : "; no new communicator yet"));
      backOff(polls);
    }
    // The child's own initialization may still be in progress.
    result = pollComm(made, ncclInProgress, deadline);
    int rank = 0, size = 0;
    std::string failed;
    if (result != ncclSuccess)
      failed = result == ncclInProgress
                   ? "the new communicator did not start" + timeLimit
                   : "the new communicator failed to start: " +
                         ncclText(result, made);
    else if (ncclResult_t r = ncclCommUserRank(made, &rank); r != ncclSuccess)
      failed = "ncclCommUserRank: " + ncclText(r, made);
    else if (ncclResult_t r = ncclCommCount(made, &size); r != ncclSuccess)
      failed = "ncclCommCount: " + ncclText(r, made);
    if (!failed.empty())
      return fail(failed);
    auto child = std::make_shared<NcclCommunicator>(made, rank, size, device_,
                                                    timeoutSeconds_);
    child->parent_ = weak_from_this();
    // Children of executors that are gone need no abort.
    children_.erase(
        std::remove_if(children_.begin(), children_.end(),
                       [](const std::weak_ptr<NcclCommunicator> &c) {
                         return c.expired();
                       }),
        children_.end());
    children_.push_back(child);
    group = std::move(child);
    return Status::ok();
  }

private:
  /// Waits until the call `result` came back from is enqueued.
  Status finish(ncclResult_t result, std::string_view what,
                const char *call) {
    result = pollComm(comm_, result, deadlineAfter(timeoutSeconds_));
    if (result == ncclSuccess)
      return Status::ok();
    if (result == ncclInProgress)
      return breakWith(what, std::string(call) + " was not enqueued within " +
                                 std::to_string(timeoutSeconds_) +
                                 " s (FLEX_COLLECTIVE_TIMEOUT_S)");
    return breakWith(what, std::string(call) + ": " + ncclText(result, comm_));
  }

  Status brokenStatus(std::string_view what) const {
    return Status(StatusCode::CommunicationError,
                  "rank " + std::to_string(rank_) + ": " + std::string(what) +
                      ": the NCCL communicator failed earlier: " +
                      brokenReason_);
  }

  /// Aborts the communicator (its kernels stop waiting) and fails.
  Status breakWith(std::string_view what, const std::string &reason) {
    std::string message = "rank " + std::to_string(rank_) + " of " +
                          std::to_string(size_) + ": " + std::string(what) +
                          ": " + reason + "; the NCCL communicator is aborted";
    if (!broken_) {
      broken_ = true;
      brokenReason_ = message;
      abortComm();
    }
    return Status(StatusCode::CommunicationError, message);
  }

  /// Aborts this communicator's whole family: the communicator it was
  /// split from (if any), that one's, and every communicator split from
  /// them. One stream holds collectives of several of them, and an abort
  /// waits for its own kernels, which may wait behind a hung kernel of
  /// another: aborted one at a time they can hang for good
  /// (NVIDIA/nccl#1013), so they are aborted in one NCCL group.
  void abortComm() {
    std::shared_ptr<NcclCommunicator> root;
    for (std::shared_ptr<NcclCommunicator> up = parent_.lock(); up;
         up = up->parent_.lock())
      root = up;
    if (root) {
      if (!root->broken_) {
        root->broken_ = true;
        root->brokenReason_ =
            "a communicator split from it failed: " + brokenReason_;
      }
      root->abortFamily();
    } else {
      abortFamily();
    }
  }

  /// Aborts this communicator and those split from it, in one group.
  void abortFamily() {
    std::vector<ncclComm_t> comms;
    takeForAbort(comms);
    if (comms.empty())
      return;
    cudaSetDevice(device_);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 22, 0)
    const bool grouped = comms.size() > 1;
#else
    const bool grouped = false; // grouped aborts came with NCCL 2.22
#endif
    if (grouped)
      ncclGroupStart();
    for (ncclComm_t comm : comms)
      ncclCommAbort(comm);
    if (grouped)
      ncclGroupEnd();
  }

  /// Marks the communicators split from this one broken and hands over
  /// their handles and this one's.
  void takeForAbort(std::vector<ncclComm_t> &comms) {
    for (const std::weak_ptr<NcclCommunicator> &weak : children_)
      if (std::shared_ptr<NcclCommunicator> child = weak.lock()) {
        if (!child->broken_) {
          child->broken_ = true;
          child->brokenReason_ =
              "the communicator it was split from was aborted: " +
              brokenReason_;
        }
        child->takeForAbort(comms);
      }
    children_.clear();
    if (comm_)
      comms.push_back(comm_);
    comm_ = nullptr;
  }

  ncclComm_t comm_;
  int rank_, size_, device_;
  double timeoutSeconds_;
  cudaStream_t stream_ = nullptr;
  int32_t *barrierFlag_ = nullptr;
  bool broken_ = false;
  std::string brokenReason_;
  /// All-to-all through the copy engines (NcclCommunicatorOptions::
  /// peerCopies); null: NCCL's send/receive.
  std::unique_ptr<PeerCopyExchange> peerCopies_;

public:
  void setPeerCopies(std::unique_ptr<PeerCopyExchange> exchange) {
    peerCopies_ = std::move(exchange);
  }

private:
  /// Communicators split from this one (aborted with it), and the one this
  /// one was split from.
  std::vector<std::weak_ptr<NcclCommunicator>> children_;
  std::weak_ptr<NcclCommunicator> parent_;
};

Status unavailableWithoutMpi() {
  return Status(StatusCode::Unavailable,
                "this Flex build has no MPI, so the NCCL communicator cannot "
                "start through MPI; start the ranks torchrun-style (RANK, "
                "WORLD_SIZE, MASTER_ADDR, MASTER_PORT) instead");
}

} // namespace

bool isNcclAvailable() { return true; }

Status createNcclUniqueId(NcclUniqueId &id) {
  static_assert(sizeof(ncclUniqueId) == sizeof(NcclUniqueId));
  ncclUniqueId unique;
  if (ncclResult_t r = ncclGetUniqueId(&unique); r != ncclSuccess)
    return Status(StatusCode::CommunicationError,
                  std::string("ncclGetUniqueId failed: ") +
                      ncclGetErrorString(r));
  std::memcpy(id.data(), &unique, id.size());
  return Status::ok();
}

Status createNcclCommunicator(std::shared_ptr<Communicator> &communicator,
                              const NcclUniqueId &id, int rank, int size,
                              const NcclCommunicatorOptions &options) {
  communicator.reset();
  double timeout = options.timeoutSeconds;
  if (timeout < 0)
    if (Status s = getCollectiveTimeout(timeout); !s)
      return s;
  if (size < 1 || rank < 0 || rank >= size)
    return Status(StatusCode::InvalidArgument,
                  "NCCL communicator: rank " + std::to_string(rank) + " of " +
                      std::to_string(size) + " is out of range");
  int device = options.device;
  if (device < 0) {
    if (Status s = cudaStatus(cudaGetDevice(&device), "cudaGetDevice"); !s)
      return Status(StatusCode::Unavailable,
                    "NCCL communicator: no usable GPU: " + s.message());
  }
  if (Status s = cudaStatus(cudaSetDevice(device),
                            "cudaSetDevice(" + std::to_string(device) + ")");
      !s)
    return Status(StatusCode::Unavailable,
                  "NCCL communicator: " + s.message());
  ncclUniqueId unique;
  std::memcpy(&unique, id.data(), id.size());
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0; // every wait is polled against the deadline
  ncclComm_t comm = nullptr;
  ncclResult_t result =
      ncclCommInitRankConfig(&comm, size, unique, rank, &config);
  if (comm && (result == ncclSuccess || result == ncclInProgress))
    result = pollComm(comm, result, deadlineAfter(timeout));
  if (result != ncclSuccess) {
    std::string why =
        result == ncclInProgress
            ? "the other ranks did not join within " + std::to_string(timeout) +
                  " s (FLEX_COLLECTIVE_TIMEOUT_S)"
            : ncclText(result, comm);
    if (comm)
      ncclCommAbort(comm);
    return Status(StatusCode::CommunicationError,
                  "NCCL communicator: rank " + std::to_string(rank) + " of " +
                      std::to_string(size) + " on GPU " +
                      std::to_string(device) +
                      ": initialization failed: " + why);
  }
  auto made =
      std::make_shared<NcclCommunicator>(comm, rank, size, device, timeout);
  if (options.peerCopies) {
    if (!options.hostAllGather)
      return Status(StatusCode::InvalidArgument,
                    "NCCL communicator: peer copies need a host all-gather "
                    "(NcclCommunicatorOptions::hostAllGather)");
    std::unique_ptr<PeerCopyExchange> exchange;
    if (Status s = PeerCopyExchange::create(rank, size, device,
                                            options.hostAllGather, exchange);
        !s)
      return s;
    made->setPeerCopies(std::move(exchange));
  }
  communicator = std::move(made);
  return Status::ok();
}

Status createNcclCommunicatorFromMpi(
    std::shared_ptr<Communicator> &communicator, const void *mpiComm,
    const NcclCommunicatorOptions &options) {
  communicator.reset();
#ifdef FLEX_HAVE_MPI
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    return Status(StatusCode::FailedPrecondition,
                  "the NCCL communicator starts through MPI, which is not "
                  "initialized (call MPI_Init first)");
  MPI_Comm comm = mpiComm ? *static_cast<const MPI_Comm *>(mpiComm)
                          : MPI_COMM_WORLD;
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  double timeout = options.timeoutSeconds;
  if (timeout < 0)
    if (Status s = getCollectiveTimeout(timeout); !s)
      return s;
  NcclUniqueId id{};
  // Rank 0 chooses the transport for every rank (ranks that disagreed
  // would wait for each other in different calls).
  bool peerCopies = options.peerCopies;
  Status made = Status::ok();
  if (rank == 0)
    made = createNcclUniqueId(id);
  // Rank 0 broadcasts the id, a flag whether it has one (every rank then
  // fails alike instead of waiting) and the transport.
  std::vector<char> message(id.size() + 2);
  std::memcpy(message.data(), id.data(), id.size());
  message[id.size()] = static_cast<char>(made ? 1 : 0);
  message[id.size() + 1] = static_cast<char>(peerCopies ? 1 : 0);
  MPI_Request request;
  if (MPI_Ibcast(message.data(), static_cast<int>(message.size()), MPI_BYTE, 0,
                 comm, &request) != MPI_SUCCESS)
    return Status(StatusCode::CommunicationError,
                  "NCCL communicator: MPI_Ibcast of the NCCL id failed");
  auto deadline = deadlineAfter(timeout);
  int done = 0, polls = 0;
  while (!done) {
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (done)
      break;
    if (Clock::now() >= deadline)
      return Status(StatusCode::CommunicationError,
                    "NCCL communicator: rank " + std::to_string(rank) +
                        ": the NCCL id from rank 0 did not arrive within " +
                        std::to_string(timeout) +
                        " s (FLEX_COLLECTIVE_TIMEOUT_S)");
    backOff(polls);
  }
  if (!made)
    return made;
  if (!message[id.size()])
    return Status(StatusCode::CommunicationError,
                  "NCCL communicator: rank 0 could not create the NCCL id "
                  "(see rank 0's error)");
  std::memcpy(id.data(), message.data(), id.size());
  NcclCommunicatorOptions withTimeout = options;
  withTimeout.timeoutSeconds = timeout;
  withTimeout.peerCopies = message[id.size() + 1] != 0;
  if (withTimeout.peerCopies && !withTimeout.hostAllGather) {
    // The copies' handshakes go over the same MPI ranks.
    MpiCommunicatorOptions hostOptions;
    hostOptions.comm = &comm;
    hostOptions.timeoutSeconds = timeout;
    std::shared_ptr<Communicator> host;
    if (Status s = createMpiCommunicator(host, hostOptions); !s)
      return s;
    withTimeout.peerCopies = true;
    withTimeout.hostAllGather = hostAllGatherOver(std::move(host));
  }
  return createNcclCommunicator(communicator, id, rank, size, withTimeout);
#else
  (void)mpiComm;
  (void)options;
  return unavailableWithoutMpi();
#endif
}

Status createNcclCommunicatorFromEnvironment(
    std::shared_ptr<Communicator> &communicator,
    const NcclCommunicatorOptions &options) {
  communicator.reset();
  RendezvousInfo info;
  if (Status s = readRendezvousEnvironment(info); !s)
    return s;
  double timeout = options.timeoutSeconds;
  if (timeout < 0)
    if (Status s = getCollectiveTimeout(timeout); !s)
      return s;
  std::unique_ptr<TcpRendezvous> rendezvous;
  if (Status s = TcpRendezvous::connect(info, rendezvous, timeout); !s)
    return s;
  // Block 0 of the gather is rank 0's id, a flag byte whether it made one
  // (so a failure there fails every rank at once) and rank 0's transport,
  // which every rank takes.
  const size_t idBytes = NcclUniqueId{}.size();
  std::vector<char> mine(idBytes + 2, 0);
  Status made = Status::ok();
  if (info.rank == 0) {
    NcclUniqueId id{};
    made = createNcclUniqueId(id);
    std::memcpy(mine.data(), id.data(), id.size());
    mine[idBytes] = made ? 1 : 0;
    mine[idBytes + 1] = options.peerCopies ? 1 : 0;
  }
  std::vector<char> all(mine.size() * info.size);
  if (Status s = rendezvous->allGather(mine.data(),
                                       static_cast<int64_t>(mine.size()),
                                       all.data(), "sharing the NCCL id");
      !s)
    return s;
  if (!made)
    return made;
  if (!all[idBytes])
    return Status(StatusCode::CommunicationError,
                  "NCCL communicator: rank 0 could not create the NCCL id "
                  "(see rank 0's error)");
  NcclUniqueId id;
  std::memcpy(id.data(), all.data(), id.size());
  NcclCommunicatorOptions withTimeout = options;
  withTimeout.timeoutSeconds = timeout;
  withTimeout.peerCopies = all[idBytes + 1] != 0;
  if (withTimeout.peerCopies && !withTimeout.hostAllGather) {
    // The copies' handshakes go over this rendezvous, kept open.
    std::shared_ptr<TcpRendezvous> host = std::move(rendezvous);
    withTimeout.peerCopies = true;
    withTimeout.hostAllGather = [host](const void *send, int64_t bytes,
                                       void *recv, std::string_view what) {
      return host->allGather(send, bytes, recv, std::string(what));
    };
  }
  return createNcclCommunicator(communicator, id, info.rank, info.size,
                                withTimeout);
}

} // namespace flex
