//===- ReferenceMoETest.cpp - Checks of the fp64 reference ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file checks the fp64 reference on its own: its gradients against
// central finite differences of its forward ([grad-1]), and its routing
// against hand-computed cases of [gate-2], [loc-1] and [cap-1].
//
//===----------------------------------------------------------------------===//

#include "flex/Reference/ReferenceMoE.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

using namespace flex;
using namespace flex::reference;

namespace {

struct FdCase {
  std::string name;
  LayerConfig config;
};

LayerConfig smallConfig() {
  LayerConfig c;
  c.tokens = 7;
  c.modelDim = 4;
  c.hiddenDim = 3;
  c.experts = 3;
  c.topK = 2;
  c.capacityMode = CapacityMode::Fixed;
  c.capacityFactor = 1.0;
  c.dtype = DType::F32;
  return c;
}

std::vector<FdCase> fdCases() {
  std::vector<FdCase> cases;
  {
    LayerConfig c = smallConfig();
    c.bias = true;
    c.activation = Activation::Gelu;
    cases.push_back({"FfnGeluBiasFixedDrops", c});
  }
  {
    LayerConfig c = smallConfig();
    c.activation = Activation::Silu;
    c.capacityMode = CapacityMode::Dropless;
    c.normalizeGate = false;
    c.topK = 3;
    cases.push_back({"FfnSiluDroplessK3Unnormalized", c});
  }
  {
    LayerConfig c = smallConfig();
    c.activation = Activation::Relu;
    c.bias = true;
    c.capacityMode = CapacityMode::Bounded;
    c.capacityFactor = 0.5;
    c.batchPrioritized = true;
    c.gateNoise = 1.0;
    c.seed = 42;
    cases.push_back({"FfnReluBoundedPrioritizedNoise", c});
  }
  {
    LayerConfig c = smallConfig();
    c.expertKind = ExpertKind::Gated;
    c.experts = 4;
    c.tokens = 9;
    c.topK = 2;
    cases.push_back({"GatedFixed", c});
  }
  {
    LayerConfig c = smallConfig();
    c.expertKind = ExpertKind::Gated;
    c.topK = 1;
    c.capacityMode = CapacityMode::Dropless;
    c.batchPrioritized = true;
    cases.push_back({"GatedTop1Dropless", c});
  }
  return cases;
}

double lossOf(const LayerConfig &config, const LayerInputs &in,
              const std::vector<double> &gradOut, double gradLAux) {
  LayerForward f = referenceForward(config, in);
  double loss = gradLAux * f.lAux;
  for (size_t i = 0; i < f.out.size(); ++i)
    loss += gradOut[i] * f.out[i];
  return loss;
}

class ReferenceFiniteDifference : public ::testing::TestWithParam<FdCase> {};

// [grad-1] the reference's hand-written backward equals d loss / d input.
TEST_P(ReferenceFiniteDifference, GradientsMatchCentralDifferences) {
  const LayerConfig &config = GetParam().config;
  std::mt19937_64 rng(1234);
  LayerInputs in;
  // Routing is piecewise constant: pick inputs far from a flip, so the
  // finite differences stay on one piece.
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 100) << "no well-separated routing found";
    in = makeRandomInputs(config, rng);
    RoutingMargins m = routingMargins(config, referenceRouting(config, in));
    if (m.logitGap > 1e-3 && m.priorityGap > 1e-4)
      break;
  }
  std::vector<double> gradOut(config.tokens * config.modelDim);
  std::normal_distribution<double> normal;
  for (double &v : gradOut)
    v = normal(rng);
  const double gradLAux = 0.7;

  LayerForward forward;
  LayerGradients grads =
      referenceBackward(config, in, gradOut, gradLAux, {}, &forward);
  // The forward inside backward is the forward.
  EXPECT_EQ(forward.out, referenceForward(config, in).out);

  struct Param {
    const char *name;
    std::vector<double> LayerInputs::*values;
    std::vector<double> LayerGradients::*grad;
  };
  const Param params[] = {
      {"x", &LayerInputs::x, &LayerGradients::x},
      {"wg", &LayerInputs::wg, &LayerGradients::wg},
      {"w1", &LayerInputs::w1, &LayerGradients::w1},
      {"b1", &LayerInputs::b1, &LayerGradients::b1},
      {"w2", &LayerInputs::w2, &LayerGradients::w2},
      {"b2", &LayerInputs::b2, &LayerGradients::b2},
      {"w3", &LayerInputs::w3, &LayerGradients::w3},
  };
  const double step = 1e-6;
  for (const Param &p : params) {
    std::vector<double> &values = in.*(p.values);
    ASSERT_EQ(values.size(), (grads.*(p.grad)).size()) << p.name;
    if (values.empty())
      continue;
    std::vector<double> numeric(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      double saved = values[i];
      values[i] = saved + step;
      double plus = lossOf(config, in, gradOut, gradLAux);
      values[i] = saved - step;
      double minus = lossOf(config, in, gradOut, gradLAux);
      values[i] = saved;
      numeric[i] = (plus - minus) / (2 * step);
    }
    double err = relativeL2(grads.*(p.grad), numeric);
    EXPECT_LT(err, 1e-6) << "[grad-1] d loss / d " << p.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ReferenceFiniteDifference,
                         ::testing::ValuesIn(fdCases()),
                         [](const auto &info) { return info.param.name; });

