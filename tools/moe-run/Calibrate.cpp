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
// With --device cuda it measures the current GPU (calibrateCuda) and, on W
// ranks over NCCL, the collectives and the slowdowns beside an exchange.
// docs/CostModel.md describes the profile.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Comm/NcclCommunicator.h"
#include "flex/Runtime/CostModel/Calibrate.h"
#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

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
  for (const StepCostPoint &point : profile.steps) {
    std::snprintf(
        line, sizeof line, "  step %-22s alpha %.3g us, %s %.3g (%lld runs)\n",
        point.op.c_str(), point.alphaSeconds * 1e6,
        point.bytesPerSecond > 0 ? "GB/s" : "gemm x",
        point.bytesPerSecond > 0 ? point.bytesPerSecond / 1e9 : point.gemmScale,
        static_cast<long long>(point.samples));
    std::cout << line;
  }
  std::cout << "  wrote " << path << "\n";
}

/// A calibration plan: loaded, and for one rank.
Plan loadCalibrationPlan(const std::string &path) {
  Plan plan;
  if (Status s = loadPlanFile(path, plan); !s)
    fatal(2, "--calibrate: cannot load '" + path + "': " + s.message());
  if (plan.worldSize > 1)
    fatal(2, "--calibrate: '" + path + "' runs on " +
                 std::to_string(plan.worldSize) +
                 " ranks; calibration plans run on one");
  return plan;
}

/// The capacity C the last call ran with, from the explain JSON.
int64_t lastCapacity(const LayerRun &run) {
  auto json = nlohmann::json::parse(run.explainJson, nullptr, false);
  if (json.is_discarded() || !json.contains("capacity") ||
      !json["capacity"].is_number_integer())
    return -1;
  return json["capacity"].get<int64_t>();
}

/// The timed steps of the run's variant, each with the model's basis.
void addSamples(const CostModel &model, const LayerRun &run,
                std::vector<StepSample> &samples) {
  const int64_t capacity = lastCapacity(run);
  const Variant &variant = run.plan.variants.at(run.variant);
  for (bool backward : {false, true}) {
    const StepTimes &times = backward ? run.backwardTimes : run.forwardTimes;
    const size_t steps = (backward ? variant.backward : variant.forward).size();
    if (times.stepRuns == 0 || times.ops.size() != steps)
      continue;
    std::vector<double> seconds(steps);
    for (size_t i = 0; i < steps; ++i)
      seconds[i] = times.stepMean(i) * 1e-6;
    collectStepSamples(model, run.plan, run.variant, backward, capacity,
                       seconds, samples);
  }
}

/// Runs each plan given with --calibrate (each variant, forward and for a
/// training plan backward, timed per step) and fits each step kind's
/// figures to the steps: what a kind pays besides the bytes and FLOPs the
/// generic figures price (docs/CostModel.md, "Calibrating with plans").
void calibrateWithPlans(const Options &options, const std::vector<Plan> &plans,
                        DeviceProfile &profile) {
  if (plans.empty())
    return;
  // The basis of each step (its bytes, FLOPs, GEMM-table time) is computed
  // with the GEMM table just measured.
  const CostModel model(profile);
  std::vector<StepSample> samples;
  for (size_t p = 0; p < plans.size(); ++p) {
    // Every variant: a layout's steps (padded or ragged GEMMs) are measured
    // only where they run.
    const Plan &plan = plans[p];
    for (const Variant &each : plan.variants) {
      Options one;
      one.path = options.calibratePlans[p];
      one.device = options.device;
      one.train = plan.training;
      one.iters = options.quick ? 2 : 10;
      one.warmup = 2;
      one.profile = options.profile;
      one.variant = each.name;
      LayerRun run;
      runLayer(one, run);
      addSamples(model, run, samples);
      flexExecutableDestroy(run.exe);
      flexContextDestroy(run.context);
    }
  }
  fitStepCosts(samples, profile);
  profile.notes += "; per step kind figures fitted to " +
                   std::to_string(samples.size()) + " timed steps of " +
                   std::to_string(options.calibratePlans.size()) + " plan(s)";
}

/// Every plan given with --calibrate, loaded before anything is measured:
/// a bad one is refused at once, not after the calibration.
std::vector<Plan> loadCalibrationPlans(const Options &options) {
  std::vector<Plan> plans;
  for (const std::string &path : options.calibratePlans)
    plans.push_back(loadCalibrationPlan(path));
  return plans;
}

} // namespace

/// `--device cuda`: the current GPU; on W ranks (mpirun or torchrun's
/// variables) also the collectives and the slowdowns beside an exchange,
/// through an NCCL communicator, and rank 0 writes the profile.
static int calibrateCudaCommand(const Options &options) {
  if (ranks.size > 1 && !options.calibratePlans.empty())
    fatal(2, "--calibrate with plans runs on one rank");
  const std::vector<Plan> plans = loadCalibrationPlans(options);
  std::shared_ptr<Communicator> comm;
  if (ranks.size > 1) {
    // As a run makes it: the environment's runtime options (the collective
    // timeout; FLEX_A2A_TRANSPORT=ce, the copy engines, is calibrated so).
    RuntimeOptions runtime;
    if (Status s = RuntimeOptions::fromEnvironment(RuntimeOptions(), runtime);
        !s)
      fatal(2, s.message());
    const NcclCommunicatorOptions nccl = ncclOptionsFrom(runtime);
    Status status = ranks.environment
                        ? createNcclCommunicatorFromEnvironment(comm, nccl)
                        : createNcclCommunicatorFromMpi(comm, nullptr, nccl);
    if (!status)
      fatal(status.code() == StatusCode::Unavailable ? 2 : 1,
            "--calibrate --device cuda on " + std::to_string(ranks.size) +
                " ranks: " + status.message());
  }
  CalibrationOptions calibration;
  calibration.quick = options.quick;
  DeviceProfile profile;
  const auto begin = std::chrono::steady_clock::now();
  if (Status s = calibrateCuda(calibration, comm.get(), profile); !s)
    fatal(1, "calibration failed: " + s.message());
  calibrateWithPlans(options, plans, profile);
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

int flex::moerun::calibrateCommand(const Options &options) {
  if (options.device == "cuda")
    return calibrateCudaCommand(options);
  if (ranks.size > 1 && !options.calibratePlans.empty())
    fatal(2, "--calibrate with plans runs on one rank");
  const std::vector<Plan> plans = loadCalibrationPlans(options);
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
  calibrateWithPlans(options, plans, profile);
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
