//===- CompileAndRunTest.cpp - Compile random layers, run, compare --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the whole path a user takes: a layer configuration becomes
// moe IR, the compiler lowers it to a plan (in either expert layout), the
// runtime loads the plan and runs forward and backward on the CPU, and every
// output and gradient matches the independent fp64 reference. The kernels
// are tested alone elsewhere; here a wrong lowering, memory plan (two live
// buffers sharing bytes) or plan file would show.
//
//===----------------------------------------------------------------------===//

#include "ReferenceMoE.h"

#include "flex/Compiler/Compiler.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>

using namespace flex;
using namespace flex::reference;

namespace {

uint64_t runSeed() {
  if (const char *fixed = std::getenv("FLEX_TEST_SEED"))
    return std::strtoull(fixed, nullptr, 10);
  return std::random_device{}();
}

/// A random small layer: every capacity mode, expert kind, activation, bias,
/// routing option, with T rarely a multiple of E.
LayerConfig randomConfig(std::mt19937_64 &rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  LayerConfig c;
  c.experts = pick(0, 3) == 0 ? pick(17, 64) : pick(1, 16);
  c.topK = std::min<int64_t>(pick(1, 4), c.experts);
  c.tokens = pick(1, 48);
  c.modelDim = pick(2, 12);
  c.hiddenDim = pick(2, 12);
  c.capacityMode = static_cast<CapacityMode>(pick(0, 2));
  // Factors below 1 drop tokens; above 1 pad.
  c.capacityFactor = std::uniform_real_distribution<double>(0.25, 2.5)(rng);
  c.expertKind = pick(0, 3) == 0 ? ExpertKind::Gated : ExpertKind::FFN;
  c.activation = static_cast<Activation>(pick(0, 2));
  c.bias = c.expertKind == ExpertKind::FFN && pick(0, 1);
  c.dtype = DType::F32;
  c.routerFp32 = true;
  c.batchPrioritized = pick(0, 1);
  c.normalizeGate = pick(0, 1);
  c.seed = rng();
  return c;
}

/// Resamples tokens until no routing decision is closer to a tie than fp32
/// rounding could move it, so the runtime and the reference route alike.
bool separateRouting(const LayerConfig &config, LayerInputs &in,
                     std::mt19937_64 &rng) {
  std::normal_distribution<double> normal;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    RoutingMargins m =
        routingMargins(config, referenceForward(config, in).routing);
    int64_t token = -1;
    if (m.logitGap < 1e-4)
      token = m.logitGapToken;
    else if (config.experts > 1 && m.priorityGap < 1e-6)
      token = m.priorityGapToken;
    if (token < 0)
      return true;
    for (int64_t i = 0; i < config.modelDim; ++i)
      in.x[token * config.modelDim + i] = normal(rng);
  }
  return false;
}

std::vector<float> toFloat(const std::vector<double> &values) {
  return std::vector<float>(values.begin(), values.end());
}

std::vector<double> toDouble(const std::vector<float> &values) {
  return std::vector<double>(values.begin(), values.end());
}

struct Buffers {
  std::map<std::string, std::vector<float>> byName;

  void set(const std::string &name, const std::vector<double> &values) {
    byName[name] = toFloat(values);
  }
  /// Output buffers start as NaN: an element no step writes cannot pass.
  void poison(const std::string &name, size_t count) {
    byName[name].assign(count, std::numeric_limits<float>::quiet_NaN());
  }
  std::vector<Binding> bindings() {
    std::vector<Binding> result;
    for (auto &[name, values] : byName)
      result.push_back({name, values.data(),
                        int64_t(values.size() * sizeof(float))});
    return result;
  }
};

