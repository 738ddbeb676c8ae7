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

#include "MultiRankTestSupport.h"

#include "flex-c/Flex.h"
#include "flex-c/FlexCompiler.h"
#include "flex/Compiler/Compiler.h"
#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <thread>

using namespace flex;
using namespace flex::reference;
using flex::test::expertSlice;
using flex::test::runSeed;
using flex::test::runVariant;

namespace {

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
      result.push_back(
          {name, values.data(), int64_t(values.size() * sizeof(float))});
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
        (config.bias ? " bias" : "") + (config.batchPrioritized ? " bpr" : "") +
        (config.normalizeGate ? " norm" : "") + " layout=" + layout;
    SCOPED_TRACE(describe);

    // [cap-1]: a capacity of 0 would drop every token; the compiler says so.
    int64_t perExpert = (config.tokens + config.experts - 1) / config.experts;
    if (config.capacityMode != CapacityMode::Dropless &&
        config.topK * int64_t(config.capacityFactor * perExpert) == 0) {
      std::string planJson, error;
      EXPECT_FALSE(
          compileLayerToPlan(layerConfigToMlir(config), {}, planJson, error));
      EXPECT_NE(error.find("gives capacity 0"), std::string::npos) << error;
      ++compiled;
      continue;
    }

    // Compile.
    CompileOptions options;
    options.training = true;
    options.layout = layout;
    std::string planJson, error;
    ASSERT_TRUE(
        compileLayerToPlan(layerConfigToMlir(config), options, planJson, error))
        << error;
    auto plan = std::make_shared<Plan>();
    // The compiler's memory plan must never let live buffers share bytes.
    Status loaded = parsePlan(planJson, *plan);
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

// DESIGN.md section 4: every variant of a multi-rank plan reads one
// parameter layout, so one executable per rank switches variant between two
// calls with the same bindings (no parameter moves), every variant equals
// the single-rank layer on each rank's tokens, and the inputs stay intact.
TEST(CompileAndRun, VariantsShareOneLayoutAndAgree) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (CapacityMode mode : {CapacityMode::Fixed, CapacityMode::Dropless}) {
    LayerConfig config;
    config.tokens = 13;
    config.modelDim = 6;
    config.hiddenDim = 5;
    config.experts = 4;
    config.topK = 2;
    config.capacityMode = mode;
    config.capacityFactor = 1.0;
    config.activation = Activation::Gelu;
    config.bias = true;
    config.normalizeGate = true;
    const int W = 2;
    CompileOptions options;
    options.training = true;
    options.ranks = W;
    options.variants = {"r1d1", "r1d2", "r0d1"};
    std::string planJson, error;
    ASSERT_TRUE(
        compileLayerToPlan(layerConfigToMlir(config), options, planJson, error))
        << error;
    auto plan = std::make_shared<Plan>();
    Status loaded = parsePlan(planJson, *plan);
    ASSERT_TRUE(loaded.isOk()) << loaded.message();
    ASSERT_EQ(plan->variants.size(), 3u);
    // Every variant aligned the capacity to every degree (2): the reference
    // must use the same C.
    reference::ReferenceOptions refOptions;
    refOptions.capacityAlignment = 2;

    // The global layer, each rank's tokens, the reference per rank.
    LayerInputs global = makeRandomInputs(config, rng);
    std::vector<LayerInputs> rankInputs(W);
    std::vector<std::vector<double>> gradOut(W);
    std::vector<LayerForward> want(W);
    std::vector<LayerGradients> wantGrads(W);
    std::normal_distribution<double> normal;
    auto asF32 = [](std::vector<double> v) { return toDouble(toFloat(v)); };
    for (std::vector<double> *v :
         {&global.wg, &global.w1, &global.b1, &global.w2, &global.b2})
      *v = asF32(*v);
    for (int r = 0; r < W; ++r) {
      rankInputs[r] = global;
      rankInputs[r].x = makeRandomInputs(config, rng).x;
      ASSERT_TRUE(separateRouting(config, rankInputs[r], rng));
      rankInputs[r].x = asF32(rankInputs[r].x);
      gradOut[r].resize(config.tokens * config.modelDim);
      for (double &g : gradOut[r])
        g = normal(rng);
      gradOut[r] = asF32(gradOut[r]);
      wantGrads[r] = referenceBackward(config, rankInputs[r], gradOut[r], 0.5,
                                       refOptions, &want[r]);
    }

    // One executor per rank, on W threads, every variant in turn on the
    // same bindings.
    std::vector<std::shared_ptr<Communicator>> comms;
    ASSERT_TRUE(createLocalCommunicators(W, comms, 30).isOk());
    std::vector<Buffers> buffers(W);
    std::vector<std::map<std::string, std::vector<float>>> inputsBefore(W);
    for (int r = 0; r < W; ++r) {
      Buffers &b = buffers[r];
      b.set("x", rankInputs[r].x);
      b.set("wg", global.wg);
      b.set("w1", expertSlice(global.w1, r, W));
      b.set("b1", expertSlice(global.b1, r, W));
      b.set("w2", expertSlice(global.w2, r, W));
      b.set("b2", expertSlice(global.b2, r, W));
      b.set("grad_out", gradOut[r]);
      b.set("grad_l_aux", {0.5});
      inputsBefore[r] = b.byName;
    }
    std::vector<std::map<std::string, std::vector<float>>> firstVariant(W);
    std::vector<std::string> failures(W);
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        std::unique_ptr<Executor> executor;
        Status s = Executor::create(plan, createCpuBackend(), executor);
        if (s)
          s = executor->setCommunicator(comms[r]);
        for (size_t v = 0; s && v < plan->variants.size(); ++v) {
          Buffers &b = buffers[r];
          for (const char *name :
               {"out", "l_aux", "grad_x", "grad_wg", "grad_w1", "grad_b1",
                "grad_w2", "grad_b2"}) {
            size_t count =
                name == std::string("l_aux") ? 1
                : name == std::string("out") || name == std::string("grad_x")
                    ? b.byName["x"].size()
                : name == std::string("grad_wg")
                    ? b.byName["wg"].size()
                    : b.byName[std::string(name).substr(5)].size();
            b.poison(name, count);
          }
          std::vector<Binding> bindings = b.bindings();
          s = runVariant(*executor, static_cast<int64_t>(v), bindings,
                         /*backward=*/true);
          if (!s)
            failures[r] = plan->variants[v].name + ": " + s.message();
          // Each variant against the reference on this rank's tokens.
          auto check = [&](const char *name, const std::vector<double> &ref) {
            double error = relativeL2(toDouble(b.byName[name]), ref,
                                      normL2(ref) == 0.0 ? 1.0 : 0.0);
            if (!(error <= 1e-5))
              failures[r] += std::string(" ") + plan->variants[v].name + ":" +
                             name + "=" + std::to_string(error);
          };
          check("out", want[r].out);
          check("l_aux", {want[r].lAux});
          check("grad_x", wantGrads[r].x);
          check("grad_wg", wantGrads[r].wg);
          // Expert gradients: the rank's experts, summed over every rank's
          // tokens.
          auto summed = [&](std::vector<double> LayerGradients::*field) {
            std::vector<double> sum;
            for (int q = 0; q < W; ++q) {
              const std::vector<double> &g = wantGrads[q].*field;
              sum.resize(g.size(), 0.0);
              for (size_t i = 0; i < g.size(); ++i)
                sum[i] += g[i];
            }
            return expertSlice(sum, r, W);
          };
          check("grad_w1", summed(&LayerGradients::w1));
          check("grad_b1", summed(&LayerGradients::b1));
          check("grad_w2", summed(&LayerGradients::w2));
          check("grad_b2", summed(&LayerGradients::b2));
        }
      });
    }
    for (std::thread &thread : threads)
      thread.join();
    for (int r = 0; r < W; ++r) {
      EXPECT_TRUE(failures[r].empty())
          << toString(mode) << " rank " << r << ": " << failures[r];
      // The executor never writes an input: the parameters are where they
      // were, bit for bit, after three variants.
      for (auto &[name, values] : inputsBefore[r])
        EXPECT_EQ(std::memcmp(values.data(), buffers[r].byName[name].data(),
                              values.size() * sizeof(float)),
                  0)
            << name;
    }
  }
}

