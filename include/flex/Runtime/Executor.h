//===- Executor.h - Run a plan on caller buffers ----------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the Executor: it binds the caller's buffers to a plan's
// arguments by name, owns or borrows the workspace, selects a variant and
// runs the variant's forward or backward steps through a Backend, timing each
// step. See docs/Runtime.md for the rules a caller follows.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_EXECUTOR_H
#define FLEX_RUNTIME_EXECUTOR_H

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <array>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace flex {

/// One caller buffer for one argument: its name, memory and size in bytes
/// (which must equal the argument's byte size exactly).
struct Binding {
  std::string_view name;
  void *data = nullptr;
  int64_t bytes = 0;
};

struct RunOptions {
  /// Reject NaN/Inf in the pass's float inputs before running (NumericError,
  /// nothing written), and report NaN/Inf in its outputs after running
  /// (NumericError, outputs written). Also on with the executor's
  /// RuntimeOptions::checkNonFinite (FLEX_CHECK_NAN=1).
  bool checkNonFinite = false;
  /// Time every step and the pass: with device timers (CUDA events) where
  /// the backend has them, which costs one synchronization at the end of the
  /// pass; else with a steady clock after Backend::synchronize. Off, a pass
  /// on the CUDA backend returns without waiting for the device.
  bool timeSteps = true;
  /// Record the pass as a graph and replay it on later calls with the same
  /// buffers (CUDA graphs), when the backend can (fixed capacity, padded
  /// layout); otherwise the pass runs step by step. The first call with a
  /// given set of buffers runs eagerly, the second records and replays, later
  /// ones replay. Also on with the executor's RuntimeOptions::cudaGraph
  /// (FLEX_CUDA_GRAPH=1).
  bool useGraph = false;
  /// The workspace of this call: at least minWorkspaceBytes() (on several
  /// ranks workspaceBytes()), aligned to workspaceAlignment()
  /// (InvalidArgument otherwise), running the variants that fit in
  /// `workspaceBytes`; null = the executor's
  /// own (setWorkspace). A forward leaves its saved state in it and a record
  /// keyed by its address, so the backward given the same workspace computes
  /// the gradients of that forward, whatever ran on other workspaces in
  /// between (docs/Runtime.md, "Per-call workspaces").
  void *workspace = nullptr;
  int64_t workspaceBytes = 0;
  /// The seed of this forward's gate noise instead of the plan's
  /// (LayerConfig::seed); empty = the plan's. A backward ignores it and runs
  /// with its forward's.
  std::optional<uint64_t> seed;
};

struct StepTiming {
  int32_t index = 0; ///< in the variant's forward or backward list
  StepOp op = StepOp::Router;
  double micros = 0;
};

/// What the last successful run did.
struct RunStats {
  int64_t variant = -1;
  bool backward = false;
  /// The pass ran as a replayed graph (no per-step times then).
  bool replayedGraph = false;
  std::vector<StepTiming> steps; ///< empty unless RunOptions::timeSteps
  double totalMicros = 0;
};

/// Per-variant measurements. Means over the successful runs of the variant
/// in this executor but its first forward and first backward, which pay
/// one-time costs (library handles, allocations, a first graph capture):
/// on an H100 a first forward of 120 ms made a 0.13 ms layer's mean of 21
/// runs read 5.9 ms.
struct VariantMeasurements {
  int64_t forwardRuns = 0;
  double forwardMeanMicros = 0;
  int64_t backwardRuns = 0;
  double backwardMeanMicros = 0;
  /// Every successful pass, the first included.
  int64_t forwardCalls = 0, backwardCalls = 0;
};

/// The measured means of one variant for one capacity bucket (C rounded
/// up to a power of two; -1: C unknown on the host), timed runs only.
struct BucketMeasurement {
  int64_t forwardRuns = 0;
  double forwardMeanMicros = 0;
  int64_t backwardRuns = 0;
  double backwardMeanMicros = 0;
};

/// What explain() reports for one variant (docs/CostModel.md, "Explain").
struct VariantExplanation {
  std::string name;
  /// The cost model's forward (and, for a training plan, backward)
  /// prediction for the capacity of the choice: per stage, and the total.
  std::array<double, kNumCostStages> forwardStageUs{}, backwardStageUs{};
  double predictedForwardUs = 0, predictedBackwardUs = 0;
  double predictedUs = 0; ///< forward + backward (training), or forward
  /// Every successful pass of the variant, the first included.
  int64_t forwardCalls = 0, backwardCalls = 0;
  /// The timed runs' means at the choice's capacity bucket, else over all
  /// capacities, a variant's first pass left out; runs = 0 when none.
  int64_t forwardRuns = 0, backwardRuns = 0;
  double measuredForwardUs = 0, measuredBackwardUs = 0;
  /// (measured - predicted) / predicted of the passes measured; NaN when
  /// none was.
  double error = 0;
  /// The workspace the variant runs on (Plan::variantWorkspaceBytes).
  int64_t workspaceBytes = 0;
};

/// The executor's account of its variant choice.
struct Explanation {
  /// The cost model chose (variant auto); false: the caller named it.
  bool automatic = false;
  int64_t chosen = 0;
  std::string reason;
  /// Variant auto: the last call ran a variant to measure it (the online
  /// refinement's exploration, docs/CostModel.md), not the one the
  /// measurements so far would pick; a benchmark's times from such calls
  /// are not its choice's.
  bool exploring = false;
  /// The capacity C the prediction counted (-1: the buffers' bounds) and
  /// where it came from ("static", "previous call", "bound").
  int64_t capacity = -1;
  std::string capacitySource;
  /// "file" (with its path) or "builtin" (with why the file was not used).
  std::string profileSource, profilePath, profileWhy, profileDevice;
  std::vector<VariantExplanation> variants;
};

/// explain() as JSON (docs/CostModel.md, "Explain").
std::string toJson(const Explanation &explanation);

class Executor {
public:
  /// Checks the plan (verifyPlan) and options.variant (a variant name or
  /// index; InvalidArgument when it names none), then selects that variant
  /// or, when empty, the plan's default. The options are taken as given
  /// (the executor reads variant, checkNonFinite and cudaGraph; the backend
  /// and communicator got theirs at creation).
  static Status create(std::shared_ptr<const Plan> plan,
                       std::unique_ptr<Backend> backend,
                       const RuntimeOptions &options,
                       std::unique_ptr<Executor> &executor);
  /// The same with the default options and the environment's overrides
  /// (RuntimeOptions::fromEnvironment: FLEX_VARIANT, FLEX_CHECK_NAN, ...).
  static Status create(std::shared_ptr<const Plan> plan,
                       std::unique_ptr<Backend> backend,
                       std::unique_ptr<Executor> &executor);
  ~Executor();

  const Plan &plan() const { return *plan_; }
  Backend &backend() { return *backend_; }
  const RuntimeOptions &options() const { return options_; }

  /// Variant selection. Takes effect at the next forward; a backward always
  /// runs the variant of its forward. The name "auto" turns the
  /// automatic choice on; naming or indexing a variant turns it off.
  Status selectVariant(int64_t index);
  Status selectVariant(std::string_view name);
  /// The variant the next forward runs (with auto: the latest choice).
  int64_t selectedVariant() const { return selected_; }
  /// The cost model picks the variant of each forward (docs/CostModel.md).
  bool automaticVariant() const { return automatic_; }

  /// Per variant the predicted per-stage and total time, the measured time
  /// and the error, the choice and why, and the profile's source. Loads
  /// the profile on first use (never fails: the built-in fallback).
  Explanation explain();
  /// The timed runs of `variant` per capacity bucket.
  const std::map<int64_t, BucketMeasurement> &
  bucketMeasurements(int64_t variant) const {
    return buckets_[variant];
  }

  /// Bytes and alignment of a workspace that runs every variant.
  int64_t workspaceBytes() const { return plan_->workspace.bytes; }
  int64_t workspaceAlignment() const { return plan_->workspace.alignment; }
  /// The bytes variant `variant` needs (its `workspace_bytes`): a smaller
  /// workspace runs the variants that fit in it, and the automatic choice
  /// picks among those (docs/Runtime.md, "Workspaces per variant").
  int64_t workspaceBytes(int64_t variant) const {
    return plan_->variantWorkspaceBytes(static_cast<size_t>(variant));
  }
  /// The smallest workspace some variant runs on. On several ranks every
  /// variant's (workspaceBytes()): the ranks' choice must agree, and one
  /// rank's workspace size is not known to the others.
  int64_t minWorkspaceBytes() const;
  /// The workspace the next calls may need: the selected variant's when
  /// named, else the largest within max_workspace_mib (the smallest
  /// variant's when none is); on several ranks the whole workspace.
  int64_t runWorkspaceBytes() const;
  /// Use the caller's workspace (at least minWorkspaceBytes(), aligned to
  /// workspaceAlignment(), alive until replaced or the executor is gone), or
  /// with null go back to a runtime-allocated one. Drops the pending forward
  /// of the old and the new workspace.
  Status setWorkspace(void *data, int64_t bytes);
  /// Bytes of the executor's own workspace allocated so far: at a forward,
  /// at least runWorkspaceBytes() (it never shrinks).
  int64_t ownedWorkspaceBytes() const { return ownedWorkspaceBytes_; }

  /// Forwards whose backward has not run yet, one per workspace; beyond this
  /// many the oldest is dropped (its backward then fails).
  static constexpr size_t kMaxPendingForwards = 1024;
  size_t pendingForwards() const { return forwardRecords_.size(); }

  /// The communicator of the plan's collective steps (docs/Runtime.md,
  /// "Many ranks"); this executor is its rank. A plan for W ranks
  /// (`world.size`) runs only on a communicator of W ranks (InvalidArgument
  /// otherwise), whose memory space is the backend's. A one-rank plan starts
  /// with the self communicator, and null goes back to it; a multi-rank plan
  /// starts with none, and forward fails until one is set.
  Status setCommunicator(std::shared_ptr<Communicator> communicator);
  const std::shared_ptr<Communicator> &communicator() const {
    return communicator_;
  }

  /// Runs the selected variant's forward. Every `input` and `output`
  /// argument must be bound; other arguments of the plan may be bound too
  /// (checked, then ignored).
  Status forward(const Binding *bindings, size_t count,
                 const RunOptions &options = {});
  /// Runs the backward of the last forward on the call's workspace
  /// (RunOptions::workspace, or the executor's own), with that forward's
  /// variant and seed. Needs a successful forward on that workspace since
  /// its last backward (its routing and activations are there; the backward
  /// consumes them); binds every `input`, `grad_input` and `grad_output`
  /// argument, the inputs holding the forward's values.
  Status backward(const Binding *bindings, size_t count,
                  const RunOptions &options = {});

  const RunStats &lastRunStats() const { return lastStats_; }
  const VariantMeasurements &measurements(int64_t variant) const {
    return measurements_[variant];
  }

private:
  Executor(std::shared_ptr<const Plan> plan, std::unique_ptr<Backend> backend,
           const RuntimeOptions &options);
  /// The steps of a forward or backward pass, in the order run() calls
  /// them (Executor.cpp has Pass).
  struct Pass;
  /// What a successful forward leaves for its backward besides the bytes in
  /// its workspace, keyed by the workspace's address (Workspaces.cpp): host
  /// state, so a device backend's backward needs no read of the device.
  struct ForwardRecord {
    int64_t variant = -1;
    /// The capacity bucket of the forward's C, for the backward's timing.
    int64_t bucket = -1;
    std::optional<uint64_t> seed;
    /// Age, for dropping the oldest past kMaxPendingForwards.
    uint64_t order = 0;
  };
  Status run(bool backward, const Binding *bindings, size_t count,
             const RunOptions &options);
  /// The call's workspace: RunOptions::workspace after checkWorkspace, else
  /// the executor's own (null until ensureWorkspace for a new executor);
  /// `available` = the bytes a variant may use there (the caller's size, or
  /// max_workspace_mib for the executor's own, which grows on demand).
  Status callWorkspace(const RunOptions &options, void *&workspace,
                       int64_t &available) const;
  /// InvalidArgument naming the size and alignment the plan needs.
  Status checkWorkspace(const void *data, int64_t bytes) const;
  /// InvalidArgument unless `variant` fits in `available` bytes (`own`: of
  /// the executor's own workspace, bounded by max_workspace_mib).
  Status checkVariantFits(int64_t variant, int64_t available, bool own) const;
  /// FailedPrecondition when the pass cannot run now; for a backward, the
  /// record of the forward on `workspace`.
  Status checkRunnable(bool backward, const void *workspace,
                       ForwardRecord &record) const;
  /// The record of the forward pending on `workspace`, or
  /// FailedPrecondition saying there is none.
  Status findForwardRecord(const void *workspace, ForwardRecord &record) const;
  /// Keeps the record of a successful forward on `workspace`.
  void keepForwardRecord(const void *workspace, ForwardRecord record);
  /// NumericError naming the first NaN or Inf of the pass's float inputs
  /// (or outputs).
  Status checkNonFiniteArguments(bool backward, bool outputs);
  /// The variant, seed, steps, timers and graph key of the pass on
  /// `workspace`; a backward's variant and seed are its forward's.
  Pass startPass(bool backward, const RunOptions &options, void *workspace,
                 const ForwardRecord &record) const;
  /// Device timer `marker` when the pass is timed on the device.
  Status mark(const Pass &pass, int32_t marker);
  /// The memory a step operand names in the bound arguments or workspace.
  TensorView resolve(const BufferRef &ref) const;
  /// Replays, records or runs the pass step by step.
  Status executePass(Pass &pass);
  /// The steps one by one, with their times, and the backend's endPass.
  Status runSteps(Pass &pass);
  /// Waits where needed and reads the times.
  Status finishPass(Pass &pass, std::chrono::steady_clock::time_point start);
  /// Keeps the stats and measurements and what a backward needs.
  void recordPass(Pass &pass);
  Status bind(bool backward, const Binding *bindings, size_t count);
  /// The executor's own workspace, grown to at least `bytes`.
  Status ensureWorkspace(int64_t bytes);
  /// Splits communicator_ into the sub-communicators of the plan's grouped
  /// collective steps and hands them to the backend.
  Status makeGroupCommunicators();

  // The automatic choice (AutoVariant.cpp).
  /// Loads the profile (or the fallback) once.
  void ensureCostModel();
  /// The ranks agree on one profile (once, on a host communicator).
  Status agreeOnProfile();
  /// Re-chooses when the capacity changed, then lets measured times
  /// overrule the model (refineChoice); sets selected_. `timed`: the pass
  /// to come is timed, so exploring a variant yields a measurement.
  /// Only variants that fit in `available` workspace bytes are candidates.
  Status chooseVariant(bool timed = false,
                       int64_t available = std::numeric_limits<int64_t>::max());
  /// Among the variants the model predicts within kRefineBand of its pick,
  /// one not yet measured twice at this capacity bucket is explored (at most
  /// kMaxExplorations calls each, timed calls only); once two or more are
  /// measured, the fastest measured wins. On several ranks (a host
  /// communicator) the exploration is the same on every rank (the same
  /// calls, the same counters) and, once it ends for a bucket, the ranks
  /// agree once on each variant's slowest-rank mean (agreeOnMeasurements);
  /// that choice then holds for the bucket. Sets `variant` and says why in
  /// refineNote_.
  Status refineChoice(bool timed, int64_t available, int64_t &variant);
  /// The fastest of the measured candidates by the max over the ranks of
  /// their means (one all-reduce), kept per bucket in agreedChoices_.
  Status agreeOnMeasurements(int64_t bucket,
                             const std::vector<double> &meanUs);
  /// The synced C of `variant`'s forward just run, when the host knows it
  /// without a new wait (host memory, or a timed pass already waited for);
  /// -1 otherwise.
  int64_t readCapacity(int64_t variant, bool waited);
  /// Keeps the capacity of a forward (`timed`: the pass waited, so C may
  /// be read) and, when `measured`, the bucketed time of the pass: a
  /// forward's bucket is that of its C (returned), a backward's `bucket`
  /// its forward's.
  int64_t recordAutomatic(int64_t variant, bool backward, bool timed,
                          bool measured, double micros, int64_t bucket);

  std::shared_ptr<const Plan> plan_;
  std::unique_ptr<Backend> backend_;
  int64_t selected_ = 0;
  RuntimeOptions options_;
  /// Graph keys of passes run once eagerly (the next call records them),
  /// oldest first; at most kMaxWarmGraphKeys.
  std::vector<std::string> warmGraphKeys_;
  static constexpr size_t kMaxWarmGraphKeys = 64;

  /// The executor's own workspace (the caller's, or ownedWorkspace_), and
  /// the one of the pass running now (resolve reads it).
  void *workspace_ = nullptr;
  void *ownedWorkspace_ = nullptr;
  void *runWorkspace_ = nullptr;
  /// The caller's workspace's size (setWorkspace; none while the
  /// executor's own is used); the bytes of the executor's own allocated so
  /// far, the blocks it outgrew while a caller's graph may still use them
  /// (freed with the executor), and whether a pass on it was recorded into
  /// a caller's graph.
  std::optional<int64_t> givenWorkspaceBytes_;
  int64_t ownedWorkspaceBytes_ = 0;
  std::vector<void *> retiredWorkspaces_;
  bool ownedWorkspaceRecorded_ = false;
  /// The bytes a variant may use on the executor's current workspace (the
  /// caller's size, else max_workspace_mib).
  int64_t availableWorkspaceBytes() const;
  /// Whether a workspace's size narrows the variants it runs: on one rank;
  /// on several the choice must agree while one rank's sizes are unknown to
  /// the others, so there a workspace holds every variant.
  bool sizeNarrowsVariants() const { return plan_->worldSize == 1; }
  /// `bytes` as a bound on the variants (none where the size narrows none).
  int64_t variantBound(int64_t bytes) const {
    return sizeNarrowsVariants() ? bytes : std::numeric_limits<int64_t>::max();
  }
  /// The pending forwards by workspace address (a workspace holds the state
  /// of one forward) and the age of the newest.
  std::unordered_map<const void *, ForwardRecord> forwardRecords_;
  uint64_t forwardOrder_ = 0;
  std::shared_ptr<Communicator> communicator_;

  /// Per argument: the pointer bound for the current run (null when not).
  std::vector<void *> argumentData_;
  RunStats lastStats_;
  std::vector<VariantMeasurements> measurements_;

  /// The automatic choice: on, the cost model (loaded on first use), the
  /// profile's source, the capacity C of the next choice and its source,
  /// the latest choice and the C it was made for.
  bool automatic_ = false;
  std::unique_ptr<CostModel> costModel_;
  std::string profileWhy_;
  bool profileAgreed_ = false;
  int64_t capacity_ = -1;
  std::string capacitySource_ = "bound";
  Choice choice_;
  int64_t choiceCapacity_ = -2;
  std::vector<std::map<int64_t, BucketMeasurement>> buckets_;
  /// Online refinement (one rank): calls spent exploring per variant and
  /// bucket, and what the last refinement did (explain's reason).
  std::vector<std::map<int64_t, int64_t>> explorations_;
  std::string refineNote_;
  bool exploring_ = false; ///< the last refinement chose to measure

  /// Several ranks: the variant the ranks agreed on per capacity bucket and
  /// its slowest-rank mean.
  struct AgreedChoice {
    int64_t variant = -1;
    double us = 0.0;
  };
  std::map<int64_t, AgreedChoice> agreedChoices_;
  static constexpr double kRefineBand = 0.25;
  static constexpr double kKeepBand = 0.03;
  static constexpr int64_t kMinMeasuredRuns = 2;
  static constexpr int64_t kMaxExplorations = 4;
};

/// values[i] = the largest values[i] over the ranks of `communicator`, the
/// values on the host: directly on a host communicator; on a device one
/// (NCCL) through a small buffer of `backend`'s memory (copied in, reduced,
/// waited for, copied back). The ranks' agreements of the automatic choice
/// (profile, measured times) go through it.
Status allReduceMaxOnHost(Communicator &communicator, Backend &backend,
                          int32_t *values, int64_t count,
                          std::string_view what);

/// Parses RuntimeOptions::variant text (FLEX_VARIANT): a variant name, or a
/// decimal index. Returns the index, or -1 when `text` names no variant of
/// `plan`.
int64_t resolveVariant(const Plan &plan, std::string_view text);

} // namespace flex

#endif // FLEX_RUNTIME_EXECUTOR_H
