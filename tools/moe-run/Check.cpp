//===- Check.cpp - moe-run --check: the run against the fp64 reference ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --check: the fp64 reference (lib/Reference) runs on
// the same (rounded) inputs with the variant's gate attributes, and every
// output and gradient is compared by relative L2 against [num-1]'s
// tolerance. On W ranks it is the one-rank layer on this rank's tokens with
// the global weights, and each result is the worst over ranks.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Reference/PlanCheck.h"
#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/ExpertSlices.h"

#include <cmath>
#include <limits>

using namespace flex;
using namespace flex::moerun;

namespace {

/// The reference's forward (and with --train backward) of this rank's tokens
/// with the global weights. With per-rank capacity that is exactly what the
/// W-rank layer computes for these tokens.
void runReference(const Options &options, LayerRun &run,
                  reference::LayerForward &forward,
                  reference::LayerGradients &grads) {
  auto valuesOf = [&](const char *name) {
    ArgumentBuffer *arg = run.find(name);
    return arg ? arg->values() : std::vector<double>();
  };
  // Every rank's slice of an expert weight, gathered.
  auto global = [&](const char *name) {
    return run.world > 1
               ? assembleExpertParameter(run.plan.layer, run.world, name,
                                         ranks.gather(valuesOf(name)))
               : valuesOf(name);
  };
  LayerConfig config;
  reference::ReferenceOptions refOptions;
  reference::configureForVariant(run.plan, run.variant, config, refOptions);
  reference::LayerInputs inputs;
  inputs.x = valuesOf("x");
  inputs.wg = valuesOf("wg");
  inputs.w1 = global("w1");
  inputs.b1 = global("b1");
  inputs.w2 = global("w2");
  inputs.b2 = global("b2");
  inputs.w3 = global("w3");
  if (options.train) {
    grads = reference::referenceBackward(config, inputs, valuesOf("grad_out"),
                                         valuesOf("grad_l_aux").at(0),
                                         refOptions, &forward);
  } else {
    forward = reference::referenceForward(config, inputs, refOptions);
  }
  run.check.routingMargin =
      reference::routingMargins(config, forward.routing).logitGap;
  // An expert weight's gradient sums over every rank's tokens: the
  // reference's, summed over ranks, in this rank's slice. A b2 replicated
  // over the shards of an expert gets its whole gradient on each of them.
  auto expertGradient = [&](const char *name, std::vector<double> grad) {
    if (run.world == 1 || grad.empty())
      return grad;
    ranks.sumInPlace(grad);
    return sliceExpertParameter(run.plan.layer, run.world, ranks.rank, name,
                                grad);
  };
  grads.w1 = expertGradient("w1", grads.w1);
  grads.b1 = expertGradient("b1", grads.b1);
  grads.w2 = expertGradient("w2", grads.w2);
  grads.b2 = expertGradient("b2", grads.b2);
  grads.w3 = expertGradient("w3", grads.w3);
}

} // namespace

void flex::moerun::checkAgainstReference(const Options &options,
                                         LayerRun &run) {
  CheckReport &check = run.check;
  check.tolerance =
      reference::layerTolerance(static_cast<DType>(run.layer.dtype));
  reference::LayerForward forward;
  reference::LayerGradients grads;
  runReference(options, run, forward, grads);
  auto values = [&](const char *name) {
    ArgumentBuffer *arg = run.find(name);
    return arg ? arg->values() : std::vector<double>();
  };
  for (const reference::OutputCheck &result :
       reference::compareOutputs(values, forward,
                                 options.train ? &grads : nullptr,
                                 check.tolerance))
    check.results.push_back({result.name, result.error, result.pass});
  // Each result is the worst over ranks (NaN counts as infinite).
  std::vector<double> worst;
  for (const CheckResult &result : check.results)
    worst.push_back(std::isnan(result.error)
                        ? std::numeric_limits<double>::infinity()
                        : result.error);
  worst.push_back(-check.routingMargin);
  ranks.maxInPlace(worst);
  check.routingMargin = -worst.back();
  for (size_t i = 0; i < check.results.size(); ++i) {
    check.results[i].error = worst[i];
    check.results[i].pass = worst[i] <= check.tolerance;
    check.failed |= !check.results[i].pass;
  }
}
