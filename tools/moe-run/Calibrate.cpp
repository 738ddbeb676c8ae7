//===- Calibrate.cpp - moe-run --calibrate
//---------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements `moe-run --calibrate PROFILE.json`: it measures the
// cost model's device profile on this machine (calibrateCpu; on W MPI ranks
// the collectives too, every rank taking part) and rank 0 writes it.
// With --device cuda it measures the current GPU (calibrateCuda, one rank).
// docs/CostModel.md describes the profile.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/CostModel/Calibrate.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>

using namespace flex;
using namespace flex::moerun;

namespace {

/// One line per figure the profile holds.
void printSummary(const DeviceProfile &profile, const std::string &path,
                  double seconds) {
  double low = 0, high = 0;
  for (const GemmPoint &point : profile.gemm) {
    low = low == 0 ? point.flopsPerSecond : std::min(low, point.flopsPerSecond);
    high = std::max(high, point.flopsPerSecond);
  }
  char line[256];
  std::snprintf(line, sizeof line,
                "moe-run: calibrated %s '%s' on %lld rank(s) in %.2f s\n",
                profile.backend.c_str(), profile.deviceName.c_str(),
                static_cast<long long>(profile.worldSize), seconds);
  std::cout << line;
  std::snprintf(line, sizeof line,
                "  gemm       %zu shapes, %.3g .. %.3g GFLOP/s\n"
                "  memory     %.3g GB/s, launch %.3g us\n",
                profile.gemm.size(), low / 1e9, high / 1e9,
                profile.memoryBandwidth / 1e9, profile.launchSeconds * 1e6);
  std::cout << line;
  if (!profile.driverVersion.empty() || !profile.cudaVersion.empty())
    std::cout << "  versions   driver " << profile.driverVersion << ", CUDA "
              << profile.cudaVersion << ", NCCL "
              << (profile.ncclVersion.empty() ? "-" : profile.ncclVersion)
              << "\n";
  for (const CollectivePoint &point : profile.collectives) {
    std::snprintf(
        line, sizeof line, "  %-14s W=%lld %s: alpha %.3g us, beta %.3g GB/s\n",
        std::string(toString(point.kind)).c_str(),
        static_cast<long long>(point.worldSize), point.transport.c_str(),
        point.alphaSeconds * 1e6, point.betaBytesPerSecond / 1e9);
    std::cout << line;
  }
  std::cout << "  wrote " << path << "\n";
}

} // namespace

/// `--device cuda`: one GPU (the current one) on one rank.
static int calibrateCudaCommand(const Options &options) {
  if (ranks.size > 1)
    fatal(2, "--calibrate --device cuda measures one GPU: run it on one rank "
             "(the collectives keep the built-in figures)");
  CalibrationOptions calibration;
  calibration.quick = options.quick;
  DeviceProfile profile;
  const auto begin = std::chrono::steady_clock::now();
  if (Status s = calibrateCuda(calibration, profile); !s)
    fatal(1, "calibration failed: " + s.message());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
          .count();
  if (Status s = writeProfileFile(options.calibrate, profile); !s)
    fatal(2, s.message());
  if (options.json)
    std::cout << writeProfile(profile);
  else
    printSummary(profile, options.calibrate, seconds);
  return 0;
}

int flex::moerun::calibrateCommand(const Options &options) {
  if (options.device == "cuda")
    return calibrateCudaCommand(options);
  std::shared_ptr<Communicator> comm;
  if (ranks.size > 1) {
    if (!ranks.mpi)
      fatal(2, "--calibrate on several CPU ranks needs mpirun");
    if (Status s = createMpiCommunicator(comm); !s)
      fatal(2, "cannot create the MPI communicator: " + s.message());
  }
  CalibrationOptions calibration;
  calibration.quick = options.quick;
  DeviceProfile profile;
  const auto begin = std::chrono::steady_clock::now();
  if (Status s = calibrateCpu(calibration, comm.get(), profile); !s)
    fatal(1, "calibration failed: " + s.message());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
          .count();
  if (ranks.rank != 0)
    return 0;
  if (Status s = writeProfileFile(options.calibrate, profile); !s)
    fatal(2, s.message());
  if (options.json)
    std::cout << writeProfile(profile);
  else
    printSummary(profile, options.calibrate, seconds);
  return 0;
}