TEST(CompileAndRun, InvalidConfigIsAnErrorNotACrash) {
  LayerConfig config;
  config.tokens = 8;
  config.modelDim = 4;
  config.hiddenDim = 4;
  config.experts = 2;
  config.topK = 3; // > E
  std::string planJson, error;
  EXPECT_FALSE(
      compileLayerToPlan(layerConfigToMlir(config), {}, planJson, error));
  EXPECT_NE(error.find("[gate-2]"), std::string::npos) << error;
}

/// `mlir` compiled for training on `world` ranks through the C API with
/// `pipeline` (the compile options' text); `out` gets the plan JSON or the
/// error.
FlexStatus compileThroughCApi(const std::string &mlir, const char *pipeline,
                              std::string &out, int32_t world = 1) {
  FlexCompileOptions options{sizeof(FlexCompileOptions), world, 0, 1, pipeline};
  char *json = nullptr;
  FlexStatus status =
      flexCompileLayerToPlan(mlir.data(), mlir.size(), &options, &json);
  out = json ? json : flexGetLastError();
  flexFreeString(json);
  return status;
}

TEST(CompileAndRun, LayoutsAndTwoLevelExchangeThroughTheCAPI) {
  // The C API's pipeline text reaches the compiler: layouts= keeps both
  // row layouts as variants, ranks_per_node= the 2DH exchange; bad text is
  // an error naming the option.
  ASSERT_EQ(flexCompilerRegister(), FLEX_STATUS_OK);
  LayerConfig config;
  config.tokens = 16;
  config.modelDim = 8;
  config.hiddenDim = 8;
  config.experts = 4;
  config.topK = 2;
  config.capacityMode = CapacityMode::Dropless;
  const std::string mlir = layerConfigToMlir(config);
  auto compile = [&](const char *pipeline, int32_t world, std::string &out) {
    return compileThroughCApi(mlir, pipeline, out, world);
  };
  std::string text;
  ASSERT_EQ(compile("layouts=padded,ragged,aligned", 1, text), FLEX_STATUS_OK)
      << text;
  Plan plan;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  ASSERT_EQ(plan.variants.size(), 3u);
  EXPECT_EQ(plan.variants[0].name, "ragged"); // dropless: auto's layout first
  EXPECT_EQ(plan.variants[1].name, "padded");
  EXPECT_EQ(plan.variants[2].name, "aligned");
  EXPECT_EQ(plan.variants[2].forward[1].attrs.layout, DispatchLayout::Aligned);

  ASSERT_EQ(compile("variants=r1d2 ranks_per_node=2", 4, text), FLEX_STATUS_OK)
      << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  int hierarchical = 0;
  for (const Variant &variant : plan.variants)
    for (const Step &step : variant.forward)
      hierarchical +=
          step.op == StepOp::AllToAll && step.attrs.ranksPerNode == 2;
  EXPECT_GT(hierarchical, 0);
  ASSERT_EQ(compile("variants=r1d2", 4, text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  for (const Variant &variant : plan.variants)
    for (const Step &step : variant.forward)
      EXPECT_EQ(step.attrs.ranksPerNode, 0);

  EXPECT_EQ(compile("ranks_per_node=zero", 4, text),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("'ranks_per_node' needs an integer >= 1, got 'zero'"),
            std::string::npos)
      << text;
  EXPECT_NE(compile("layouts=diagonal", 1, text), FLEX_STATUS_OK);
  EXPECT_NE(text.find("diagonal"), std::string::npos) << text;
  EXPECT_EQ(compile("tiles=4", 1, text), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("layouts=padded,ragged,aligned, ranks_per_node=N"),
            std::string::npos)
      << text;
}

/// A 16-token, 4-expert top-2 dropless layer for the pipeline-option tests.
LayerConfig smallDroplessLayer() {
  LayerConfig config;
  config.tokens = 16;
  config.modelDim = 8;
  config.hiddenDim = 16;
  config.experts = 4;
  config.topK = 2;
  config.capacityMode = CapacityMode::Dropless;
  return config;
}

int64_t countSteps(const std::vector<Step> &steps, StepOp op) {
  return std::count_if(steps.begin(), steps.end(),
                       [&](const Step &step) { return step.op == op; });
}

TEST(CompileAndRun, FuseDispatchThroughTheCompileOptionsAndTheCAPI) {
  // fuse_dispatch=true adds the gather-fused variant after the original
  // (bf16, ragged, K and N multiples of 8); false keeps the plan as it was;
  // another value is an error naming the option.
  ASSERT_EQ(flexCompilerRegister(), FLEX_STATUS_OK);
  LayerConfig config = smallDroplessLayer();
  config.dtype = DType::BF16;
  const std::string mlir = layerConfigToMlir(config);
  auto compile = [&](const char *pipeline, std::string &out) {
    return compileThroughCApi(mlir, pipeline, out);
  };
  std::string text;
  Plan plan;
  ASSERT_EQ(compile("fuse_dispatch=true", text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  ASSERT_EQ(plan.variants.size(), 2u);
  EXPECT_EQ(plan.defaultVariant, 0);
  EXPECT_EQ(plan.variants[0].name, "single");
  EXPECT_EQ(countSteps(plan.variants[0].forward, StepOp::Dispatch), 1);
  EXPECT_EQ(plan.variants[1].name, "single+gather");
  EXPECT_EQ(countSteps(plan.variants[1].forward, StepOp::Dispatch), 0);
  EXPECT_EQ(countSteps(plan.variants[1].forward, StepOp::DispatchRows), 1);
  // fc1 in forward, its weight gradient in backward read x by row_tokens.
  int gathered = 0;
  for (const auto *steps :
       {&plan.variants[1].forward, &plan.variants[1].backward})
    for (const Step &step : *steps)
      gathered +=
          step.in(OperandRole::RowTokens).kind != BufferRef::Kind::None &&
          step.in(OperandRole::A).kind == BufferRef::Kind::Argument;
  EXPECT_EQ(gathered, 2);

  ASSERT_EQ(compile("fuse_dispatch=false", text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  ASSERT_EQ(plan.variants.size(), 1u);
  EXPECT_EQ(plan.variants[0].name, "single");

  // The same through CompileOptions.
  CompileOptions options;
  options.fuseDispatch = true;
  std::string planJson, error;
  ASSERT_TRUE(compileLayerToPlan(mlir, options, planJson, error)) << error;
  ASSERT_TRUE(parsePlan(planJson, plan).isOk());
  ASSERT_EQ(plan.variants.size(), 2u);
  EXPECT_EQ(plan.variants[1].name, "single+gather");

  EXPECT_EQ(compile("fuse_dispatch=yes", text), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("'fuse_dispatch' needs true or false, got 'yes'"),
            std::string::npos)
      << text;
}

TEST(CompileAndRun, FuseGluThroughTheCompileOptionsAndTheCAPI) {
  // fuse_glu=true adds a glu-fused copy of each variant of a gated bf16
  // layer (the gather-fused one included), after every variant the plan had,
  // as the default does; false leaves them out; another value is an error
  // naming the option.
  ASSERT_EQ(flexCompilerRegister(), FLEX_STATUS_OK);
  LayerConfig config = smallDroplessLayer();
  config.expertKind = ExpertKind::Gated;
  config.activation = Activation::Silu;
  config.dtype = DType::BF16;
  const std::string mlir = layerConfigToMlir(config);
  auto compile = [&](const char *pipeline, std::string &out) {
    return compileThroughCApi(mlir, pipeline, out);
  };
  auto names = [](const Plan &plan) {
    std::vector<std::string> out;
    for (const Variant &variant : plan.variants)
      out.push_back(variant.name);
    return out;
  };
  std::string text;
  Plan plan;
  ASSERT_EQ(compile("fuse_glu=true", text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan),
            (std::vector<std::string>{"single", "single+gather", "single+glu",
                                      "single+gather+glu"}));
  EXPECT_EQ(plan.defaultVariant, 0);
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    SCOPED_TRACE(plan.variants[v].name);
    const bool fused = v >= 2;
    EXPECT_EQ(countSteps(plan.variants[v].forward, StepOp::GroupedGemmGlu),
              fused ? 1 : 0);
    EXPECT_EQ(countSteps(plan.variants[v].forward, StepOp::Glu), fused ? 0 : 1);
    // fc1, fc3 and fc2, or the fused step and fc2.
    EXPECT_EQ(countSteps(plan.variants[v].forward, StepOp::GroupedGemm),
              fused ? 1 : 3);
  }
  // A training plan: the fused step writes the products glu_backward reads.
  for (const Step &step : plan.variants[2].forward)
    if (step.op == StepOp::GroupedGemmGlu) {
      EXPECT_TRUE(step.out(OperandRole::GateIn).isValid());
      EXPECT_TRUE(step.out(OperandRole::UpIn).isValid());
      EXPECT_EQ(plan.getBuffer(step.in(OperandRole::BUp)).name, "w3");
    }

  ASSERT_EQ(compile("fuse_glu=false", text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan), (std::vector<std::string>{"single", "single+gather"}));
  ASSERT_EQ(compile("fuse_dispatch=false fuse_glu=true", text), FLEX_STATUS_OK)
      << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan), (std::vector<std::string>{"single", "single+glu"}));
  // The pipeline's default: on.
  ASSERT_EQ(compile("", text), FLEX_STATUS_OK) << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan),
            (std::vector<std::string>{"single", "single+gather", "single+glu",
                                      "single+gather+glu"}));

  // The same through CompileOptions.
  CompileOptions options;
  options.training = true;
  options.fuseGlu = true;
  std::string planJson, error;
  ASSERT_TRUE(compileLayerToPlan(mlir, options, planJson, error)) << error;
  ASSERT_TRUE(parsePlan(planJson, plan).isOk());
  EXPECT_EQ(names(plan),
            (std::vector<std::string>{"single", "single+gather", "single+glu",
                                      "single+gather+glu"}));

  EXPECT_EQ(compile("fuse_glu=yes", text), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("'fuse_glu' needs true or false, got 'yes'"),
            std::string::npos)
      << text;
  EXPECT_EQ(compile("fuse=true", text), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("fuse_dispatch=true|false, fuse_glu=true|false, "
                      "fuse_combine=true|false, "
                      "fuse_activation_backward=true|false"),
            std::string::npos)
      << text;
}

TEST(CompileAndRun, FuseCombineThroughTheCompileOptionsAndTheCAPI) {
  // fuse_combine=true adds a combine-fused copy of each variant of an FFN
  // bf16 training layer (the gather-fused one included), after every
  // variant the plan had; false and the default (off) leave them out;
  // another value is an error naming the option.
  ASSERT_EQ(flexCompilerRegister(), FLEX_STATUS_OK);
  LayerConfig config = smallDroplessLayer();
  config.expertKind = ExpertKind::FFN;
  config.dtype = DType::BF16;
  const std::string mlir = layerConfigToMlir(config);
  auto names = [](const Plan &plan) {
    std::vector<std::string> out;
    for (const Variant &variant : plan.variants)
      out.push_back(variant.name);
    return out;
  };
  std::string text;
  Plan plan;
  ASSERT_EQ(compileThroughCApi(mlir, "fuse_combine=true", text),
            FLEX_STATUS_OK)
      << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan),
            (std::vector<std::string>{"single", "single+gather",
                                      "single+combine",
                                      "single+gather+combine"}));
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    SCOPED_TRACE(plan.variants[v].name);
    const bool fused = v >= 2;
    EXPECT_EQ(countSteps(plan.variants[v].forward, StepOp::GroupedGemmCombine),
              fused ? 1 : 0);
    EXPECT_EQ(countSteps(plan.variants[v].forward, StepOp::Combine),
              fused ? 0 : 1);
  }
  for (const char *off : {"fuse_combine=false", ""}) {
    ASSERT_EQ(compileThroughCApi(mlir, off, text), FLEX_STATUS_OK)
        << text;
    ASSERT_TRUE(parsePlan(text, plan).isOk());
    EXPECT_EQ(names(plan),
              (std::vector<std::string>{"single", "single+gather"}))
        << off;
  }

  // The same through CompileOptions.
  CompileOptions options;
  options.training = true;
  options.fuseDispatch = false;
  options.fuseCombine = true;
  std::string planJson, error;
  ASSERT_TRUE(compileLayerToPlan(mlir, options, planJson, error)) << error;
  ASSERT_TRUE(parsePlan(planJson, plan).isOk());
  EXPECT_EQ(names(plan), (std::vector<std::string>{"single", "single+combine"}));

  EXPECT_EQ(compileThroughCApi(mlir, "fuse_combine=on", text),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(text.find("'fuse_combine' needs true or false, got 'on'"),
            std::string::npos)
      << text;
}

