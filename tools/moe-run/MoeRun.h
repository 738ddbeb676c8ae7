//===- MoeRun.h - What moe-run's units share --------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares moe-run's parts: the options (Options.cpp), this
// process among the ranks (Ranks.cpp), the inputs and outputs
// (Arguments.cpp), loading and running a layer (RunCommand.cpp), the
// calibration of the cost model's profile (Calibrate.cpp), the check
// against the fp64 reference (Check.cpp) and the report (Report.cpp).
// LayerRun carries one run's state from one part to the next.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_TOOLS_MOE_RUN_MOERUN_H
#define FLEX_TOOLS_MOE_RUN_MOERUN_H

#include "flex-c/Flex.h"
#include "flex/Runtime/Comm/TcpRendezvous.h"
#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Plan.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace flex::moerun {

//===----------------------------------------------------------------------===//
// Options (Options.cpp)
//===----------------------------------------------------------------------===//

struct Options {
  std::string path;
  uint64_t seed = 0;
  std::string inputsDir, saveInputsDir, outputsDir, variant;
  bool train = false, check = false, json = false, checkNan = false;
  int64_t iters = 1;
  /// Untimed calls before the timed ones (--graph: at least 2).
  int64_t warmup = 1;
  /// --settle N: with auto, calls that explore a variant are untimed (at
  /// most N of them, then the calls are timed as they come), each followed
  /// by the warm-up calls again; 0: every call after the warm-up is timed.
  int64_t settle = 0;
  std::string device = "cpu";
  bool graph = false;
  /// --require-graph / --require-forward-graph: every timed pass (or every
  /// timed forward) must replay a recorded graph; exit 1 otherwise.
  bool requireGraph = false, requireForwardGraph = false;
  bool align = true;
  /// --calibrate: measure the cost model's profile into this file instead
  /// of running a plan (Calibrate.cpp); --quick: in a fraction of a second.
  std::string calibrate;
  bool quick = false;
  /// The plans given with --calibrate: run and timed, their steps fit each
  /// step kind's figures (fitStepCosts).
  std::vector<std::string> calibratePlans;
  /// --profile: the device profile of the automatic variant choice and
  /// --explain; --explain: print the cost model's account of the choice.
  std::string profile;
  bool explain = false;
};

/// The command line; --help prints the usage and exits 0, bad usage exits 2.
Options parseOptions(int argc, char **argv);

//===----------------------------------------------------------------------===//
// Ranks (Ranks.cpp)
//===----------------------------------------------------------------------===//

/// This process among the ranks of an MPI launch (rank 0 of 1 otherwise),
/// with the fp64 reductions the summary and --check need.
struct Ranks {
  int rank = 0;
  int size = 1;
  bool mpi = false; ///< MPI is running
  /// A torchrun-style launch: the reductions below go through rank 0 over
  /// TCP (set up once the NCCL communicator is).
  bool environment = false;
  std::unique_ptr<TcpRendezvous> tcp;

  void maxInPlace(std::vector<double> &values) const;
  void sumInPlace(std::vector<double> &values) const;
  /// Every rank's `values` (one size on all ranks), in rank order.
  std::vector<double> gather(const std::vector<double> &values) const;
  /// Returns once every rank has called it.
  void barrier() const;
  /// `dir` on one rank, `dir/rank<r>` on many.
  std::string dir(const std::string &dir) const;

private:
  /// Every rank's values through the TCP rendezvous, [size][n].
  std::vector<double> tcpGather(const std::vector<double> &values) const;
};

/// This process's place among the ranks (one per process).
extern Ranks ranks;

/// Finds this process's rank from an MPI launcher or torchrun-style
/// environment variables (MPI is initialized here).
void startRanks(int *argc, char ***argv);

/// Prints `moe-run: [rank r: ]message` and exits with `code` (under MPI it
/// ends the other ranks too, which may wait in a collective).
[[noreturn]] void fatal(int code, const std::string &message);

/// fatal() unless `status` is OK: exit 2 for what the input caused (a bad
/// plan, a missing file, something unavailable), 1 otherwise.
void checkApi(FlexStatus status, const char *what);

//===----------------------------------------------------------------------===//
// One run of a layer
//===----------------------------------------------------------------------===//

/// One argument of the plan and its host data.
struct ArgumentBuffer {
  FlexArgumentInfo info;
  std::vector<int64_t> shape;
  DType dtype;
  std::vector<uint8_t> data;
  std::string source; ///< "random", "file", "output"