TEST(CompileAndRun, RandomLayersMatchReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int kCases = 200;
  constexpr double kTolerance = 1e-5; // [num-1], f32
  int compiled = 0;
  for (int i = 0; i < kCases; ++i) {
    LayerConfig config = randomConfig(rng);
    std::string layout = std::array{"auto", "padded", "ragged"}[rng() % 3];
    std::string describe =
        "case " + std::to_string(i) + " T=" + std::to_string(config.tokens) +
        " d=" + std::to_string(config.modelDim) +
        " h=" + std::to_string(config.hiddenDim) +
        " E=" + std::to_string(config.experts) +
        " k=" + std::to_string(config.topK) + " " +
        std::string(toString(config.capacityMode)) + "(" +
        std::to_string(config.capacityFactor) + ") " +
        std::string(toString(config.expertKind)) + " " +
        std::string(toString(config.activation)) +
        (config.bias ? " bias" : "") +
        (config.batchPrioritized ? " bpr" : "") +
        (config.normalizeGate ? " norm" : "") + " layout=" + layout;
    SCOPED_TRACE(describe);

    // [cap-1]: a capacity of 0 would drop every token; the compiler says so.
    int64_t perExpert = (config.tokens + config.experts - 1) / config.experts;
    if (config.capacityMode != CapacityMode::Dropless &&
        config.topK * int64_t(config.capacityFactor * perExpert) == 0) {
      std::string planJson, error;
      EXPECT_FALSE(compileLayerToPlan(layerConfigToMlir(config), {}, planJson,
                                      error));
      EXPECT_NE(error.find("gives capacity 0"), std::string::npos) << error;
      ++compiled;
      continue;
    }

    // Compile.
    CompileOptions options;
    options.training = true;
    options.layout = layout;
    std::string planJson, error;
    ASSERT_TRUE(compileLayerToPlan(layerConfigToMlir(config), options,
                                   planJson, error))
        << error;
    auto plan = std::make_shared<Plan>();
    // The compiler's memory plan must never let live buffers share bytes.
    Status loaded = parsePlan(planJson, *plan, {/*checkWorkspaceOverlap=*/true});
    ASSERT_TRUE(loaded.isOk()) << loaded.message();
    std::unique_ptr<Executor> executor;
    Status created = Executor::create(plan, createCpuBackend(), executor);
    ASSERT_TRUE(created.isOk()) << created.message();
    ++compiled;

    // Inputs and the reference.
    LayerInputs in = makeRandomInputs(config, rng);
    ASSERT_TRUE(separateRouting(config, in, rng));
    std::vector<double> gradOut(config.tokens * config.modelDim);
    std::normal_distribution<double> normal;
    for (double &v : gradOut)
      v = normal(rng);
    const double gradLAux = 0.5;
    // The runtime computes in fp32 from fp32 inputs: the reference sees the
    // same rounded values.
    auto asF32 = [](std::vector<double> v) { return toDouble(toFloat(v)); };
    for (std::vector<double> *v :
         {&in.x, &in.wg, &in.w1, &in.b1, &in.w2, &in.b2, &in.w3})
      *v = asF32(*v);
    gradOut = asF32(gradOut);
    LayerForward want;
    LayerGradients wantGrads =
        referenceBackward(config, in, gradOut, gradLAux, {}, &want);

    // Forward.
    Buffers forward;
    forward.set("x", in.x);
    forward.set("wg", in.wg);
    forward.set("w1", in.w1);
    forward.set("w2", in.w2);
    if (config.bias) {
      forward.set("b1", in.b1);
      forward.set("b2", in.b2);
    }
    if (config.expertKind == ExpertKind::Gated)
      forward.set("w3", in.w3);
    forward.poison("out", in.x.size());
    forward.poison("l_aux", 1);
    std::vector<Binding> bindings = forward.bindings();
    Status ran = executor->forward(bindings.data(), bindings.size());
    ASSERT_TRUE(ran.isOk()) << ran.message();
    EXPECT_LE(relativeL2(toDouble(forward.byName["out"]), want.out),
              kTolerance);
    EXPECT_LE(relativeL2(toDouble(forward.byName["l_aux"]), {want.lAux}),
              kTolerance);

    // Backward: the inputs again, grad_out, and poisoned gradients.
    Buffers backward = forward;
    backward.byName.erase("out");
    backward.byName.erase("l_aux");
    backward.set("grad_out", gradOut);
    backward.set("grad_l_aux", {gradLAux});
    struct Grad {
      const char *name;
      const std::vector<double> &want;
    };
    std::vector<Grad> grads = {{"grad_x", wantGrads.x},
                               {"grad_wg", wantGrads.wg},
                               {"grad_w1", wantGrads.w1},
                               {"grad_w2", wantGrads.w2}};
    if (config.bias) {
      grads.push_back({"grad_b1", wantGrads.b1});
      grads.push_back({"grad_b2", wantGrads.b2});
    }
    if (config.expertKind == ExpertKind::Gated)
      grads.push_back({"grad_w3", wantGrads.w3});
    for (const Grad &g : grads)
      backward.poison(g.name, g.want.size());
    bindings = backward.bindings();
    ran = executor->backward(bindings.data(), bindings.size());
    ASSERT_TRUE(ran.isOk()) << ran.message();
    for (const Grad &g : grads) {
      // A gradient that is exactly zero (every slot dropped) compares
      // absolutely: relative L2 needs a floor there.
      double floor = normL2(g.want) == 0.0 ? 1.0 : 0.0;
      EXPECT_LE(relativeL2(toDouble(backward.byName[g.name]), g.want, floor),
                kTolerance)
          << "[grad-1] " << g.name;
    }
  }
  EXPECT_EQ(compiled, kCases);
}

TEST(CompileAndRun, InvalidConfigIsAnErrorNotACrash) {
  LayerConfig config;
  config.tokens = 8;
  config.modelDim = 4;
  config.hiddenDim = 4;
  config.experts = 2;
  config.topK = 3; // > E
  std::string planJson, error;
  EXPECT_FALSE(compileLayerToPlan(layerConfigToMlir(config), {}, planJson,
                                  error));
  EXPECT_NE(error.find("[gate-2]"), std::string::npos) << error;
}

} // namespace
