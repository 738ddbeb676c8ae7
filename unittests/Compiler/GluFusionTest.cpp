//===- GluFusionTest.cpp - The glu-fused variants, end to end -------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests --moert-fuse-glu through the whole path: random gated
// (SwiGLU) bf16 and f16 layers are compiled with fuse_glu (and
// fuse_dispatch), for training and inference, on one rank (padded and
// ragged, gathered or not) and on two (pipelined, and with the experts
// gathered), and the runtime runs every variant on the CPU. grouped_gemm_glu
// computes bit for bit the two GEMMs and the glu it replaces, so each
// `<v>+glu` variant must give v's bytes in every output; both must match
// the independent fp64 reference within the dtype's tolerance.
//
//===----------------------------------------------------------------------===//

#include "FusedVariantsMatch.h"
#include "FusionTestSupport.h"
#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <random>

using namespace flex;
using namespace flex::test;

namespace {

constexpr double kGradLAux = 0.5;

/// A random small gated (SwiGLU) layer the pass fuses, any capacity mode.
LayerConfig randomGatedConfig(std::mt19937_64 &rng) {
  return randomFusionLayer(
      rng, {.experts = {2, 8}, // one expert has no routing margin to draw
            .capacityModes = {CapacityMode::Fixed, CapacityMode::Dropless,
                              CapacityMode::Bounded},
            .expertKinds = {ExpertKind::Gated},
            .activations = {Activation::Silu}});
}

/// `config` compiled with both fusions.
::testing::AssertionResult compileFused(const LayerConfig &config,
                                        CompileOptions options, Plan &plan) {
  options.fuseDispatch = true;
  options.fuseGlu = true;
  return compileLayer(config, options, plan);
}

TEST(GluFusion, FusedVariantsEqualTheUnfusedOnesAndTheReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int kCases = 24;
  for (int i = 0; i < kCases; ++i) {
    LayerConfig config = randomGatedConfig(rng);
    CompileOptions options;
    options.training = i % 2 == 0;
    SCOPED_TRACE("case " + std::to_string(i) + " " + describeLayer(config) +
                 " " + std::string(toString(config.dtype)) +
                 (options.training ? " training" : " inference"));
    Plan plan;
    ASSERT_TRUE(compileFused(config, options, plan));
    // A fixed capacity is laid out padded (no gather-fused variant); the
    // others ragged. Every variant gets its glu-fused copy, after them all.
    const std::vector<std::string> want =
        config.capacityMode == CapacityMode::Fixed
            ? std::vector<std::string>{"single", "single+glu"}
            : std::vector<std::string>{"single", "single+gather", "single+glu",
                                       "single+gather+glu"};
    ASSERT_EQ(variantNames(plan), want);
    // Training keeps the products for glu_backward; inference does not.
    for (const Variant &variant : plan.variants)
      for (const Step &step : variant.forward)
        if (step.op == StepOp::GroupedGemmGlu) {
          EXPECT_EQ(step.out(OperandRole::GateIn).isValid(), plan.training)
              << variant.name;
        }

    RankInputs inputs;
    reference::ReferenceOptions refOptions;
    ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 1, rng, inputs));
    EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, "+glu", kGradLAux),
              int(want.size()) / 2);
  }
}

TEST(GluFusion, PipelinedAndGatheredVariantsOnTwoRanks) {
  // Two ranks, a fixed capacity (padded): r1d2 exchanges tokens in two
  // chunks, each with its own fused step sharing gate_in / up_in; r0d1
  // gathers the experts, the fused step reading the gathered w1 and w3.
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (bool training : {true, false}) {
    for (DType dtype : {DType::BF16, DType::F16}) {
      LayerConfig config;
      config.tokens = 12;
      config.modelDim = 16;
      config.hiddenDim = 24;
      config.experts = 4;
      config.topK = 2;
      config.capacityMode = CapacityMode::Fixed;
      config.capacityFactor = 1.5;
      config.expertKind = ExpertKind::Gated;
      config.activation = Activation::Silu;
      config.dtype = dtype;
      config.routerFp32 = true;
      SCOPED_TRACE(std::string(toString(dtype)) +
                   (training ? " training" : " inference"));
      CompileOptions options;
      options.training = training;
      options.ranks = 2;
      options.variants = {"r1d2", "r0d1"};
      Plan plan;
      ASSERT_TRUE(compileFused(config, options, plan));
      ASSERT_EQ(
          variantNames(plan),
          (std::vector<std::string>{"r1d2", "r0d1", "r1d2+glu", "r0d1+glu"}));
      auto count = [](const Variant &variant, StepOp op) {
        return std::count_if(variant.forward.begin(), variant.forward.end(),
                             [&](const Step &step) { return step.op == op; });
      };
      EXPECT_EQ(count(plan.variants[2], StepOp::GroupedGemmGlu), 2);
      EXPECT_EQ(count(plan.variants[2], StepOp::Glu), 0);
      EXPECT_EQ(count(plan.variants[3], StepOp::GroupedGemmGlu), 1);

      RankInputs inputs;
      reference::ReferenceOptions refOptions;
      for (const Step &step : plan.variants[0].forward)
        if (step.op == StepOp::Gate)
          refOptions.capacityAlignment = step.attrs.capacityAlignment;
      ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 2, rng, inputs));
      EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, "+glu", kGradLAux), 2);
    }
  }
}

} // namespace
