//===- Communicators.cpp - The communicators of the C API -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the many-rank part of include/flex-c/Flex.h: MPI and
// NCCL communicators, each made with the caller's runtime options (or the
// defaults) and the environment's overrides, and setting an executable's.
//
//===----------------------------------------------------------------------===//

#include "CAPISupport.h"

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

} // namespace

extern "C" {

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
