//===- MpiCommunicator.h - Collectives over MPI -----------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the MPI communicator (lib/Runtime/Comm/
// MpiCommunicator.cpp, built when CMake finds MPI: FLEX_HAVE_MPI) and the
// helpers a tool uses to start MPI. Without MPI the functions exist and
// return Unavailable, so callers need no #ifdef. The header does not include
// mpi.h: an MPI_Comm is passed by address.
//
// Collectives are non-blocking MPI calls polled against a deadline
// (FLEX_COLLECTIVE_TIMEOUT_S, default 300 s) on a duplicate of the given
// communicator whose errors return instead of aborting. A timeout or an MPI
// error fails the call with CommunicationError naming the collective and
// the ranks still pending; abort() (the executor calls it then) prints the
// message and calls MPI_Abort, since MPI cannot cancel the pending requests
// and a peer may be stuck in the same collective.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_MPICOMMUNICATOR_H
#define FLEX_RUNTIME_COMM_MPICOMMUNICATOR_H

#include "flex/Runtime/Comm/Communicator.h"

namespace flex {

struct MpiCommunicatorOptions {
  /// The address of an MPI_Comm to duplicate; null = MPI_COMM_WORLD.
  const void *comm = nullptr;
  /// Seconds every collective may wait; < 0 = FLEX_COLLECTIVE_TIMEOUT_S or
  /// its default.
  double timeoutSeconds = -1;
  /// abort() calls MPI_Abort (the default); false only marks the
  /// communicator broken (tests of the failure path).
  bool abortOnFailure = true;
};

/// Whether this build has the MPI communicator.
bool isMpiAvailable();

/// Whether the process was started by an MPI launcher (mpirun, mpiexec,
/// srun): OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK is set.
bool isLaunchedByMpi();

/// MPI_Init_thread (MPI_THREAD_FUNNELED) unless MPI is initialized already;
/// finalizeMpi() ends it if initMpi started it. Unavailable without MPI.
Status initMpi(int *argc, char ***argv);
void finalizeMpi();

/// A communicator over a duplicate of options.comm. MPI must be
/// initialized (FailedPrecondition otherwise); Unavailable without MPI.
Status createMpiCommunicator(std::shared_ptr<Communicator> &communicator,
                             const MpiCommunicatorOptions &options = {});

} // namespace flex

#endif // FLEX_RUNTIME_COMM_MPICOMMUNICATOR_H