  int64_t count() const;
  std::vector<double> values() const;
};

/// The times of one pass (forward or backward) over the timed calls.
struct StepTimes {
  std::vector<std::string> ops;
  std::vector<double> totalMicros; ///< summed over stepRuns runs
  int64_t stepRuns = 0;
  std::vector<double> runs; ///< whole-pass time of each timed run
  /// Host wall time of each timed call, from the API call to its return
  /// (it waits for the device when timed): runs[i] plus the host's work
  /// before the pass's first marker and the wait, the figure a caller
  /// timing the whole call sees (bench/python_overhead.py compares with it).
  std::vector<double> calls;
  /// The variant the runs above ran; -1 before the first.
  int64_t variant = -1;
  /// Runs of earlier variants left out (variant = auto switched: the cost
  /// model explored, or the capacity changed).
  int64_t droppedRuns = 0;

  /// Adds the last run's step times (when it has them) and, when `timed`,
  /// its whole-pass time. When the run's variant differs from the runs'
  /// so far, those are dropped: the times are one variant's.
  void add(FlexExecutable exe, bool timed, double callMicros = 0);
  double stepMean(size_t i) const;
  double mean() const;
  double quantile(double q) const;
  double callMedian() const;
};

/// One output compared with the reference.
struct CheckResult {
  std::string name;
  double error;
  bool pass;
};

/// --check's outcome, the worst over ranks.
struct CheckReport {
  std::vector<CheckResult> results;
  double tolerance = 0;
  /// The smallest gap between a chosen and an unchosen routing logit.
  double routingMargin = 0;
  bool failed = false;

  /// How many results are within the tolerance.
  int64_t passed() const {
    int64_t count = 0;
    for (const CheckResult &result : results)
      count += result.pass;
    return count;
  }
};

/// What one run of a layer has: the plan, the executable, the arguments, the
/// times and the check, filled in by the parts in turn.
struct LayerRun {
  bool isMlir = false;
  std::string planText;
  FlexContext context = nullptr;
  FlexExecutable exe = nullptr;
  /// The C++ view of the same plan, for what the C API does not expose (the
  /// capacity alignment of the variant, for the reference).
  Plan plan;
  int32_t world = 1;
  /// The variant of the last forward (with auto: the cost model's latest
  /// choice) and whether the cost model chose it.
  int64_t variant = 0;
  const char *variantName = nullptr;
  bool automatic = false;
  /// The workspace that variant runs on, and the one every variant fits.
  int64_t variantWorkspaceBytes = 0, planWorkspaceBytes = 0;
  /// Timed passes that replayed a recorded graph, of the timed ones.
  int64_t forwardReplays = 0, backwardReplays = 0;
  /// Auto's last call measured a variant it explores rather than running
  /// its pick (the explanation's `exploring`).
  bool exploring = false;
  /// --explain: flexExecutableExplain's JSON after the calls.
  std::string explainJson;
  FlexLayerConfig layer{};
  std::vector<ArgumentBuffer> args;
  /// Untimed calls made before the timed ones.
  int64_t warmup = 0;
  /// --settle: calls left untimed because auto explored a variant in them.
  int64_t settleCalls = 0;
  StepTimes forwardTimes, backwardTimes;
  CheckReport check;

  ArgumentBuffer *find(const std::string &name);
};

/// Loads (or compiles), runs, checks and reports one layer; the exit status.
int runCommand(const Options &options);
/// Loads options.path, runs its calls and reads what ran (runCommand
/// without the check and the report); the caller destroys run.exe and
/// run.context.
void runLayer(const Options &options, LayerRun &run);
/// Calibrate.cpp: --calibrate; the exit status.
int calibrateCommand(const Options &options);

/// Arguments.cpp: the inputs filled from --inputs or the generator (and
/// saved with --save-inputs), the outputs poisoned with NaN.
void prepareArguments(const Options &options, LayerRun &run);
/// Arguments.cpp: --outputs.
void writeOutputs(const Options &options, const LayerRun &run);

/// Check.cpp: every output and gradient against the fp64 reference, into
/// run.check.
void checkAgainstReference(const Options &options, LayerRun &run);

/// Report.cpp: the layer in one line.
std::string layerSummary(const LayerRun &run);
/// Report.cpp: times and check as text or JSON (rank 0 only).
void printReport(const Options &options, const LayerRun &run);

} // namespace flex::moerun

#endif // FLEX_TOOLS_MOE_RUN_MOERUN_H
