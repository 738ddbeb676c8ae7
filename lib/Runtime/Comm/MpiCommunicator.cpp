//===- MpiCommunicator.cpp - Collectives over MPI -------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the MPI communicator: non-blocking MPI calls on a
// duplicate communicator (errors return, MPI_ERRORS_RETURN), polled with
// MPI_Testall until done or until the deadline of FLEX_COLLECTIVE_TIMEOUT_S.
// Byte blocks of any size go as point-to-point messages of at most 1 GiB
// (MPI counts are int); reductions run in fp32 (bf16/f16 are widened).
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Core/Half.h"

// The C API only: the C++ bindings of OpenMPI/MPICH need their own library.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace flex {
namespace {

using Clock = std::chrono::steady_clock;

/// Largest message of one MPI call: counts are int.
constexpr int64_t kMaxMessageBytes = int64_t{1} << 30;
/// Elements per reduce_scatter call (fp32 staging of 256 MiB per rank).
constexpr int64_t kMaxReduceElements = int64_t{1} << 26;
/// The tag of Flex's point-to-point messages on its own communicator.
constexpr int kTag = 0x464c;

bool startedMpiHere = false;

std::string mpiErrorText(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
    return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

class MpiCommunicator final : public Communicator {
public:
  MpiCommunicator(MPI_Comm comm, double timeoutSeconds, bool abortOnFailure)
      : comm_(comm), timeoutSeconds_(timeoutSeconds),
        abortOnFailure_(abortOnFailure) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && !broken_)
      MPI_Comm_free(&comm_);
  }

  std::string_view name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    if (Status status = checkUsable(what); !status)
      return status;
    Requests requests;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_)
        continue;
      if (Status status =
              postMessages(requests, /*isSend=*/false,
                           static_cast<char *>(recv) + recvOffsets[p],
                           recvBytes[p], p, what);
          !status)
        return status;
    }
    for (int p = 0; p < size_; ++p) {
      if (p == rank_)
        continue;
      if (Status status =
              postMessages(requests, /*isSend=*/true,
                           const_cast<char *>(static_cast<const char *>(send)) +
                               sendOffsets[p],
                           sendBytes[p], p, what);
          !status)
        return status;
    }
    if (sendBytes[rank_] != recvBytes[rank_])
      return fail(what, "this rank sends " + std::to_string(sendBytes[rank_]) +
                            " bytes to itself but expects " +
                            std::to_string(recvBytes[rank_]));
    std::memcpy(static_cast<char *>(recv) + recvOffsets[rank_],
                static_cast<const char *>(send) + sendOffsets[rank_],
                static_cast<size_t>(sendBytes[rank_]));
    return wait(requests, what);
  }

  Status allReduceMaxInt32(int32_t *values, int64_t count,
                           std::string_view what) override {
    if (Status status = checkUsable(what); !status)
      return status;
    if (count > INT_MAX)
      return fail(what, std::to_string(count) +
                            " values exceed one MPI call's int count");
    Requests requests;
    requests.add(-1);
    int code =
        MPI_Iallreduce(MPI_IN_PLACE, values, static_cast<int>(count),
                       MPI_INT32_T, MPI_MAX, comm_, &requests.handles.back());
    if (code != MPI_SUCCESS)
      return fail(what, "MPI_Iallreduce: " + mpiErrorText(code));
    return wait(requests, what);
  }

  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view what) override {
    if (Status status = checkUsable(what); !status)
      return status;
    if (bytes <= kMaxMessageBytes) {
      Requests requests;
      requests.add(-1);
      int code = MPI_Iallgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                static_cast<int>(bytes), MPI_BYTE, comm_,
                                &requests.handles.back());
      if (code != MPI_SUCCESS)
        return fail(what, "MPI_Iallgather: " + mpiErrorText(code));
      return wait(requests, what);
    }
    // Past int counts: every rank sends its block to every other.
    std::vector<int64_t> sendOffsets(size_, 0), sizes(size_, bytes),
        recvOffsets(size_);
    for (int p = 0; p < size_; ++p)
      recvOffsets[p] = p * bytes;
    return allToAll(send, sendOffsets.data(), sizes.data(), recv,
                    recvOffsets.data(), sizes.data(), what);
  }

  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    if (Status status = checkUsable(what); !status)
      return status;
    if (type == DType::I32)
      return fail(what, "reduce_scatter sums f32, bf16 or f16, not i32",
                  StatusCode::InvalidArgument);
    const size_t elementBytes = dtypeSize(type);
    if (type == DType::F32 && count <= kMaxReduceElements)
      return reduceScatterFloat(static_cast<const float *>(send),
                                static_cast<float *>(recv), count, what);
    // Pieces of the rank blocks, widened to fp32: staging [W, piece].
    std::vector<float> sendF, recvF;
    for (int64_t first = 0; first < count; first += kMaxReduceElements) {
      int64_t piece = std::min(kMaxReduceElements, count - first);
      sendF.resize(static_cast<size_t>(piece * size_));
      recvF.resize(static_cast<size_t>(piece));
      for (int p = 0; p < size_; ++p)
        for (int64_t i = 0; i < piece; ++i)
          sendF[p * piece + i] =
              load(send, type, elementBytes, p * count + first + i);
      if (Status status =
              reduceScatterFloat(sendF.data(), recvF.data(), piece, what);
          !status)
        return status;
      for (int64_t i = 0; i < piece; ++i)
        store(recv, type, first + i, recvF[i]);
    }
    return Status::ok();
  }

  Status barrier(std::string_view what) override {
    if (Status status = checkUsable(what); !status)
      return status;
    Requests requests;
    requests.add(-1);
    int code = MPI_Ibarrier(comm_, &requests.handles.back());
    if (code != MPI_SUCCESS)
      return fail(what, "MPI_Ibarrier: " + mpiErrorText(code));
    return wait(requests, what);
  }

  Status split(int color, int key, std::shared_ptr<Communicator> &group,
               std::string_view what) override {
    group.reset();
    if (Status status = checkSplitColor(color, what); !status)
      return status;
    // MPI_Comm_split blocks: meet in a bounded barrier first, so a missing
    // rank is an error and not a hang.
    if (Status status = barrier(what); !status)
      return status;
    MPI_Comm comm;
    int code = MPI_Comm_split(comm_, color, key, &comm);
    if (code != MPI_SUCCESS)
      return fail(what, "MPI_Comm_split: " + mpiErrorText(code));
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    group = std::make_shared<MpiCommunicator>(comm, timeoutSeconds_,
                                              abortOnFailure_);
    return Status::ok();
  }

  void abort(const Status &status) override {
    broken_ = true;
    if (brokenReason_.empty())
      brokenReason_ = status.message();
    if (!abortOnFailure_)
      return;
    // Pending requests cannot be cancelled and a peer may wait in the same
    // collective: end the job rather than hang.
    std::fprintf(stderr,
                 "flex: rank %d of %d: %s\nflex: rank %d: calling MPI_Abort "
                 "(a failed collective leaves MPI unusable)\n",
                 rank_, size_, status.message().c_str(), rank_);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }

