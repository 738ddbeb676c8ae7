//===- RunCommand.cpp - moe-run: load, run and time one layer -------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the run of one layer: the plan read (or a .mlir layer
// compiled in process), loaded through the C API and given a communicator
// on W ranks; the variant selected; the arguments bound (in device memory
// with --device cuda); the untimed warm-up and timed calls; then --outputs,
// --check and the report.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

#ifdef FLEX_MOE_RUN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

using namespace flex;
using namespace flex::moerun;
namespace fs = std::filesystem;

//===----------------------------------------------------------------------===//
// Times
//===----------------------------------------------------------------------===//

void StepTimes::add(FlexExecutable exe, bool timed, double callMicros) {
  int64_t ran = -1;
  checkApi(flexExecutableGetSelectedVariant(exe, &ran), "variant");
  if (variant >= 0 && ran != variant) {
    droppedRuns += static_cast<int64_t>(runs.size());
    ops.clear();
    totalMicros.clear();
    stepRuns = 0;
    runs.clear();
    calls.clear();
  }
  variant = ran;
  int64_t count = 0;
  checkApi(flexExecutableGetNumStepTimings(exe, &count), "step timings");
  if (count > 0 && (ops.empty() || static_cast<int64_t>(ops.size()) == count)) {
    if (ops.empty()) {
      ops.resize(count);
      totalMicros.assign(count, 0);
    }
    for (int64_t i = 0; i < count; ++i) {
      const char *op = nullptr;
      double micros = 0;
      checkApi(flexExecutableGetStepTiming(exe, i, &op, &micros),
               "step timing");
      ops[i] = op;
      totalMicros[i] += micros;
    }
    ++stepRuns;
  }
  if (timed) {
    double total = 0;
    checkApi(flexExecutableGetLastRunMicros(exe, &total), "run time");
    runs.push_back(total);
    calls.push_back(callMicros);
  }
}

double StepTimes::stepMean(size_t i) const {
  return stepRuns ? totalMicros[i] / static_cast<double>(stepRuns) : 0.0;
}

double StepTimes::mean() const {
  double sum = 0;
  for (double run : runs)
    sum += run;
  return runs.empty() ? 0.0 : sum / static_cast<double>(runs.size());
}

double StepTimes::quantile(double q) const {
  if (runs.empty())
    return 0.0;
  std::vector<double> sorted = runs;
  std::sort(sorted.begin(), sorted.end());
  return sorted[static_cast<size_t>(q * static_cast<double>(sorted.size() - 1) +
                                    0.5)];
}

double StepTimes::callMedian() const {
  if (calls.empty())
    return 0.0;
  std::vector<double> sorted = calls;
  std::sort(sorted.begin(), sorted.end());
  return sorted[sorted.size() / 2];
}

