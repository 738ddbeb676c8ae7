//===- FusionTestSupport.h - What the fusion tests share --------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines what the end-to-end tests of the fusion passes share:
// random small bf16/f16 layers of the sizes the fused kernels take, the
// words that name one in a trace, compiling one to a plan, and what a plan's
// variants hold.
//
//===----------------------------------------------------------------------===//

#ifndef UNITTESTS_COMPILER_FUSIONTESTSUPPORT_H
#define UNITTESTS_COMPILER_FUSIONTESTSUPPORT_H

#include "flex/Compiler/Compiler.h"
#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/PlanLoader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace flex::test {

/// The plan's variant names, in order.
inline std::vector<std::string> variantNames(const Plan &plan) {
  std::vector<std::string> names;
  for (const Variant &variant : plan.variants)
    names.push_back(variant.name);
  return names;
}

/// How many of `steps` are `op`.
inline int64_t countSteps(const std::vector<Step> &steps, StepOp op) {
  return std::count_if(steps.begin(), steps.end(),
                       [&](const Step &step) { return step.op == op; });
}

/// What a fusion test draws its layers from; each list is drawn from
/// uniformly (a choice listed twice is twice as likely), a list of one
/// without a draw.
struct FusionLayerSpace {
  std::pair<int64_t, int64_t> experts; ///< inclusive
  std::vector<CapacityMode> capacityModes;
  std::vector<ExpertKind> expertKinds;
  std::vector<Activation> activations;
};

/// A random small layer from `space` that the fused kernels take: bf16 or
/// f16, d and h multiples of 8 (their 16-byte vector loads), T <= 40,
/// k <= 3, a capacity factor >= 1 (never capacity 0, [cap-1]), a bias for
/// half the FFN layers, the router in fp32.
inline LayerConfig randomFusionLayer(std::mt19937_64 &rng,
                                     const FusionLayerSpace &space) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto choose = [&](const auto &choices) {
    return choices.size() == 1
               ? choices.front()
               : choices[pick(0, static_cast<int64_t>(choices.size()) - 1)];
  };
  LayerConfig c;
  c.experts = pick(space.experts.first, space.experts.second);
  c.topK = std::min<int64_t>(pick(1, 3), c.experts);
  c.tokens = pick(1, 40);
  c.modelDim = 8 * pick(1, 3);
  c.hiddenDim = 8 * pick(1, 3);
  c.capacityMode = choose(space.capacityModes);
  c.capacityFactor = std::uniform_real_distribution<double>(1.0, 2.0)(rng);
  c.expertKind = choose(space.expertKinds);
  c.activation = choose(space.activations);
  c.bias = c.expertKind == ExpertKind::FFN && pick(0, 1);
  c.dtype = pick(0, 1) ? DType::BF16 : DType::F16;
  c.routerFp32 = true;
  c.batchPrioritized = pick(0, 1);
  c.normalizeGate = pick(0, 1);
  c.seed = rng();
  return c;
}

/// "T=.. d=.. h=.. E=.. k=.. <capacity mode>", for SCOPED_TRACE.
inline std::string describeLayer(const LayerConfig &c) {
  return "T=" + std::to_string(c.tokens) + " d=" + std::to_string(c.modelDim) +
         " h=" + std::to_string(c.hiddenDim) +
         " E=" + std::to_string(c.experts) + " k=" + std::to_string(c.topK) +
         " " + std::string(toString(c.capacityMode));
}

/// `config` compiled with `options` to plan JSON.
inline ::testing::AssertionResult compileLayer(const LayerConfig &config,
                                               const CompileOptions &options,
                                               std::string &planJson) {
  std::string error;
  if (!compileLayerToPlan(layerConfigToMlir(config), options, planJson, error))
    return ::testing::AssertionFailure() << error;
  return ::testing::AssertionSuccess();
}

/// `config` compiled with `options` and loaded.
inline ::testing::AssertionResult compileLayer(const LayerConfig &config,
                                               const CompileOptions &options,
                                               Plan &plan) {
  std::string planJson;
  if (::testing::AssertionResult compiled =
          compileLayer(config, options, planJson);
      !compiled)
    return compiled;
  if (Status parsed = parsePlan(planJson, plan); !parsed)
    return ::testing::AssertionFailure() << parsed.message();
  return ::testing::AssertionSuccess();
}

} // namespace flex::test

#endif // UNITTESTS_COMPILER_FUSIONTESTSUPPORT_H
