//===- Communicators.cpp - The communicators of the C API -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the many-rank part of include/flex-c/Flex.h: MPI and
// NCCL communicators, each made with the caller's runtime options (or the
// defaults) and the environment's overrides, communicators over the
// caller's own collectives, and setting an executable's.
//
//===----------------------------------------------------------------------===//

#include "CAPISupport.h"

#include "flex/Runtime/Comm/CallbackCommunicator.h"
#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Comm/NcclCommunicator.h"

#include <cstring>

using namespace flex;
using namespace flex::capi;

namespace {

/// The options of `handle` (null = the defaults) with the environment's
/// overrides on top: what an executable or communicator is created with.
FlexStatus resolveOptions(FlexOptions handle, const char *function,
                          RuntimeOptions &options) {
  if (handle)
    if (FlexStatus s = checkHandle(handle, function, "options"))
      return s;
  Status status = RuntimeOptions::fromEnvironment(
      handle ? handle->options : RuntimeOptions(), options);
  if (!status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  return FLEX_STATUS_OK;
}

/// Wraps a communicator made by `create(comm, runtime)` in a live handle;
/// `runtime` is `options` (null = the defaults) with the environment's
/// overrides.
template <typename Create>
FlexStatus makeCommunicator(const char *function, FlexOptions options,
                            FlexCommunicator *communicator, Create &&create) {
  if (FlexStatus s = checkOut(communicator, function, "communicator"))
    return s;
  *communicator = nullptr;
  RuntimeOptions runtime;
  if (FlexStatus s = resolveOptions(options, function, runtime))
    return s;
  try {
    std::shared_ptr<Communicator> comm;
    if (Status status = create(comm, runtime); !status)
      return fail(static_cast<FlexStatus>(status.code()),
                  std::string(function) + ": " + status.message());
    auto *handle = new FlexCommunicatorImpl{std::move(comm)};
    registry().add(handle);
    *communicator = handle;
    return FLEX_STATUS_OK;
  } catch (const std::exception &error) {
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": internal error: " + error.what());
  }
}

/// The communicator creations of the C API, with or without options.
FlexStatus createMpi(const void *mpiComm, FlexOptions options,
                     FlexCommunicator *communicator, const char *function) {
  return makeCommunicator(
      function, options, communicator,
      [&](std::shared_ptr<Communicator> &comm, const RuntimeOptions &runtime) {
        MpiCommunicatorOptions mpiOptions;
        mpiOptions.comm = mpiComm;
        mpiOptions.timeoutSeconds = runtime.collectiveTimeoutSeconds;
        return createMpiCommunicator(comm, mpiOptions);
      });
}

FlexStatus createNcclFromMpi(const void *mpiComm, int32_t device,
                             FlexOptions options,
                             FlexCommunicator *communicator,
                             const char *function) {
  return makeCommunicator(
      function, options, communicator,
      [&](std::shared_ptr<Communicator> &comm, const RuntimeOptions &runtime) {
        return createNcclCommunicatorFromMpi(comm, mpiComm,
                                             ncclOptionsFrom(runtime, device));
      });
}

FlexStatus createNcclFromEnv(int32_t device, FlexOptions options,
                             FlexCommunicator *communicator,
                             const char *function) {
  return makeCommunicator(
      function, options, communicator,
      [&](std::shared_ptr<Communicator> &comm, const RuntimeOptions &runtime) {
        return createNcclCommunicatorFromEnvironment(
            comm, ncclOptionsFrom(runtime, device));
      });
}

FlexStatus createNccl(const char id[128], int32_t rank, int32_t size,
                      int32_t device, FlexOptions options,
                      FlexCommunicator *communicator, const char *function) {
  if (!id) {
    if (communicator)
      *communicator = nullptr;
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": id is null");
  }
  return makeCommunicator(
      function, options, communicator,
      [&](std::shared_ptr<Communicator> &comm, const RuntimeOptions &runtime) {
        NcclUniqueId unique;
        std::memcpy(unique.data(), id, unique.size());
        // No host channel for the copies' handshakes: NCCL's kernels.
        NcclCommunicatorOptions nccl = ncclOptionsFrom(runtime, device);
        nccl.peerCopies = false;
        return createNcclCommunicator(comm, unique, rank, size, nccl);
      });
}

// reduce_scatter_sum passes a flex::DType as the C API's FlexDType.
static_assert(static_cast<int>(DType::F32) == FLEX_DTYPE_F32 &&
                  static_cast<int>(DType::BF16) == FLEX_DTYPE_BF16 &&
                  static_cast<int>(DType::F16) == FLEX_DTYPE_F16,
              "flex::DType and FlexDType must agree");