namespace {

//===----------------------------------------------------------------------===//
// Loading
//===----------------------------------------------------------------------===//

std::string readFile(const std::string &path) {
  std::ifstream file(path, std::ios::binary);
  if (!file)
    fatal(2, "cannot open '" + path + "'");
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

/// The plan text: read, or compiled from MLIR.
std::string planTextOf(const Options &options, bool isMlir) {
  if (!isMlir)
    return readFile(options.path);
  std::string mlir = readFile(options.path);
  FlexCompileOptions compileOptions{};
  compileOptions.struct_size = sizeof(FlexCompileOptions);
  compileOptions.world_size = ranks.size;
  compileOptions.rank = ranks.rank;
  compileOptions.training = options.train ? 1 : 0;
  // Diagnostics then name the file (path:line:col), not "<layer>".
  std::string pipeline = "source=" + options.path;
  compileOptions.pipeline = pipeline.c_str();
  char *json = nullptr;
  FlexStatus status =
      flexCompileLayerToPlan(mlir.data(), mlir.size(), &compileOptions, &json);
  if (status == FLEX_STATUS_UNAVAILABLE)
    fatal(2, "cannot run '" + options.path + "': " + flexGetLastError());
  // A layer that does not parse or verify is bad input (2); an internal
  // compiler error is not.
  if (status == FLEX_STATUS_INVALID_ARGUMENT) {
    // The diagnostics on lines of their own, each starting `path:line:col:`
    // as editors expect, without the C API's "function: compiler: ".
    std::string error = flexGetLastError();
    size_t prefix = error.find(": compiler: ");
    if (prefix != std::string::npos)
      error.erase(0, prefix + sizeof(": compiler: ") - 1);
    while (!error.empty() && error.back() == '\n')
      error.pop_back();
    fatal(2, "cannot compile '" + options.path + "':\n" + error);
  }
  checkApi(status, ("compiling '" + options.path + "'").c_str());
  std::string planText = json;
  flexFreeString(json);
  return planText;
}

/// The plan text, the context, the executable and the C++ view of the plan.
void loadLayer(const Options &options, LayerRun &run) {
  run.isMlir = fs::path(options.path).extension() == ".mlir";
  run.planText = planTextOf(options, run.isMlir);
  FlexOptions contextOptions = nullptr;
  checkApi(flexOptionsCreate(&contextOptions), "options");
  if (!options.profile.empty())
    checkApi(flexOptionsSet(contextOptions, "profile", options.profile.c_str()),
             "--profile");
  FlexStatus status = flexContextCreateWithOptions(
      options.device.c_str(), contextOptions, &run.context);
  flexOptionsDestroy(contextOptions);
  if (status == FLEX_STATUS_UNAVAILABLE)
    fatal(2, "--device " + options.device + ": " + flexGetLastError());
  checkApi(status, ("creating the " + options.device + " context").c_str());
  status = flexExecutableCreateFromPlan(run.context, run.planText.data(),
                                        run.planText.size(), &run.exe);
  if (status != FLEX_STATUS_OK)
    fatal(2, "cannot load '" + options.path + "' (" + flexStatusName(status) +
                 "): " + flexGetLastError());
  if (Status parsed = parsePlan(run.planText, run.plan); !parsed)
    fatal(2, "'" + options.path + "': " + parsed.message());
  checkApi(flexExecutableGetWorldSize(run.exe, &run.world), "world size");
}

/// The ranks: a plan for W ranks needs W processes, which talk through NCCL
/// (GPU ranks) or MPI (CPU ranks).
void connectRanks(const Options &options, LayerRun &run) {
  if (!ranks.mpi && !ranks.environment) {
    if (run.world > 1)
      fatal(2, "'" + options.path + "' runs on " + std::to_string(run.world) +
                   " ranks (world.size); start it with mpirun -np " +
                   std::to_string(run.world) + " moe-run ..." +
                   (flexHasMpi() ? ""
                                 : " (this moe-run was built without MPI: "
                                   "install an MPI and reconfigure)"));
    return;
  }
  FlexCommunicator communicator = nullptr;
  if (options.device == "cuda" && run.world > 1) {
    FlexStatus status =
        ranks.environment
            ? flexCommunicatorCreateNcclFromEnv(-1, &communicator)
            : flexCommunicatorCreateNcclFromMpi(nullptr, -1, &communicator);
    if (status == FLEX_STATUS_UNAVAILABLE)
      fatal(2, "--device cuda on " + std::to_string(run.world) +
                   " ranks: " + flexGetLastError());
    checkApi(status, "creating the NCCL communicator");
  } else {
    checkApi(flexCommunicatorCreateMpi(nullptr, &communicator),
             "creating the MPI communicator");
  }
  if (ranks.environment) {
    // moe-run's own reductions (times, --check) meet at the same port.
    RendezvousInfo info;
    Status status = readRendezvousEnvironment(info);
    if (status)
      status = TcpRendezvous::connect(info, ranks.tcp);
    if (!status)
      fatal(1, status.message());
  }
  FlexStatus status = flexExecutableSetCommunicator(run.exe, communicator);
  flexCommunicatorDestroy(communicator);
  // A plan for other ranks is bad usage (2); a failed transport, such as
  // a sub-communicator that could not be split, a failed run (1).
  if (status != FLEX_STATUS_OK)
    fatal(status == FLEX_STATUS_COMMUNICATION_ERROR ||
                  status == FLEX_STATUS_INTERNAL
              ? 1
              : 2,
          "'" + options.path + "': " + flexGetLastError());
}

/// flexExecutableExplain's JSON (the text too, where asked), parsed; not
/// an object if it does not parse.
nlohmann::json explanation(FlexExecutable exe, std::string *text = nullptr) {
  char *json = nullptr;
  checkApi(flexExecutableExplain(exe, &json), "explain");
  auto explained = nlohmann::json::parse(json, nullptr, false);
  if (text)
    *text = json;
  flexFreeString(json);
  return explained;
}

/// The variant the next (or, after the calls, the last) forward runs, and
/// whether the cost model chose it.
void readVariant(LayerRun &run) {
  checkApi(flexExecutableGetSelectedVariant(run.exe, &run.variant), "variant");
  checkApi(flexExecutableGetVariantName(run.exe, run.variant, &run.variantName),
           "name");
  checkApi(flexExecutableGetVariantWorkspaceSize(run.exe, run.variant,
                                                 &run.variantWorkspaceBytes),
           "workspace size");
  checkApi(
      flexExecutableGetWorkspaceSize(run.exe, &run.planWorkspaceBytes, nullptr),
      "workspace size");
  auto explained = explanation(run.exe, &run.explainJson);
  run.automatic = explained.is_object() && explained.value("automatic", false);
  run.exploring = explained.is_object() && explained.value("exploring", false);
}

/// --variant (a name, an index, or auto), then what runs, and the layer.
void selectVariant(const Options &options, LayerRun &run) {
  if (!options.variant.empty()) {
    FlexStatus status =
        flexExecutableSelectVariantByName(run.exe, options.variant.c_str());
    if (status == FLEX_STATUS_NOT_FOUND) {
      int64_t index = resolveVariant(run.plan, options.variant);
      if (index < 0)
        fatal(2, "--variant '" + options.variant +
                     "' names no variant: " + flexGetLastError());
      status = flexExecutableSelectVariant(run.exe, index);
    }
    checkApi(status, "selecting the variant");
  }
  readVariant(run);
  checkApi(flexExecutableGetLayerConfig(run.exe, &run.layer), "layer");
  int32_t training = 0;
  checkApi(flexExecutableIsTraining(run.exe, &training), "training");
  if (options.train && !training)
    fatal(2, "--train needs a training plan; '" + options.path +
                 "' was compiled for inference (training false)");
}

//===----------------------------------------------------------------------===//
// Running
//===----------------------------------------------------------------------===//

/// Device copies of the arguments for --device cuda.
struct DeviceBuffers {
  std::vector<void *> data;
  ~DeviceBuffers() {
#ifdef FLEX_MOE_RUN_HAVE_CUDA
    for (void *p : data)
      if (p)
        cudaFree(p);
#endif
  }
};

#ifdef FLEX_MOE_RUN_HAVE_CUDA
void checkCudaCall(cudaError_t error, const std::string &what) {
  if (error != cudaSuccess)
    fatal(1, what + " failed: " + cudaGetErrorName(error) + " (" +
                 cudaGetErrorString(error) + ")");
}
#endif

/// One binding per argument; with --device cuda every argument gets device
/// memory: inputs are copied in, outputs start as the same NaN poison.
std::vector<FlexBinding> bindArguments(const Options &options, LayerRun &run,
                                       DeviceBuffers &device) {
  std::vector<FlexBinding> bindings;
  for (ArgumentBuffer &arg : run.args) {
    void *data = arg.data.data();
    if (options.device == "cuda") {
#ifdef FLEX_MOE_RUN_HAVE_CUDA
      void *buffer = nullptr;
      checkCudaCall(cudaMalloc(&buffer, std::max<int64_t>(arg.info.bytes, 1)),
                    std::string("cudaMalloc for '") + arg.info.name + "'");
      device.data.push_back(buffer);
      checkCudaCall(cudaMemcpy(buffer, arg.data.data(), arg.info.bytes,
                               cudaMemcpyHostToDevice),
                    std::string("copying '") + arg.info.name + "' in");
      data = buffer;
#else
      (void)device;
      fatal(2, "--device cuda: moe-run was built without CUDA");
#endif
    }
    bindings.push_back({arg.info.name, data, arg.info.bytes});
  }
  return bindings;
}

double microsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now() - start)
      .count();
}