private:
  /// Requests of one collective and the peer of each (-1: all ranks).
  struct Requests {
    std::vector<MPI_Request> handles;
    std::vector<int> peers;
    void add(int peer) {
      handles.push_back(MPI_REQUEST_NULL);
      peers.push_back(peer);
    }
  };

  static float load(const void *data, DType type, size_t, int64_t i) {
    switch (type) {
    case DType::BF16:
      return bf16ToFloat(static_cast<const uint16_t *>(data)[i]);
    case DType::F16:
      return f16ToFloat(static_cast<const uint16_t *>(data)[i]);
    default:
      return static_cast<const float *>(data)[i];
    }
  }
  static void store(void *data, DType type, int64_t i, float value) {
    switch (type) {
    case DType::BF16:
      static_cast<uint16_t *>(data)[i] = floatToBf16(value);
      return;
    case DType::F16:
      static_cast<uint16_t *>(data)[i] = floatToF16(value);
      return;
    default:
      static_cast<float *>(data)[i] = value;
      return;
    }
  }

  Status reduceScatterFloat(const float *send, float *recv, int64_t count,
                            std::string_view what) {
    Requests requests;
    requests.add(-1);
    int code = MPI_Ireduce_scatter_block(send, recv, static_cast<int>(count),
                                         MPI_FLOAT, MPI_SUM, comm_,
                                         &requests.handles.back());
    if (code != MPI_SUCCESS)
      return fail(what, "MPI_Ireduce_scatter_block: " + mpiErrorText(code));
    return wait(requests, what);
  }

  /// Posts the messages of one block, cut at kMaxMessageBytes; MPI keeps
  /// their order between two ranks on one tag.
  Status postMessages(Requests &requests, bool isSend, char *data,
                      int64_t bytes, int peer, std::string_view what) {
    // An empty block sends nothing (both sides know it is empty).
    for (int64_t done = 0; done < bytes;) {
      int piece = static_cast<int>(std::min(kMaxMessageBytes, bytes - done));
      requests.add(peer);
      int code = isSend ? MPI_Isend(data + done, piece, MPI_BYTE, peer, kTag,
                                    comm_, &requests.handles.back())
                        : MPI_Irecv(data + done, piece, MPI_BYTE, peer, kTag,
                                    comm_, &requests.handles.back());
      if (code != MPI_SUCCESS)
        return fail(what, std::string(isSend ? "MPI_Isend to"
                                             : "MPI_Irecv "
                                               "from") +
                              " rank " + std::to_string(peer) + ": " +
                              mpiErrorText(code));
      done += piece;
    }
    return Status::ok();
  }

  /// Polls until every request completes, an error, or the deadline.
  Status wait(Requests &requests, std::string_view what) {
    auto start = Clock::now();
    auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(timeoutSeconds_));
    int count = static_cast<int>(requests.handles.size());
    for (int64_t polls = 0;; ++polls) {
      int done = 0;
      int code = MPI_Testall(count, requests.handles.data(), &done,
                             MPI_STATUSES_IGNORE);
      if (code != MPI_SUCCESS)
        return fail(what, "MPI_Testall: " + mpiErrorText(code));
      if (done)
        return Status::ok();
      if (Clock::now() >= deadline)
        break;
      // Spin briefly (short collectives), then sleep a little so that
      // oversubscribed ranks leave the cores to their peers.
      if (polls > 64)
        std::this_thread::sleep_for(
            std::chrono::microseconds(polls > 4096 ? 1000 : 20));
    }
    std::string pending;
    bool everyone = false;
    for (int i = 0; i < count; ++i) {
      int flag = 0;
      if (requests.handles[i] != MPI_REQUEST_NULL)
        MPI_Test(&requests.handles[i], &flag, MPI_STATUS_IGNORE);
      else
        flag = 1;
      if (flag)
        continue;
      if (requests.peers[i] < 0) {
        everyone = true;
        continue;
      }
      std::string peer = std::to_string(requests.peers[i]);
      if (pending.find(" " + peer + ",") == std::string::npos)
        pending += " " + peer + ",";
    }
    if (!pending.empty())
      pending = "rank(s)" + pending.substr(0, pending.size() - 1);
    else if (everyone)
      pending = "the other ranks";
    return fail(what, "timed out after " + std::to_string(timeoutSeconds_) +
                          " s (FLEX_COLLECTIVE_TIMEOUT_S) waiting for " +
                          pending);
  }

  Status checkUsable(std::string_view what) const {
    if (!broken_)
      return Status::ok();
    return Status(StatusCode::CommunicationError,
                  "rank " + std::to_string(rank_) + ": " + std::string(what) +
                      ": the MPI communicator failed earlier (" +
                      brokenReason_ + ")");
  }

  Status fail(std::string_view what, const std::string &message,
              StatusCode code = StatusCode::CommunicationError) {
    std::string text = "rank " + std::to_string(rank_) + ": " +
                       std::string(what) + ": " + message;
    if (code == StatusCode::CommunicationError) {
      broken_ = true;
      brokenReason_ = text;
    }
    return Status(code, text);
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  double timeoutSeconds_;
  bool abortOnFailure_;
  bool broken_ = false;
  std::string brokenReason_;
};

} // namespace