// [gate-2], [loc-1], [cap-1] on a hand-made routing: x rows pick experts
// through an identity router.
TEST(ReferenceRouting, HandComputedSlotsAndCapacity) {
  LayerConfig c;
  c.tokens = 4;
  c.modelDim = 3;
  c.hiddenDim = 2;
  c.experts = 3;
  c.topK = 2;
  c.capacityMode = CapacityMode::Fixed;
  c.capacityFactor = 0.5; // spe = 2, C = 2 * int(1.0) = 2
  LayerInputs in;
  // Logits = x. Token 0 prefers 0 then 1; token 1: 0 then 2; token 2: 1
  // then 0; token 3: 0 then 1 (with a tie between 1 and 2: lower wins).
  in.x = {2, 1, 0, 4, 0, 1, 1, 3, 0, 5, 1, 1};
  in.wg = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  in.w1.assign(3 * 3 * 2, 0.1);
  in.w2.assign(3 * 2 * 3, 0.1);
  LayerRouting r = referenceForward(c, in).routing;
  EXPECT_EQ(r.capacity, 2);
  EXPECT_EQ(r.indices, (std::vector<int32_t>{0, 1, 0, 2, 1, 0, 0, 1}));
  // First choices: 0 gets tokens 0, 1, 3 (slots 0, 1, 2); 1 gets token 2.
  // Second choices follow: 1 gets tokens 0, 3 (1, 2); 2 gets 1; 0 gets 2 (3).
  EXPECT_EQ(r.locations, (std::vector<int32_t>{0, 1, 1, 0, 0, 3, 2, 2}));
  EXPECT_EQ(r.counts, (std::vector<int64_t>{4, 3, 1}));

  c.batchPrioritized = true;
  r = referenceForward(c, in).routing;
  // Max scores order the tokens 3, 1, 2, 0.
  EXPECT_EQ(r.locations, (std::vector<int32_t>{2, 2, 1, 0, 0, 3, 0, 1}));

  c.capacityMode = CapacityMode::Dropless;
  EXPECT_EQ(referenceForward(c, in).routing.capacity, 4);
  c.capacityMode = CapacityMode::Bounded;
  c.capacityFactor = 1.0;
  EXPECT_EQ(referenceForward(c, in).routing.capacity, 4); // min(4, 2 * 2)
  c.capacityFactor = 0.4;                                 // int(0.8) = 0
  EXPECT_EQ(referenceForward(c, in).routing.capacity, 0);
}

} // namespace