/// Whether the executable's last run replayed a recorded graph.
bool replayedGraph(FlexExecutable exe) {
  int replayed = 0;
  checkApi(flexExecutableGetLastRunReplayedGraph(exe, &replayed), "replayed");
  return replayed != 0;
}

/// Whether auto measured a variant it explores in the last call, on any
/// rank (every rank then leaves the call untimed: the ranks' loops stay in
/// step).
bool exploredLastCall(FlexExecutable exe) {
  auto explained = explanation(exe);
  std::vector<double> explored = {
      explained.is_object() && explained.value("exploring", false) ? 1.0 : 0.0};
  ranks.maxInPlace(explored);
  return explored[0] > 0;
}

/// The calls: --warmup untimed ones (with --graph at least two: the eager
/// run and the one that records), then the timed ones; with --settle a call
/// in which auto explored a variant is untimed too, and the warm-up starts
/// again after it. The eager runs' step times are kept, as a replayed graph
/// has none. Times are the largest over ranks (a step ends when its slowest
/// rank does).
void runCalls(const Options &options, LayerRun &run) {
  DeviceBuffers device;
  std::vector<FlexBinding> bindings = bindArguments(options, run, device);
  FlexRunOptions runOptions{};
  runOptions.struct_size = sizeof(FlexRunOptions);
  runOptions.flags = (options.checkNan ? FLEX_RUN_CHECK_NONFINITE : 0) |
                     (options.graph ? FLEX_RUN_CUDA_GRAPH : 0);
  run.warmup =
      options.graph ? std::max<int64_t>(options.warmup, 2) : options.warmup;
  int64_t untimedLeft = run.warmup, timedCalls = 0;
  int64_t settleLeft = run.automatic ? options.settle : 0;
  for (int64_t call = 0; timedCalls < options.iters; ++call) {
    // Each call synchronizes (for its times), so the ranks' hosts resume at
    // different moments; without the barrier the first collective of the
    // next pass absorbs that skew.
    if (options.align)
      ranks.barrier();
    auto callStart = std::chrono::steady_clock::now();
    checkApi(flexExecutableForward(run.exe, bindings.data(), bindings.size(),
                                   &runOptions),
             "forward");
    double forwardCall = microsSince(callStart);
    bool timed = untimedLeft == 0;
    if (settleLeft > 0 && exploredLastCall(run.exe)) {
      --settleLeft;
      ++run.settleCalls;
      timed = false;
      untimedLeft = run.warmup;
    } else if (untimedLeft > 0) {
      --untimedLeft;
    }
    timedCalls += timed;
    run.forwardReplays += timed && replayedGraph(run.exe);
    // Replays have no per-step times: with --graph they come from the
    // eager calls before the recording, the first left out (one-time
    // costs: cuBLAS's set-up read as a 43 ms router on an H100).
    const bool stepsOnly = options.graph && call > 0;
    if (timed || stepsOnly)
      run.forwardTimes.add(run.exe, timed, forwardCall);
    if (options.train) {
      if (options.align)
        ranks.barrier();
      callStart = std::chrono::steady_clock::now();
      checkApi(flexExecutableBackward(run.exe, bindings.data(), bindings.size(),
                                      &runOptions),
               "backward");
      double backwardCall = microsSince(callStart);
      run.backwardReplays += timed && replayedGraph(run.exe);
      if (timed || stepsOnly)
        run.backwardTimes.add(run.exe, timed, backwardCall);
    }
  }
#ifdef FLEX_MOE_RUN_HAVE_CUDA
  if (options.device == "cuda") {
    checkCudaCall(cudaDeviceSynchronize(), "waiting for the device");
    for (size_t i = 0; i < run.args.size(); ++i)
      checkCudaCall(cudaMemcpy(run.args[i].data.data(), device.data[i],
                               run.args[i].info.bytes, cudaMemcpyDeviceToHost),
                    std::string("copying '") + run.args[i].info.name +
                        "' back");
  }
#endif
  for (StepTimes *times : {&run.forwardTimes, &run.backwardTimes}) {
    ranks.maxInPlace(times->totalMicros);
    ranks.maxInPlace(times->runs);
    ranks.maxInPlace(times->calls);
  }
}

} // namespace

