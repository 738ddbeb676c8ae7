//===- CombineFusionTest.cpp - Combine-fused variants ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests --moert-fuse-combine through the whole path: random FFN
// (each activation, with and without biases) and gated bf16 and f16
// layers, inference and training, every capacity mode, are compiled with
// fuse_combine (and the other fusions), and the runtime runs every variant
// on the CPU. grouped_gemm_combine computes bit for bit the GEMM and the
// combine it replaces, so each `<v>+combine` variant must give v's bytes in
// every output (and gradient); both must match the independent fp64
// reference within the dtype's tolerance. On two ranks, the combine reads
// rows an all_to_all brought: no variant is fused.
//
//===----------------------------------------------------------------------===//

#include "FusedVariantsMatch.h"
#include "FusionTestSupport.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <random>

using namespace flex;
using namespace flex::test;

namespace {

constexpr double kGradLAux = 0.5;
constexpr const char *kSuffix = "+combine";

const Step *findStep(const std::vector<Step> &steps, StepOp op) {
  auto it = std::find_if(steps.begin(), steps.end(),
                         [&](const Step &step) { return step.op == op; });
  return it == steps.end() ? nullptr : &*it;
}

TEST(CombineFusion, FusedVariantsEqualTheUnfusedOnesAndTheReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int kCases = 24;
  const Activation activations[] = {Activation::Relu, Activation::Gelu,
                                    Activation::Silu};
  for (int i = 0; i < kCases; ++i) {
    // Every fourth layer gated (SwiGLU); every other one training.
    const bool gated = i % 4 == 3, training = i % 2 == 1;
    LayerConfig config = randomFusionLayer(
        rng, {.experts = {2, 8},
              .capacityModes = {CapacityMode::Fixed, CapacityMode::Dropless,
                                CapacityMode::Bounded},
              .expertKinds = {gated ? ExpertKind::Gated : ExpertKind::FFN},
              .activations = {gated ? Activation::Silu : activations[i % 3]}});
    CompileOptions options;
    options.training = training;
    options.fuseDispatch = true;
    options.fuseCombine = true;
    SCOPED_TRACE("case " + std::to_string(i) + " " + describeLayer(config) +
                 " " + std::string(toString(config.dtype)) +
                 (training ? " training" : " inference") +
                 (config.bias ? " bias" : ""));
    Plan plan;
    ASSERT_TRUE(compileLayer(config, options, plan));
    // A fixed capacity is laid out padded (no gather-fused variant); the
    // others ragged. A gated layer's variants get glu-fused copies; every
    // variant then gets its combine-fused copy, after them all.
    std::vector<std::string> want = {"single"};
    if (config.capacityMode != CapacityMode::Fixed)
      want.push_back("single+gather");
    if (gated)
      for (size_t v = 0, n = want.size(); v < n; ++v)
        want.push_back(want[v] + "+glu");
    for (size_t v = 0, n = want.size(); v < n; ++v)
      want.push_back(want[v] + kSuffix);
    ASSERT_EQ(variantNames(plan), want);
    for (size_t v = 0; v < want.size(); ++v) {
      SCOPED_TRACE(want[v]);
      const std::vector<Step> &forward = plan.variants[v].forward;
      const bool fused = v >= want.size() / 2;
      EXPECT_EQ(countSteps(forward, StepOp::GroupedGemmCombine), fused ? 1 : 0);
      EXPECT_EQ(countSteps(forward, StepOp::Combine), fused ? 0 : 1);
      // The fused step takes the variant's row -> token map where it has
      // one (the gather-fused variants).
      if (const Step *step = findStep(forward, StepOp::GroupedGemmCombine)) {
        EXPECT_EQ(step->in(OperandRole::RowTokens).isValid(),
                  findStep(forward, StepOp::DispatchRows) != nullptr);
      }
    }

    RankInputs inputs;
    reference::ReferenceOptions refOptions;
    ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 1, rng, inputs));
    EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, kSuffix, kGradLAux),
              int(want.size()) / 2);
  }
}

TEST(CombineFusion, VariantsOnTwoRanksAreLeftAlone) {
  // r1d1 combines rows an all_to_all brought back and r1d2 pipelines them
  // in chunks; r0d1 gathers the experts, each rank computing its own
  // tokens' rows with one GEMM: only that one is fused.
  LayerConfig config;
  config.tokens = 12;
  config.modelDim = 16;
  config.hiddenDim = 24;
  config.experts = 4;
  config.topK = 2;
  config.capacityMode = CapacityMode::Fixed;
  config.capacityFactor = 1.5;
  config.dtype = DType::BF16;
  config.routerFp32 = true;
  CompileOptions options;
  options.ranks = 2;
  options.variants = {"r1d1", "r1d2", "r0d1"};
  options.fuseCombine = true;
  Plan plan;
  ASSERT_TRUE(compileLayer(config, options, plan));
  EXPECT_EQ(variantNames(plan),
            (std::vector<std::string>{"r1d1", "r1d2", "r0d1", "r0d1+combine"}));

  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  RankInputs inputs;
  reference::ReferenceOptions refOptions;
  for (const Step &step : plan.variants[0].forward)
    if (step.op == StepOp::Gate)
      refOptions.capacityAlignment = step.attrs.capacityAlignment;
  ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 2, rng, inputs));
  EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, kSuffix, kGradLAux), 1);
}

} // namespace