bool isMpiAvailable() { return true; }

bool isLaunchedByMpi() {
  for (const char *name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (const char *value = std::getenv(name); value && *value)
      return true;
  return false;
}

Status initMpi(int *argc, char ***argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized)
    return Status::ok();
  int provided = 0;
  int code = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (code != MPI_SUCCESS)
    return Status(StatusCode::CommunicationError,
                  "MPI_Init_thread failed: " + mpiErrorText(code));
  startedMpiHere = true;
  return Status::ok();
}

void finalizeMpi() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (startedMpiHere && !finalized)
    MPI_Finalize();
  startedMpiHere = false;
}

Status createMpiCommunicator(std::shared_ptr<Communicator> &communicator,
                             const MpiCommunicatorOptions &options) {
  communicator.reset();
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    return Status(StatusCode::FailedPrecondition,
                  std::string("the MPI communicator needs MPI to be ") +
                      (finalized ? "running; it was finalized already"
                                 : "initialized first (MPI_Init, or "
                                   "flex::initMpi)"));
  double timeout = options.timeoutSeconds;
  if (timeout < 0)
    if (Status status = getCollectiveTimeout(timeout); !status)
      return status;
  MPI_Comm base = options.comm ? *static_cast<const MPI_Comm *>(options.comm)
                               : MPI_COMM_WORLD;
  MPI_Comm comm;
  int code = MPI_Comm_dup(base, &comm);
  if (code != MPI_SUCCESS)
    return Status(StatusCode::CommunicationError,
                  "MPI_Comm_dup failed: " + mpiErrorText(code));
  // Errors come back as codes, so the call can name the collective.
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  communicator =
      std::make_shared<MpiCommunicator>(comm, timeout, options.abortOnFailure);
  return Status::ok();
}

} // namespace flex