/// The caller's C functions as HostCollectives: a nonzero result is a
/// failure with the function's message (or a generic one).
HostCollectives collectivesFrom(const FlexCollectiveCallbacks &c) {
  // Each call's message buffer; the failure's text when a function fails.
  auto check = [](const char *function, auto &&call) -> Status {
    char message[1024] = {0};
    const int32_t result = call(message, static_cast<int64_t>(sizeof message));
    if (result == 0)
      return Status::ok();
    message[sizeof message - 1] = '\0';
    return Status(StatusCode::CommunicationError,
                  std::string(function) + " returned " +
                      std::to_string(result) +
                      (message[0] ? std::string(": ") + message : ""));
  };
  HostCollectives h;
  h.allToAll = [c, check](const void *send, const int64_t *sendOffsets,
                          const int64_t *sendBytes, void *recv,
                          const int64_t *recvOffsets,
                          const int64_t *recvBytes) {
    return check("all_to_all", [&](char *m, int64_t n) {
      return c.all_to_all(c.user, send, sendOffsets, sendBytes, recv,
                          recvOffsets, recvBytes, m, n);
    });
  };
  h.allGather = [c, check](const void *send, int64_t bytes, void *recv) {
    return check("all_gather", [&](char *m, int64_t n) {
      return c.all_gather(c.user, send, bytes, recv, m, n);
    });
  };
  h.reduceScatterSum = [c, check](const void *send, void *recv, int64_t count,
                                  DType type) {
    return check("reduce_scatter_sum", [&](char *m, int64_t n) {
      return c.reduce_scatter_sum(c.user, send, recv, count,
                                  static_cast<int32_t>(type), m, n);
    });
  };
  h.allReduceMaxInt32 = [c, check](int32_t *values, int64_t count) {
    return check("all_reduce_max_i32", [&](char *m, int64_t n) {
      return c.all_reduce_max_i32(c.user, values, count, m, n);
    });
  };
  h.barrier = [c, check]() {
    return check("barrier",
                 [&](char *m, int64_t n) { return c.barrier(c.user, m, n); });
  };
  return h;
}

/// Calls the caller's destroy(user) once the last owner of the
/// communicator lets go.
struct CallbackOwner {
  explicit CallbackOwner(const FlexCollectiveCallbacks &callbacks)
      : callbacks(callbacks) {}
  CallbackOwner(const CallbackOwner &) = delete;
  CallbackOwner &operator=(const CallbackOwner &) = delete;
  FlexCollectiveCallbacks callbacks;
  ~CallbackOwner() {
    if (callbacks.destroy)
      callbacks.destroy(callbacks.user);
  }
};

} // namespace

extern "C" {

FlexStatus
flexCommunicatorCreateCallbacks(const FlexCollectiveCallbacks *callbacks,
                                int32_t rank, int32_t size, const char *name,
                                FlexCommunicator *communicator) {
  const char *function = "flexCommunicatorCreateCallbacks";
  if (!callbacks || callbacks->struct_size < sizeof(FlexCollectiveCallbacks)) {
    if (communicator)
      *communicator = nullptr;
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) +
                    (callbacks
                         ? ": callbacks->struct_size is " +
                               std::to_string(callbacks->struct_size) +
                               ", expected at least " +
                               std::to_string(sizeof(FlexCollectiveCallbacks))
                         : std::string(": callbacks is null")));
  }
  const FlexCollectiveCallbacks c = *callbacks;
  const char *missing = !c.all_to_all           ? "all_to_all"
                        : !c.all_gather         ? "all_gather"
                        : !c.reduce_scatter_sum ? "reduce_scatter_sum"
                        : !c.all_reduce_max_i32 ? "all_reduce_max_i32"
                        : !c.barrier            ? "barrier"
                                                : nullptr;
  if (missing) {
    if (communicator)
      *communicator = nullptr;
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": callbacks->" + missing + " is null");
  }
  return makeCommunicator(
      function, nullptr, communicator,
      [&](std::shared_ptr<Communicator> &comm, const RuntimeOptions &) {
        std::shared_ptr<Communicator> inner;
        if (Status s = createCallbackCommunicator(
                inner, rank, size, collectivesFrom(c), name ? name : "");
            !s)
          return s;
        // The communicator owns the callbacks: destroy(user) runs when it
        // and every executable holding it are gone.
        auto owner = std::make_shared<CallbackOwner>(c);
        Communicator *raw = inner.get();
        comm = std::shared_ptr<Communicator>(
            raw, [inner = std::move(inner),
                  owner = std::move(owner)](Communicator *) mutable {
              inner.reset(); // the communicator first, then the callbacks
              owner.reset();
            });
        return Status::ok();
      });
}

