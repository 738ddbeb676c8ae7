//===- CallbackCommunicator.cpp - Collectives a host framework provides ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the callback communicator (CallbackCommunicator.h):
// argument checks, then the embedder's function; a failure names the
// collective and breaks the communicator.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/CallbackCommunicator.h"

#include <exception>

namespace flex {

namespace {

class CallbackCommunicator final : public Communicator {
public:
  CallbackCommunicator(int rank, int size, HostCollectives collectives,
                       std::string name)
      : rank_(rank), size_(size), collectives_(std::move(collectives)),
        name_(std::move(name)) {}

  std::string_view name() const override { return name_; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    for (int p = 0; p < size_; ++p)
      if (sendOffsets[p] < 0 || sendBytes[p] < 0 || recvOffsets[p] < 0 ||
          recvBytes[p] < 0)
        return Status(StatusCode::InvalidArgument,
                      std::string(what) + ": negative offset or byte count "
                                          "for peer " +
                          std::to_string(p));
    return call(what, [&] {
      return collectives_.allToAll(send, sendOffsets, sendBytes, recv,
                                   recvOffsets, recvBytes);
    });
  }

  Status allReduceMaxInt32(int32_t *values, int64_t count,
                           std::string_view what) override {
    return call(what,
                [&] { return collectives_.allReduceMaxInt32(values, count); });
  }

  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view what) override {
    return call(what,
                [&] { return collectives_.allGather(send, bytes, recv); });
  }

  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    if (type != DType::F32 && type != DType::BF16 && type != DType::F16)
      return Status(StatusCode::InvalidArgument,
                    std::string(what) + ": reduce_scatter of " +
                        std::string(toString(type)));
    return call(what, [&] {
      return collectives_.reduceScatterSum(send, recv, count, type);
    });
  }

  Status barrier(std::string_view what) override {
    return call(what, [&] { return collectives_.barrier(); });
  }

  Status split(int color, int, std::shared_ptr<Communicator> &,
               std::string_view what) override {
    if (Status s = checkSplitColor(color, what); !s)
      return s;
    return Status(StatusCode::Unavailable,
                  std::string(what) + ": communicator '" + name_ +
                      "' (collectives from callbacks) cannot split into "
                      "groups; grouped collectives (experts sharded over "
                      "ranks, 2DH exchanges) need the MPI or NCCL "
                      "communicator");
  }

  void abort(const Status &status) override { breakWith(status.message()); }

private:
  /// Runs one collective: at once a failure if broken; a failure (or an
  /// exception) breaks the communicator and names `what`.
  template <typename Call> Status call(std::string_view what, Call &&run) {
    if (!brokenReason_.empty())
      return Status(StatusCode::CommunicationError,
                    std::string(what) + ": communicator '" + name_ +
                        "' failed earlier: " + brokenReason_);
    Status status;
    try {
      status = run();
    } catch (const std::exception &error) {
      status = Status(StatusCode::CommunicationError, error.what());
    } catch (...) {
      status = Status(StatusCode::CommunicationError,
                      "the function threw a non-standard exception");
    }
    if (status)
      return status;
    std::string message = std::string(what) + " on rank " +
                          std::to_string(rank_) + " of " +
                          std::to_string(size_) + " (communicator '" + name_ +
                          "'): " + status.message();
    breakWith(message);
    return Status(StatusCode::CommunicationError, std::move(message));
  }

  void breakWith(const std::string &reason) {
    if (brokenReason_.empty())
      brokenReason_ = reason.empty() ? "aborted" : reason;
  }

  int rank_, size_;
  HostCollectives collectives_;
  std::string name_;
  std::string brokenReason_; ///< empty while usable
};

} // namespace

Status createCallbackCommunicator(std::shared_ptr<Communicator> &communicator,
                                  int rank, int size,
                                  HostCollectives collectives,
                                  std::string name) {
  communicator.reset();
  if (size < 1 || rank < 0 || rank >= size)
    return Status(StatusCode::InvalidArgument,
                  "callback communicator: rank " + std::to_string(rank) +
                      " of " + std::to_string(size) +
                      " (needs 0 <= rank < size)");
  const char *missing = !collectives.allToAll            ? "all_to_all"
                        : !collectives.allGather         ? "all_gather"
                        : !collectives.reduceScatterSum  ? "reduce_scatter_sum"
                        : !collectives.allReduceMaxInt32 ? "all_reduce_max_i32"
                        : !collectives.barrier           ? "barrier"
                                                         : nullptr;
  if (missing)
    return Status(StatusCode::InvalidArgument,
                  std::string("callback communicator: no ") + missing +
                      " function");
  communicator = std::make_shared<CallbackCommunicator>(
      rank, size, std::move(collectives),
      name.empty() ? "callbacks" : std::move(name));
  return Status::ok();
}

} // namespace flex
