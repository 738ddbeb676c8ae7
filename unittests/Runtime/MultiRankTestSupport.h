//===- MultiRankTestSupport.h - Helpers of the multi-rank tests -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares what the tests that run plans on several ranks share:
// the test plans, W ranks as W threads with local communicators, typed host
// buffers of a plan's arguments, per-rank inputs and the fp64 reference per
// rank, and a CPU executor per rank. Host-only, so the GPU tests use it too.
//
//===----------------------------------------------------------------------===//

#ifndef UNITTESTS_RUNTIME_MULTIRANKTESTSUPPORT_H
#define UNITTESTS_RUNTIME_MULTIRANKTESTSUPPORT_H

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/Plan.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace flex::test {

/// The text of unittests/Runtime/plans/<name>.
std::string readTestPlan(const std::string &name);

/// FLEX_TEST_SEED when set (to replay a failure), else a fresh random seed.
uint64_t runSeed();

//===----------------------------------------------------------------------===//
// Ranks on threads
//===----------------------------------------------------------------------===//

/// Runs fn(rank) on `size` threads and joins them.
void onRanks(int size, const std::function<void(int)> &fn);

/// `size` local (thread) communicators; a failure to make them fails the test.
std::vector<std::shared_ptr<Communicator>> localRanks(int size,
                                                      double timeout = 30);

//===----------------------------------------------------------------------===//
// Host buffers of a plan's arguments
//===----------------------------------------------------------------------===//

/// Element i of `bytes` as `type` (i32 truncates `value`).
void storeValue(std::vector<uint8_t> &bytes, DType type, int64_t i,
                double value);
/// Element i of `bytes` as `type`.
double loadValue(const std::vector<uint8_t> &bytes, DType type, int64_t i);

/// The arguments of one rank, by name.
struct RankBuffers {
  std::map<std::string, std::vector<uint8_t>> data;
  const Plan *plan = nullptr;

  const Argument &arg(const std::string &name) const {
    return plan->arguments[plan->findArgument(name)];
  }
  bool has(const std::string &name) const {
    return plan->findArgument(name) >= 0;
  }
  /// Zeroed arguments, outputs poisoned.
  void init(const Plan &p);
  /// Outputs start as NaN: an element no step writes cannot pass.
  void poison();
  /// Sets `name` if the plan has it (a plan without w3 ignores it).
  void set(const std::string &name, const std::vector<double> &values);
  std::vector<double> get(const std::string &name) const;
  std::vector<Binding> bindings();
};

/// Rank r's experts r*L .. r*L+L-1 of a global [E, ...] parameter (E >= W),
/// sliced here rather than by the runtime, as an independent check of it.
std::vector<double> expertSlice(const std::vector<double> &global, int64_t rank,
                                int64_t world);

//===----------------------------------------------------------------------===//
// Parameterized plan runs
//===----------------------------------------------------------------------===//

struct PlanVariant {
  const char *plan;
  const char *variant;
};

void PrintTo(const PlanVariant &value, std::ostream *os);

/// "<plan>_<variant>" with every other character '_': the gtest name.
std::string planVariantName(const ::testing::TestParamInfo<PlanVariant> &info);

//===----------------------------------------------------------------------===//
// Inputs and the reference per rank
//===----------------------------------------------------------------------===//

/// One global layer and each rank's own tokens and output gradient.
struct RankInputs {
  reference::LayerInputs global;
  std::vector<reference::LayerInputs> inputs; ///< per rank
  std::vector<std::vector<double>> gradOut;   ///< per rank, in the dtype
};

/// Draws each rank's tokens apart, away from routing ties (a tie may route
/// differently in fp32 and fp64); false, with a failure, when none is found.
bool makeRankInputs(const LayerConfig &config,
                    const reference::ReferenceOptions &options, int world,
                    std::mt19937_64 &rng, RankInputs &result);

/// The one-rank layer on each rank's tokens: W ranks with per-rank capacity
/// compute exactly this.
struct RankReference {
  std::vector<reference::LayerForward> forward;
  std::vector<reference::LayerGradients> grads; ///< empty when not training
  /// Expert weight gradients (w1, b1, w2, b2, w3) summed over ranks: every
  /// rank's tokens reach every expert.
  reference::LayerGradients expertSum;
  /// The same sums of |each rank's part|: the scale of the rounding in a sum
  /// of per-rank partial gradients held in bf16/f16 (each part is rounded
  /// before the ranks add them), the floor of a relative error where the
  /// parts cancel (expertFloor).
  reference::LayerGradients expertAbsSum;
};

/// The floor of relativeL2 for an expert gradient summed over ranks: the
/// L2 norm of `absSum` (RankReference::expertAbsSum's slice): rounding each
/// rank's part errs by at most u * |part|, whatever the parts' signs.
double expertFloor(const std::vector<double> &absSum);

/// An expert gradient argument with its sum over ranks and its parts'
/// magnitude (RankReference's), for every expert gradient a plan may have.
struct ExpertGradient {
  const char *name; ///< grad_w1, grad_b1, grad_w2, grad_b2, grad_w3
  const std::vector<double> *sum, *magnitude;
};
std::vector<ExpertGradient> expertGradients(const RankReference &ref);

RankReference referenceOnRanks(const LayerConfig &config,
                               const reference::ReferenceOptions &options,
                               const RankInputs &inputs, double gradLAux,
                               bool training);

/// Rank r's slice of a global expert parameter, by name.
using ExpertSliceFn = std::function<std::vector<double>(
    const char *name, const std::vector<double> &global)>;

/// Rank r's input arguments by name (x, wg, the expert parameters through
/// `slice`, grad_out, grad_l_aux); an absent parameter is empty.
std::map<std::string, std::vector<double>>
rankArgumentValues(const RankInputs &inputs, int r, double gradLAux,
                   const ExpertSliceFn &slice);

/// Every rank's buffers for `plan`, holding its input arguments; rank r's
/// expert parameters through `sliceFor(r)`, or expertSlice when none given.
std::vector<RankBuffers>
makeRankBuffers(const Plan &plan, const RankInputs &inputs, double gradLAux,
                const std::function<ExpertSliceFn(int r)> &sliceFor = {});

//===----------------------------------------------------------------------===//
// Executors on CPU ranks
//===----------------------------------------------------------------------===//

/// One rank's CPU executor and the workspace it runs in.
struct CpuRankExecutor {
  std::unique_ptr<void, void (*)(void *)> workspace{nullptr, std::free};
  std::unique_ptr<Executor> executor;

  /// Every workspace byte starts as `workspaceFill`: 0xff is NaN, so a
  /// padding row that no step zeroes reaches the GEMMs and shows.
  Status create(std::shared_ptr<const Plan> plan,
                std::shared_ptr<Communicator> comm, uint8_t workspaceFill);
};

/// Selects `variant`, runs forward, then backward when `backward`.
Status runVariant(Executor &executor, int64_t variant,
                  std::vector<Binding> &bindings, bool backward);

//===----------------------------------------------------------------------===//
// Plans written here
//===----------------------------------------------------------------------===//

/// A one-rank SwiGLU inference plan of `layer` (gated, silu, no bias; its
/// capacity mode, dtype and sizes), written here rather than by the
/// compiler, for shapes no checked-in plan has: router, gate (`layout`),
/// dispatch (with `gathered`: dispatch_rows, and the first GEMMs read x
/// through row_tokens), the w1 and w3 GEMMs, glu, the w2 GEMM, combine.
/// Every workspace buffer has bytes of its own.
std::string swigluInferencePlan(const LayerConfig &layer, DispatchLayout layout,
                                bool gathered);

/// `plan` with each forward glu and the two grouped_gemm steps that write
/// its gate_in and up_in made one grouped_gemm_glu in the glu's place (as a
/// `<v>+glu` variant of --moert-fuse-glu runs it); with `keepProducts` it
/// writes their buffers as gate_in and up_in. Recorded facts are dropped
/// (the loader derives them). Returns the number of steps made.
int fuseGluSteps(nlohmann::ordered_json &plan, bool keepProducts);

/// Fuses each activation_backward (glu_backward) of every variant's backward
/// with the grouped_gemm before it writing its grad into one
/// grouped_gemm_activation_backward (grouped_gemm_glu_backward) in its place
/// (as --moert-fuse-activation-backward would; the grad buffer stays
/// declared).
/// Drops every step's facts, as fuseGluSteps, and gives every workspace
/// buffer bytes of its own. Returns the steps fused.
int fuseActivationBackwardSteps(nlohmann::ordered_json &plan);

//===----------------------------------------------------------------------===//
// Loader rules
//===----------------------------------------------------------------------===//

/// Parses plan `name` after `edit`, expecting InvalidPlan with `what` in the
/// message.
void expectRejectedAfterEdit(
    const std::string &name,
    const std::function<void(nlohmann::ordered_json &)> &edit,
    const std::string &what);

} // namespace flex::test

#endif // UNITTESTS_RUNTIME_MULTIRANKTESTSUPPORT_H