int32_t flexHasMpi(void) { return isMpiAvailable() ? 1 : 0; }

FlexStatus
flexCommunicatorCreateMpiWithOptions(const void *mpiComm, FlexOptions options,
                                     FlexCommunicator *communicator) {
  return createMpi(mpiComm, options, communicator,
                   "flexCommunicatorCreateMpiWithOptions");
}

FlexStatus flexCommunicatorCreateMpi(const void *mpiComm,
                                     FlexCommunicator *communicator) {
  return createMpi(mpiComm, nullptr, communicator, "flexCommunicatorCreateMpi");
}

int32_t flexHasNccl(void) { return isNcclAvailable() ? 1 : 0; }

FlexStatus flexCommunicatorCreateNcclFromMpiWithOptions(
    const void *mpiComm, int32_t device, FlexOptions options,
    FlexCommunicator *communicator) {
  return createNcclFromMpi(mpiComm, device, options, communicator,
                           "flexCommunicatorCreateNcclFromMpiWithOptions");
}

FlexStatus flexCommunicatorCreateNcclFromMpi(const void *mpiComm,
                                             int32_t device,
                                             FlexCommunicator *communicator) {
  return createNcclFromMpi(mpiComm, device, nullptr, communicator,
                           "flexCommunicatorCreateNcclFromMpi");
}

FlexStatus flexCommunicatorCreateNcclFromEnvWithOptions(
    int32_t device, FlexOptions options, FlexCommunicator *communicator) {
  return createNcclFromEnv(device, options, communicator,
                           "flexCommunicatorCreateNcclFromEnvWithOptions");
}

FlexStatus flexCommunicatorCreateNcclFromEnv(int32_t device,
                                             FlexCommunicator *communicator) {
  return createNcclFromEnv(device, nullptr, communicator,
                           "flexCommunicatorCreateNcclFromEnv");
}

FlexStatus flexNcclGetUniqueId(char id[128]) {
  if (!id)
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                "flexNcclGetUniqueId: id is null");
  NcclUniqueId unique;
  if (Status status = createNcclUniqueId(unique); !status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string("flexNcclGetUniqueId: ") + status.message());
  std::memcpy(id, unique.data(), unique.size());
  return FLEX_STATUS_OK;
}

FlexStatus flexCommunicatorCreateNcclWithOptions(
    const char id[128], int32_t rank, int32_t size, int32_t device,
    FlexOptions options, FlexCommunicator *communicator) {
  return createNccl(id, rank, size, device, options, communicator,
                    "flexCommunicatorCreateNcclWithOptions");
}

FlexStatus flexCommunicatorCreateNccl(const char id[128], int32_t rank,
                                      int32_t size, int32_t device,
                                      FlexCommunicator *communicator) {
  return createNccl(id, rank, size, device, nullptr, communicator,
                    "flexCommunicatorCreateNccl");
}

FlexStatus flexCommunicatorDestroy(FlexCommunicator communicator) {
  return destroyHandle(communicator, "flexCommunicatorDestroy", "communicator");
}

FlexStatus flexCommunicatorGetRank(FlexCommunicator communicator, int32_t *rank,
                                   int32_t *size) {
  if (!communicator || !registry().contains(communicator))
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                "flexCommunicatorGetRank: the communicator is null or not a "
                "live handle");
  if (rank)
    *rank = communicator->communicator->rank();
  if (size)
    *size = communicator->communicator->size();
  return FLEX_STATUS_OK;
}

FlexStatus flexExecutableGetWorldSize(FlexExecutable exe, int32_t *worldSize) {
  const char *function = "flexExecutableGetWorldSize";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(worldSize, function, "world_size"))
      return s;
    *worldSize = static_cast<int32_t>(exe->plan->worldSize);
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableSetCommunicator(FlexExecutable exe,
                                         FlexCommunicator communicator) {
  const char *function = "flexExecutableSetCommunicator";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (communicator && !registry().contains(communicator))
      return fail(FLEX_STATUS_INVALID_ARGUMENT,
                  std::string(function) +
                      ": the communicator is not a live handle",
                  exe);
    Status status = exe->executor->setCommunicator(
        communicator ? communicator->communicator : nullptr);
    if (!status)
      return fail(static_cast<FlexStatus>(status.code()),
                  std::string(function) + ": " + status.message(), exe);
    return FLEX_STATUS_OK;
  });
}

} // extern "C"