void flex::moerun::runLayer(const Options &options, LayerRun &run) {
  loadLayer(options, run);
  connectRanks(options, run);
  selectVariant(options, run);
  prepareArguments(options, run);
  runCalls(options, run);
  // With auto the last call's choice ran; the check configures for it.
  readVariant(run);
  const std::string flag =
      options.requireGraph ? "--require-graph" : "--require-forward-graph";
  auto require = [&](const char *pass, int64_t replays) {
    if (replays < options.iters)
      fatal(1, flag + ": " + std::to_string(replays) + " of " +
                   std::to_string(options.iters) + " timed " + pass +
                   "s replayed a graph (the backend runs this variant's " +
                   pass + " step by step: docs/Runtime.md, \"CUDA graphs\")");
  };
  if (options.requireGraph || options.requireForwardGraph)
    require("forward", run.forwardReplays);
  if (options.requireGraph && options.train)
    require("backward", run.backwardReplays);
}

int flex::moerun::runCommand(const Options &options) {
  LayerRun run;
  runLayer(options, run);
  if (!options.outputsDir.empty())
    writeOutputs(options, run);
  if (options.check)
    checkAgainstReference(options, run);
  // Rank 0 speaks for all: times and check results are over every rank.
  if (ranks.rank == 0)
    printReport(options, run);
  flexExecutableDestroy(run.exe);
  flexContextDestroy(run.context);
  return run.check.failed ? 1 : 0;
}
