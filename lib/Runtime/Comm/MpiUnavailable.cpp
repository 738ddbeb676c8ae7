//===- MpiUnavailable.cpp - The MPI entry points of a build without MPI ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements MpiCommunicator.h when CMake found no MPI: every
// entry point says so, so callers need no #ifdef.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/MpiCommunicator.h"

#include <cstdlib>

namespace flex {
namespace {
Status unavailable() {
  return Status(StatusCode::Unavailable,
                "this Flex build has no MPI communicator (CMake found no "
                "MPI; install libopenmpi-dev or another MPI and reconfigure)");
}
} // namespace

bool isMpiAvailable() { return false; }

bool isLaunchedByMpi() {
  for (const char *name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (const char *value = std::getenv(name); value && *value)
      return true;
  return false;
}

Status initMpi(int *, char ***) { return unavailable(); }

void finalizeMpi() {}

Status createMpiCommunicator(std::shared_ptr<Communicator> &communicator,
                             const MpiCommunicatorOptions &) {
  communicator.reset();
  return unavailable();
}

} // namespace flex
