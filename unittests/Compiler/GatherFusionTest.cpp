//===- GatherFusionTest.cpp - The gather-fused variant, end to end --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests --moert-fuse-dispatch through the whole path: random bf16
// and f16 layers of a ragged layout are compiled with fuse_dispatch, and the
// runtime runs the plan's original variant and its `+gather` variant
// (dispatch_rows, and the grouped GEMMs reading x through row_tokens) on the
// CPU, forward and backward. The gathered rows are exact copies of x's, so
// the two variants must agree bit for bit; both must match the independent
// fp64 reference within the dtype's tolerance.
//
//===----------------------------------------------------------------------===//

#include "FusionTestSupport.h"
#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Executor.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <random>

using namespace flex;
using namespace flex::reference;
using flex::test::compileLayer;
using flex::test::describeLayer;
using flex::test::randomFusionLayer;
using flex::test::runSeed;
using flex::test::runVariant;

namespace {

/// A random small layer the pass fuses: dropless or bounded (a ragged
/// layout), one in three gated, any activation.
LayerConfig randomFusableConfig(std::mt19937_64 &rng) {
  return randomFusionLayer(
      rng,
      {.experts = {1, 9},
       .capacityModes = {CapacityMode::Bounded, CapacityMode::Dropless},
       .expertKinds = {ExpertKind::Gated, ExpertKind::FFN, ExpertKind::FFN},
       .activations = {Activation::Relu, Activation::Gelu, Activation::Silu}});
}

/// Training with the gather-fused variants.
CompileOptions fusedOptions() {
  CompileOptions options;
  options.training = true;
  options.fuseDispatch = true;
  // The gather fusion alone, whatever the pipeline's default for the glu's.
  options.fuseGlu = false;
  return options;
}

/// Buffers of the layer's dtype (the router's weights in fp32), held as
/// raw bytes, with NaN-poisoned outputs.
struct Buffers {
  DType type;
  std::map<std::string, std::vector<uint16_t>> half;
  std::map<std::string, std::vector<float>> fp32;

  uint16_t encode(double v) const {
    return type == DType::BF16 ? floatToBf16(static_cast<float>(v))
                               : floatToF16(static_cast<float>(v));
  }
  double decode(uint16_t bits) const {
    return type == DType::BF16 ? bf16ToFloat(bits) : f16ToFloat(bits);
  }
  void set(const std::string &name, const std::vector<double> &values) {
    std::vector<uint16_t> &out = half[name];
    out.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i)
      out[i] = encode(values[i]);
  }
  void poison(const std::string &name, size_t count) {
    half[name].assign(count, encode(std::nan("")));
  }
  std::vector<double> get(const std::string &name) const {
    const std::vector<uint16_t> &bits = half.at(name);
    std::vector<double> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i)
      out[i] = decode(bits[i]);
    return out;
  }
  std::vector<Binding> bindings() {
    std::vector<Binding> result;
    for (auto &[name, values] : half)
      result.push_back(
          {name, values.data(), int64_t(values.size() * sizeof(uint16_t))});
    for (auto &[name, values] : fp32)
      result.push_back(
          {name, values.data(), int64_t(values.size() * sizeof(float))});
    return result;
  }
};

