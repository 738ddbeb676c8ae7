//===- ActivationBackwardFusionTest.cpp - Backward-fused variants ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests --moert-fuse-activation-backward through the whole path:
// random FFN (each activation, with and without biases) and gated bf16 and
// f16 training layers, every capacity mode, are compiled with
// fuse_activation_backward (and the other fusions), on one rank and two
// (pipelined, and with the experts gathered), and the runtime runs every
// variant on the CPU. grouped_gemm_activation_backward and
// grouped_gemm_glu_backward compute bit for bit the GEMM and the
// activation_backward or glu_backward they replace, so each
// `<v>+act_backward` variant must give v's bytes in every output and
// gradient; both must match the independent fp64 reference within the
// dtype's tolerance.
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
constexpr const char *kSuffix = "+act_backward";

TEST(ActivationBackwardFusion, FusedVariantsEqualTheUnfusedOnesAndTheReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int kCases = 24;
  const Activation activations[] = {Activation::Relu, Activation::Gelu,
                                    Activation::Silu};
  for (int i = 0; i < kCases; ++i) {
    // Every fourth layer gated (SwiGLU), the others FFN with each
    // activation.
    const bool gated = i % 4 == 3;
    LayerConfig config = randomFusionLayer(
        rng, {.experts = {2, 8},
              .capacityModes = {CapacityMode::Fixed, CapacityMode::Dropless,
                                CapacityMode::Bounded},
              .expertKinds = {gated ? ExpertKind::Gated : ExpertKind::FFN},
              .activations = {gated ? Activation::Silu : activations[i % 3]}});
    CompileOptions options;
    options.training = true;
    options.fuseDispatch = true;
    options.fuseActivationBackward = true;
    SCOPED_TRACE("case " + std::to_string(i) + " " + describeLayer(config) +
                 " " + std::string(toString(config.dtype)) + " activation " +
                 std::to_string(static_cast<int>(config.activation)) +
                 (config.bias ? " bias" : ""));
    Plan plan;
    ASSERT_TRUE(compileLayer(config, options, plan));
    // A fixed capacity is laid out padded (no gather-fused variant); the
    // others ragged. A gated layer's variants get glu-fused copies; every
    // variant then gets its backward-fused copy, after them all.
    std::vector<std::string> want = {"single"};
    if (config.capacityMode != CapacityMode::Fixed)
      want.push_back("single+gather");
    if (gated)
      for (size_t v = 0, n = want.size(); v < n; ++v)
        want.push_back(want[v] + "+glu");
    for (size_t v = 0, n = want.size(); v < n; ++v)
      want.push_back(want[v] + kSuffix);
    ASSERT_EQ(variantNames(plan), want);
    const StepOp fusedOp = gated ? StepOp::GroupedGemmGluBackward
                                 : StepOp::GroupedGemmActivationBackward;
    const StepOp unfusedOp =
        gated ? StepOp::GluBackward : StepOp::ActivationBackward;
    for (size_t v = 0; v < want.size(); ++v) {
      const bool fused = v >= want.size() / 2;
      EXPECT_EQ(countSteps(plan.variants[v].backward, fusedOp), fused ? 1 : 0);
      EXPECT_EQ(countSteps(plan.variants[v].backward, unfusedOp),
                fused ? 0 : 1);
    }

    RankInputs inputs;
    reference::ReferenceOptions refOptions;
    ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 1, rng, inputs));
    EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, kSuffix, kGradLAux),
              int(want.size()) / 2);
  }
}

TEST(ActivationBackwardFusion, PipelinedAndGatheredVariantsOnTwoRanks) {
  // Two ranks, a fixed capacity (padded): r1d2 exchanges tokens in two
  // chunks, each with its own fused step; r0d1 gathers the experts, the
  // fused step reading the gathered w2.
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (Activation activation :
       {Activation::Gelu, Activation::Relu, Activation::Silu}) {
    // Silu here: the gated (SwiGLU) layer.
    const bool gated = activation == Activation::Silu;
    for (DType dtype : {DType::BF16, DType::F16}) {
      LayerConfig config;
      config.tokens = 12;
      config.modelDim = 16;
      config.hiddenDim = 24;
      config.experts = 4;
      config.topK = 2;
      config.capacityMode = CapacityMode::Fixed;
      config.capacityFactor = 1.5;
      config.expertKind = gated ? ExpertKind::Gated : ExpertKind::FFN;
      config.activation = activation;
      config.bias = activation == Activation::Relu;
      config.dtype = dtype;
      config.routerFp32 = true;
      SCOPED_TRACE(std::string(toString(dtype)) + " activation " +
                   std::to_string(static_cast<int>(activation)));
      CompileOptions options;
      options.training = true;
      options.ranks = 2;
      options.variants = {"r1d2", "r0d1"};
      options.fuseGlu = false;
      options.fuseActivationBackward = true;
      Plan plan;
      ASSERT_TRUE(compileLayer(config, options, plan));
      ASSERT_EQ(variantNames(plan),
                (std::vector<std::string>{"r1d2", "r0d1", "r1d2+act_backward",
                                          "r0d1+act_backward"}));
      const StepOp fusedOp = gated ? StepOp::GroupedGemmGluBackward
                                   : StepOp::GroupedGemmActivationBackward;
      EXPECT_EQ(countSteps(plan.variants[2].backward, fusedOp), 2);
      EXPECT_EQ(
          countSteps(plan.variants[2].backward,
                     gated ? StepOp::GluBackward : StepOp::ActivationBackward),
          0);
      EXPECT_EQ(countSteps(plan.variants[3].backward, fusedOp), 1);

      RankInputs inputs;
      reference::ReferenceOptions refOptions;
      for (const Step &step : plan.variants[0].forward)
        if (step.op == StepOp::Gate)
          refOptions.capacityAlignment = step.attrs.capacityAlignment;
      ASSERT_TRUE(makeRankInputs(plan.layer, refOptions, 2, rng, inputs));
      EXPECT_EQ(expectFusedVariantsMatch(plan, inputs, kSuffix, kGradLAux), 2);
    }
  }
}

} // namespace
