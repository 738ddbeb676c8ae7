//===- NcclUnavailable.cpp - The NCCL entry points of a build without it --===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements NcclCommunicator.h when the build has no NCCL
// communicator (no CUDA backend, or CMake found no NCCL >= 2.14): every
// entry point says so, so callers need no #ifdef.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/NcclCommunicator.h"

namespace flex {
namespace {
Status unavailable() {
  return Status(StatusCode::Unavailable,
                "this Flex build has no NCCL communicator (it needs the CUDA "
                "backend and NCCL >= 2.14: install NCCL, e.g. libnccl-dev, "
                "and reconfigure with nvcc found)");
}
} // namespace

bool isNcclAvailable() { return false; }

Status createNcclUniqueId(NcclUniqueId &id) {
  id.fill(0);
  return unavailable();
}

Status createNcclCommunicator(std::shared_ptr<Communicator> &communicator,
                              const NcclUniqueId &, int, int,
                              const NcclCommunicatorOptions &) {
  communicator.reset();
  return unavailable();
}

Status createNcclCommunicatorFromMpi(
    std::shared_ptr<Communicator> &communicator, const void *,
    const NcclCommunicatorOptions &) {
  communicator.reset();
  return unavailable();
}

Status createNcclCommunicatorFromEnvironment(
    std::shared_ptr<Communicator> &communicator,
    const NcclCommunicatorOptions &) {
  communicator.reset();
  return unavailable();
}

} // namespace flex