TEST(GatherFusion, FusedVariantEqualsTheUnfusedOneAndTheReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int kCases = 40;
  int fused = 0;
  for (int i = 0; i < kCases; ++i) {
    LayerConfig config = randomFusableConfig(rng);
    SCOPED_TRACE("case " + std::to_string(i) + " " + describeLayer(config) +
                 " " + std::string(toString(config.expertKind)) + " " +
                 std::string(toString(config.dtype)) +
                 (config.bias ? " bias" : ""));
    auto plan = std::make_shared<Plan>();
    ASSERT_TRUE(compileLayer(config, fusedOptions(), *plan));
    // A bounded layer whose bound never binds became dropless; either way
    // the layout is ragged and the pass adds the fused variant second.
    ASSERT_EQ(plan->variants.size(), 2u);
    ASSERT_EQ(plan->variants[1].name, plan->variants[0].name + "+gather");
    ++fused;
    std::unique_ptr<Executor> executor;
    Status created = Executor::create(plan, createCpuBackend(), executor);
    ASSERT_TRUE(created.isOk()) << created.message();

    // Inputs rounded to the dtype, so the reference sees what the runtime
    // reads.
    LayerInputs in = makeRandomInputs(config, rng);
    for (std::vector<double> *v : {&in.x, &in.w1, &in.b1, &in.w2, &in.b2,
                                   &in.w3})
      *v = roundTo(*v, config.dtype);
    in.wg = roundTo(in.wg, DType::F32);
    std::vector<double> gradOut(config.tokens * config.modelDim);
    std::normal_distribution<double> normal;
    for (double &v : gradOut)
      v = normal(rng);
    gradOut = roundTo(gradOut, config.dtype);
    LayerForward want;
    LayerGradients wantGrads =
        referenceBackward(config, in, gradOut, 0.5, {}, &want);

    std::vector<std::string> outputs = {"out", "grad_x", "grad_w1",
                                        "grad_w2"};
    if (config.bias) {
      outputs.push_back("grad_b1");
      outputs.push_back("grad_b2");
    }
    if (config.expertKind == ExpertKind::Gated)
      outputs.push_back("grad_w3");
    auto run = [&](int64_t variant, Buffers &b) {
      b.type = config.dtype;
      b.set("x", in.x);
      b.fp32["wg"] = std::vector<float>(in.wg.begin(), in.wg.end());
      b.set("w1", in.w1);
      b.set("w2", in.w2);
      if (config.bias) {
        b.set("b1", in.b1);
        b.set("b2", in.b2);
      }
      if (config.expertKind == ExpertKind::Gated)
        b.set("w3", in.w3);
      b.set("grad_out", gradOut);
      b.fp32["l_aux"] = {std::nanf("")};
      b.fp32["grad_l_aux"] = {0.5f};
      b.fp32["grad_wg"].assign(in.wg.size(), std::nanf(""));
      b.poison("out", in.x.size());
      b.poison("grad_x", in.x.size());
      b.poison("grad_w1", in.w1.size());
      b.poison("grad_w2", in.w2.size());
      if (config.bias) {
        b.poison("grad_b1", in.b1.size());
        b.poison("grad_b2", in.b2.size());
      }
      if (config.expertKind == ExpertKind::Gated)
        b.poison("grad_w3", in.w3.size());
      std::vector<Binding> bindings = b.bindings();
      return runVariant(*executor, variant, bindings, /*backward=*/true);
    };
    Buffers unfused, gathered;
    Status ran = run(0, unfused);
    ASSERT_TRUE(ran.isOk()) << ran.message();
    ran = run(1, gathered);
    ASSERT_TRUE(ran.isOk()) << ran.message();
    // The caller's inputs are untouched by either variant.
    EXPECT_EQ(gathered.get("x"), roundTo(in.x, config.dtype));

    for (const std::string &name : outputs)
      EXPECT_EQ(0, std::memcmp(unfused.half[name].data(),
                               gathered.half[name].data(),
                               unfused.half[name].size() * sizeof(uint16_t)))
          << name << ": the gathered variant differs from the unfused one";
    EXPECT_EQ(unfused.fp32["grad_wg"], gathered.fp32["grad_wg"]);
    EXPECT_EQ(unfused.fp32["l_aux"], gathered.fp32["l_aux"]);

    // Against the reference: bf16/f16 intermediates ([num-1]). A routing
    // near a tie may route differently from the fp64 reference; the
    // variants' equality above holds regardless, so a case whose routing
    // margin is below the dtype's rounding is only checked there.
    RoutingMargins margins = routingMargins(config, want.routing);
    if (margins.logitGap < 5e-2 ||
        (config.experts > 1 && margins.priorityGap < 1e-3))
      continue;
    const double tolerance = config.dtype == DType::BF16 ? 5e-2 : 1e-2;
    EXPECT_LE(relativeL2(gathered.get("out"), want.out), tolerance);
    EXPECT_LE(relativeL2(gathered.get("grad_w1"), wantGrads.w1,
                         normL2(wantGrads.w1) == 0.0 ? 1.0 : 0.0),
              tolerance);
    EXPECT_LE(relativeL2(gathered.get("grad_x"), wantGrads.x,
                         normL2(wantGrads.x) == 0.0 ? 1.0 : 0.0),
              tolerance);
  }
  EXPECT_EQ(fused, kCases);
}

// The loader's rules for a hand-written row map: row_tokens is read only
// where dispatch_rows wrote it, and a gathered GEMM reads x.
TEST(GatherFusion, TheLoaderRefusesAMisusedRowMap) {
  LayerConfig config;
  // R = T * k = 5 = E + 1: expert_offsets has row_tokens' shape.
  config.tokens = 5;
  config.modelDim = 8;
  config.hiddenDim = 8;
  config.experts = 4;
  config.topK = 1;
  config.capacityMode = CapacityMode::Dropless;
  config.dtype = DType::BF16;
  std::string planJson;
  ASSERT_TRUE(compileLayer(config, fusedOptions(), planJson));
  using Json = nlohmann::ordered_json;
  auto rejects = [&](const std::function<void(Json & step)> &edit,
                     const std::string &what) {
    Json doc = Json::parse(planJson);
    ASSERT_EQ(doc["variants"][1]["name"], "single+gather");
    int edited = 0;
    for (Json &step : doc["variants"][1]["forward"])
      if (step["op"] == "grouped_gemm" && step["in"].contains("row_tokens")) {
        edit(step);
        ++edited;
      }
    ASSERT_EQ(edited, 1);
    Plan plan;
    Status status = parsePlan(doc.dump(), plan);
    EXPECT_EQ(status.code(), StatusCode::InvalidPlan) << what;
    EXPECT_NE(status.message().find(what), std::string::npos)
        << status.message();
  };
  rejects(
      [](Json &step) {
        step["in"]["row_tokens"] = step["in"]["expert_offsets"];
      },
      "is read as row_tokens, but no earlier step wrote it as one");
  rejects([](Json &step) { step["in"]["a"] = "grad_out"; },
          "is not the layer's input x");
}

} // namespace
