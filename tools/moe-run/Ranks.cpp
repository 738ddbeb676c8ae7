//===- Ranks.cpp - moe-run's ranks and its exits --------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements this process's place among the ranks (an MPI launch,
// a torchrun-style launch, or one rank), the reductions over ranks that the
// times and --check need, and moe-run's fatal exits.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Runtime/Comm/MpiCommunicator.h"

#ifdef FLEX_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>

using namespace flex;
using namespace flex::moerun;
namespace fs = std::filesystem;

Ranks flex::moerun::ranks;

void Ranks::maxInPlace(std::vector<double> &values) const {
  if (tcp && size > 1) {
    std::vector<double> all = tcpGather(values);
    for (int r = 0; r < size; ++r)
      for (size_t i = 0; i < values.size(); ++i)
        values[i] = std::max(values[i], all[r * values.size() + i]);
    return;
  }
#ifdef FLEX_HAVE_MPI
  if (mpi && size > 1)
    MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()),
                  MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
#endif
  (void)values;
}

void Ranks::sumInPlace(std::vector<double> &values) const {
  if (tcp && size > 1) {
    std::vector<double> all = tcpGather(values);
    for (size_t i = 0; i < values.size(); ++i) {
      double sum = 0; // in rank order, as MPI_SUM on one host
      for (int r = 0; r < size; ++r)
        sum += all[r * values.size() + i];
      values[i] = sum;
    }
    return;
  }
#ifdef FLEX_HAVE_MPI
  if (mpi && size > 1)
    MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()),
                  MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
#endif
  (void)values;
}

std::vector<double> Ranks::gather(const std::vector<double> &values) const {
  if (tcp && size > 1)
    return tcpGather(values);
  std::vector<double> all(values.size() * size);
#ifdef FLEX_HAVE_MPI
  if (mpi && size > 1) {
    MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_DOUBLE,
                  all.data(), static_cast<int>(values.size()), MPI_DOUBLE,
                  MPI_COMM_WORLD);
    return all;
  }
#endif
  return values;
}

void Ranks::barrier() const {
  if (tcp && size > 1) {
    (void)tcpGather({0.0});
    return;
  }
#ifdef FLEX_HAVE_MPI
  if (mpi && size > 1)
    MPI_Barrier(MPI_COMM_WORLD);
#endif
}

std::string Ranks::dir(const std::string &dir) const {
  return size > 1 ? (fs::path(dir) / ("rank" + std::to_string(rank))).string()
                  : dir;
}

std::vector<double> Ranks::tcpGather(const std::vector<double> &values) const {
  std::vector<double> all(values.size() * size);
  Status status = tcp->allGather(
      values.data(), static_cast<int64_t>(values.size() * sizeof(double)),
      all.data(), "moe-run results");
  if (!status) {
    std::cerr << "moe-run: rank " << rank << ": " << status.message() << "\n";
    std::exit(1);
  }
  return all;
}

void flex::moerun::startRanks(int *argc, char ***argv) {
  // Under mpirun (or mpiexec, srun) each process is one rank.
  if (isLaunchedByMpi()) {
    Status status = initMpi(argc, argv);
    if (status.code() == StatusCode::Unavailable) {
      const char *size = std::getenv("OMPI_COMM_WORLD_SIZE");
      if (!size)
        size = std::getenv("PMI_SIZE");
      if (size && std::string(size) != "1")
        fatal(2, "started by an MPI launcher with " + std::string(size) +
                     " processes, but " + status.message());
    } else if (!status) {
      fatal(2, status.message());
    } else {
      ranks.mpi = true;
#ifdef FLEX_HAVE_MPI
      MPI_Comm_rank(MPI_COMM_WORLD, &ranks.rank);
      MPI_Comm_size(MPI_COMM_WORLD, &ranks.size);
#endif
    }
  } else if (isLaunchedByEnvironment()) {
    // torchrun-style: the rank and size come from the environment.
    RendezvousInfo info;
    if (Status status = readRendezvousEnvironment(info); !status)
      fatal(2, status.message());
    ranks.rank = info.rank;
    ranks.size = info.size;
    ranks.environment = true;
  }
}

void flex::moerun::fatal(int code, const std::string &message) {
  std::cerr << "moe-run: "
            << (ranks.size > 1 ? "rank " + std::to_string(ranks.rank) + ": "
                               : std::string())
            << message << "\n";
#ifdef FLEX_HAVE_MPI
  // The other ranks may wait in a collective: end them too.
  if (ranks.mpi && ranks.size > 1) {
    std::cerr.flush();
    MPI_Abort(MPI_COMM_WORLD, code);
  }
#endif
  std::exit(code);
}

void flex::moerun::checkApi(FlexStatus status, const char *what) {
  if (status != FLEX_STATUS_OK)
    fatal(status == FLEX_STATUS_INVALID_PLAN ||
                  status == FLEX_STATUS_IO_ERROR ||
                  status == FLEX_STATUS_UNAVAILABLE ||
                  status == FLEX_STATUS_NOT_FOUND
              ? 2
              : 1,
          std::string(what) + " failed (" + flexStatusName(status) +
              "): " + flexGetLastError());
}