TEST(CompileAndRun, FuseActivationBackwardThroughTheCompileOptionsAndTheCAPI) {
  // fuse_activation_backward=true adds a backward-fused copy of each
  // variant of an FFN bf16 training layer (the gather-fused one included),
  // after every variant the plan had; false and the default (off) leave
  // them out; another value is an error naming the option.
  ASSERT_EQ(flexCompilerRegister(), FLEX_STATUS_OK);
  LayerConfig config = smallDroplessLayer();
  config.expertKind = ExpertKind::FFN;
  config.activation = Activation::Gelu;
  config.dtype = DType::BF16;
  const std::string mlir = layerConfigToMlir(config);
  auto compile = [&](const char *pipeline, std::string &out) {
    return compileThroughCApi(mlir, pipeline, out);
  };
  auto names = [](const Plan &plan) {
    std::vector<std::string> out;
    for (const Variant &variant : plan.variants)
      out.push_back(variant.name);
    return out;
  };
  std::string text;
  Plan plan;
  ASSERT_EQ(compile("fuse_activation_backward=true", text), FLEX_STATUS_OK)
      << text;
  ASSERT_TRUE(parsePlan(text, plan).isOk());
  EXPECT_EQ(names(plan), (std::vector<std::string>{
                             "single", "single+gather", "single+act_backward",
                             "single+gather+act_backward"}));
  EXPECT_EQ(plan.defaultVariant, 0);
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    SCOPED_TRACE(plan.variants[v].name);
    const bool fused = v >= 2;
    EXPECT_EQ(countSteps(plan.variants[v].backward,
                         StepOp::GroupedGemmActivationBackward),
              fused ? 1 : 0);
    EXPECT_EQ(countSteps(plan.variants[v].backward, StepOp::ActivationBackward),
              fused ? 0 : 1);
  }
  for (const char *off : {"fuse_activation_backward=false", ""}) {
    ASSERT_EQ(compile(off, text), FLEX_STATUS_OK) << text;
    ASSERT_TRUE(parsePlan(text, plan).isOk());
    EXPECT_EQ(names(plan),
              (std::vector<std::string>{"single", "single+gather"}))
        << off;
  }

  // The same through CompileOptions.
  CompileOptions options;
  options.training = true;
  options.fuseDispatch = false;
  options.fuseActivationBackward = true;
  std::string planJson, error;
  ASSERT_TRUE(compileLayerToPlan(mlir, options, planJson, error)) << error;
  ASSERT_TRUE(parsePlan(planJson, plan).isOk());
  EXPECT_EQ(names(plan),
            (std::vector<std::string>{"single", "single+act_backward"}));

  EXPECT_EQ(compile("fuse_activation_backward=1", text),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_NE(
      text.find("'fuse_activation_backward' needs true or false, got '1'"),
      std::string::npos)
      << text;
}

} // namespace
