//===- ShardedExpertsTest.cpp - Experts sharded over ranks ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the layer with fewer experts than ranks (E < W): each
// expert is sharded over s = W / E ranks (PlanFormat.md, "Many ranks"). It
// checks the parameter slices, the shard_routing kernels, the loader's rules,
// and runs the compiled mr_shard_* plans (plans/make_shard_plans.sh) on W
// threads with a local communicator: every variant, forward and backward,
// against the fp64 reference of the one-rank layer on each rank's tokens;
// switching variants between calls of one executor changes no result and no
// input.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/ExpertSlices.h"
#include "flex/Runtime/PlanLoader.h"

#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <random>

using namespace flex;
using namespace flex::test;
using Json = nlohmann::ordered_json;

namespace {

const char *const kShardPlans[] = {
    "mr_shard_ffn_e1_w2_train.json", "mr_shard_gated_e2_w4_train.json",
    "mr_shard_ffn_e2_w4_train_bf16.json", "mr_shard_ffn_e1_w4_train.json"};

//===----------------------------------------------------------------------===//
// Parameter slices
//===----------------------------------------------------------------------===//

LayerConfig smallLayer(int64_t experts) {
  LayerConfig layer;
  layer.tokens = 4;
  layer.modelDim = 3;
  layer.hiddenDim = 8;
  layer.experts = experts;
  return layer;
}

std::vector<double> iota(size_t count) {
  std::vector<double> values(count);
  for (size_t i = 0; i < count; ++i)
    values[i] = static_cast<double>(i);
  return values;
}

// Shard q of expert e holds hidden units q*h/s .. (q+1)*h/s: columns of w1,
// rows of w2, entries of b1, and all of b2.
TEST(ExpertSlices, ShardsHoldHiddenUnitsAndTheWholeB2) {
  LayerConfig layer = smallLayer(2); // W = 4: s = 2, h / s = 4
  const int64_t d = 3, h = 8;
  std::vector<double> w1 = iota(2 * d * h), w2 = iota(2 * h * d),
                      b1 = iota(2 * h), b2 = iota(2 * d);
  // Rank 3: expert 1, shard 1.
  std::vector<double> w1Shard = sliceExpertParameter(layer, 4, 3, "w1", w1);
  ASSERT_EQ(w1Shard.size(), static_cast<size_t>(d * 4));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t c = 0; c < 4; ++c)
      EXPECT_EQ(w1Shard[i * 4 + c], w1[(1 * d + i) * h + 4 + c]);
  std::vector<double> w2Shard = sliceExpertParameter(layer, 4, 3, "w2", w2);
  ASSERT_EQ(w2Shard.size(), static_cast<size_t>(4 * d));
  for (int64_t i = 0; i < 4 * d; ++i)
    EXPECT_EQ(w2Shard[i], w2[(1 * h + 4) * d + i]);
  EXPECT_EQ(sliceExpertParameter(layer, 4, 3, "grad_b1", b1),
            std::vector<double>({12, 13, 14, 15}));
  EXPECT_EQ(sliceExpertParameter(layer, 4, 2, "b2", b2),
            std::vector<double>({3, 4, 5}));
  EXPECT_EQ(sliceExpertParameter(layer, 4, 3, "b2", b2),
            std::vector<double>({3, 4, 5}));
  EXPECT_TRUE(isExpertParameter("grad_w3"));
  EXPECT_FALSE(isExpertParameter("wg"));
}

// Gathering every rank's slice gives the global parameter back, sharded
// (s = 2, 4) or not (L = 2, 1).
TEST(ExpertSlices, AssembleInvertsSlice) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  for (auto [experts, world] :
       {std::pair<int64_t, int64_t>{2, 4}, {1, 4}, {1, 2}, {4, 2}, {4, 4}}) {
    LayerConfig layer = smallLayer(experts);
    const int64_t E = experts, d = 3, h = 8;
    for (auto [name, count] :
         {std::pair<const char *, int64_t>{"w1", E * d * h},
          {"w2", E * h * d},
          {"w3", E * d * h},
          {"b1", E * h},
          {"b2", E * d}}) {
      SCOPED_TRACE(std::string(name) + " E=" + std::to_string(E) +
                   " W=" + std::to_string(world));
      std::vector<double> global(count);
      for (double &v : global)
        v = normal(rng);
      std::vector<double> all;
      for (int64_t r = 0; r < world; ++r) {
        std::vector<double> slice =
            sliceExpertParameter(layer, world, r, name, global);
        all.insert(all.end(), slice.begin(), slice.end());
      }
      EXPECT_EQ(assembleExpertParameter(layer, world, name, all), global);
    }
  }
}

//===----------------------------------------------------------------------===//
// Kernels
//===----------------------------------------------------------------------===//

// Choice i * s + q is virtual expert e * s + q with choice i's location and
// gate; every virtual expert has its expert's rows and C padded rows.
TEST(ShardRoutingKernel, ExpandsEachChoiceToTheShardsOfItsExpert) {
  std::mt19937_64 rng(11);
  for (int64_t shards : {1, 2, 4}) {
    const int64_t T = 9, E = 3, k = 2, C = 5;
    std::vector<int32_t> indices(T * k), locations(T * k), rows = {5, 2, 0};
    std::vector<float> gates(T * k);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i) {
        indices[t * k + i] = static_cast<int32_t>((t + i) % E);
        locations[t * k + i] = static_cast<int32_t>(rng() % 7);
        gates[t * k + i] = static_cast<float>(rng() % 100) / 100.0f;
      }
    int32_t capacity = C;
    Routing routing;
    routing.indices = indices.data();
    routing.locations = locations.data();
    routing.gates = gates.data();
    routing.capacity = &capacity;
    routing.expertRows = rows.data();
    routing.tokens = T;
    routing.topK = k;
    routing.experts = E;
    const int64_t V = E * shards, K = k * shards;
    std::vector<int32_t> vIndices(T * K, -7), vLocations(T * K, -7),
        vOffsets(V + 1, -7), vRows(V, -7);
    std::vector<float> vGates(T * K, std::numeric_limits<float>::quiet_NaN());
    cpu::shardRouting(routing, shards, vIndices.data(), vLocations.data(),
                      vGates.data(), vOffsets.data(), vRows.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t q = 0; q < shards; ++q) {
          int64_t slot = (t * k + i) * shards + q;
          EXPECT_EQ(vIndices[slot], indices[t * k + i] * shards + q);
          EXPECT_EQ(vLocations[slot], locations[t * k + i]);
          EXPECT_EQ(vGates[slot], gates[t * k + i]);
        }
    for (int64_t v = 0; v <= V; ++v)
      EXPECT_EQ(vOffsets[v], v * C);
    for (int64_t v = 0; v < V; ++v)
      EXPECT_EQ(vRows[v], rows[v / shards]);

    // Backward: each gate's gradient is the sum of its s copies'.
    std::vector<float> vGrad(T * K),
        grad(T * k, std::numeric_limits<float>::quiet_NaN());
    for (float &g : vGrad)
      g = static_cast<float>(rng() % 1000) / 64.0f; // exact sums
    cpu::shardRoutingBackward(vGrad.data(), T, k, shards, grad.data());
    for (int64_t slot = 0; slot < T * k; ++slot) {
      float want = 0.0f;
      for (int64_t q = 0; q < shards; ++q)
        want += vGrad[slot * shards + q];
      EXPECT_EQ(grad[slot], want);
    }
  }
}

//===----------------------------------------------------------------------===//
// Loader
//===----------------------------------------------------------------------===//

TEST(ShardedPlanLoader, LoadsAndRoundTripsEveryShardPlan) {
  for (const char *name : kShardPlans) {
    SCOPED_TRACE(name);
    Plan plan;
    Status status = parsePlan(readTestPlan(name), plan);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_GT(plan.shards(), 1);
    EXPECT_EQ(plan.layer.experts * plan.shards(), plan.worldSize);
    EXPECT_EQ(plan.localExperts(), 1);
    const Argument &w1 = plan.arguments[plan.findArgument("w1")];
    EXPECT_EQ(w1.shape,
              (std::vector<int64_t>{1, plan.layer.modelDim,
                                    plan.layer.hiddenDim / plan.shards()}));
    Plan again;
    status = parsePlan(writePlan(plan), again);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_EQ(writePlan(again), writePlan(plan));
  }
}

Json *findStep(Json &doc, const std::string &op) {
  for (Json &v : doc["variants"])
    for (const char *list : {"forward", "backward"})
      for (Json &step : v[list])
        if (step["op"] == op)
          return &step;
  return nullptr;
}

/// The first step of `op` with a group_size (a grouped collective).
Json *findGroupedStep(Json &doc, const std::string &op) {
  for (Json &v : doc["variants"])
    for (const char *list : {"forward", "backward"})
      for (Json &step : v[list])
        if (step["op"] == op && step["attrs"].value("group_size", 0) != 0)
          return &step;
  return nullptr;
}

// Grouped collectives (1 <= r < s): the groups must partition the W ranks,
// the gathered buffers must be group_size blocks, and only the collectives
// take a group.
TEST(ShardedPlanLoader, RejectsGroupsThatDoNotPartitionTheRanks) {
  const std::string plan = "mr_shard_ffn_e1_w4_train.json";
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["group_size"] = 3;
      },
      "do not partition the plan's world size 4");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["group_stride"] = 0;
      },
      "group_stride >= 1");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_gather"))["attrs"]["group_size"] = 4;
      },
      "times group_size = 4 in the first dimension");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["ranks_per_node"] = 2;
      },
      "a grouped all_to_all (group_size 2) is flat");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findStep(doc, "dispatch"))["attrs"]["group_size"] = 2;
      },
      "op 'dispatch' takes no group");
  // Groups that partition the ranks but are not the shard groups / token
  // classes ran and gave a wrong answer: the exchange must be among the
  // W / g ranks g apart, the gathers among g consecutive ranks.
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        for (Json &v : doc["variants"])
          for (const char *list : {"forward", "backward"})
            for (Json &step : v[list])
              if (step["op"] == "all_to_all" &&
                  step["attrs"].value("group_size", 0) != 0)
                step["attrs"]["group_stride"] = 1;
      },
      "a grouped all_to_all runs among a token class");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_gather"))["attrs"]["group_stride"] = 2;
      },
      "a grouped all_gather runs among consecutive ranks");
  // Without sharded experts the segment ops run L = E / W experts: a grouped
  // exchange (E / n per rank) cannot feed them.
  expectRejectedAfterEdit(
      "mr_ffn_fixed_w4_infer.json",
      [](Json &doc) {
        for (Json &step : doc["variants"][0]["forward"])
          if (step["op"] == "all_to_all") {
            step["attrs"]["group_size"] = 2;
            step["attrs"]["group_stride"] = 2;
          }
      },
      "needs experts sharded over ranks");
}

TEST(ShardedPlanLoader, RejectsInconsistentShards) {
  const std::string plan = "mr_shard_ffn_e1_w2_train.json";
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing"))["attrs"]["shards"] = 4;
      },
      "shards 4 disagrees with the plan: s = W / E = 2 / 1 = 2");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing"))["attrs"].erase("shards");
      },
      "missing (required by op 'shard_routing')");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing_backward"))["attrs"]["shards"] = 1;
      },
      "shards 1 disagrees with the plan");
  // Dispatch of a sharded plan reads the routing over the shards.
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        Json &dispatch = *findStep(doc, "dispatch");
        dispatch["in"]["indices"] = (*findStep(doc, "gate"))["out"]["indices"];
      },
      "indices [T, k * s] i32 (k * s = 2");
  expectRejectedAfterEdit(
      plan,
      [](Json &doc) {
        for (Json &v : doc["variants"])
          for (Json &step : v["forward"])
            if (step["op"] == "grouped_gemm" &&
                step["attrs"].contains("bias_scale"))
              step["attrs"]["bias_scale"] = 0;
      },
      "bias_scale 0 is out of range");
  // shard_routing needs E < W.
  expectRejectedAfterEdit(
      "mr_ffn_fixed_w2_train.json",
      [](Json &doc) {
        Json step = {{"op", "shard_routing_backward"},
                     {"in", {{"grad_gates", "grad_gates"}}},
                     {"out", {{"grad_gates", "grad_gates"}}},
                     {"attrs", {{"shards", 1}}}};
        doc["variants"][0]["backward"].push_back(step);
      },
      "needs experts sharded over ranks");
}

// The routing buffers are i32: shard_routing writes expert_offsets[v] = v * C
// for the E * s virtual experts, so E * s * C must fit, not only E * C (the
// plan has T = C = 2^29, E = 1, s = 4: E * C fits, E * s * C = 2^31 does
// not).
TEST(ShardedPlanLoader, RejectsVirtualExpertRowsBeyondI32) {
  Plan plan;
  Status status = parsePlan(readTestPlan("bad_shard_i32_rows.json"), plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  EXPECT_THAT(status.message(),
              ::testing::HasSubstr("E * s = 4 virtual experts"));
  EXPECT_THAT(status.message(), ::testing::HasSubstr("i32 range"));
}

//===----------------------------------------------------------------------===//
// Plans on local ranks vs the reference
//===----------------------------------------------------------------------===//

class ShardedRun : public ::testing::TestWithParam<const char *> {};

// One executor per rank runs every variant in turn on the same bindings, then
// the first variant again. Each variant equals the one-rank layer on each
// rank's tokens (expert gradients: the reference's summed over ranks, in the
// rank's shard; b2's whole on every shard rank); the repeated variant gives
// the same bytes as its first run, and no input changes.
TEST_P(ShardedRun, EveryVariantMatchesTheReferenceAndSwitchingIsFree) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readTestPlan(GetParam()), *plan);
  ASSERT_TRUE(status.isOk()) << status.message();
  const int W = static_cast<int>(plan->worldSize);
  const LayerConfig &config = plan->layer;
  reference::ReferenceOptions refOptions;
  for (const Step &step : plan->variants[0].forward)
    if (step.op == StepOp::Gate)
      refOptions.capacityAlignment = step.attrs.capacityAlignment;
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);

  // One global layer; each rank's tokens drawn apart, away from ties.
  RankInputs drawn;
  ASSERT_TRUE(makeRankInputs(config, refOptions, W, rng, drawn));
  const double gradLAux = 0.5;
  // Rank r's shard of expert r / s.
  std::vector<RankBuffers> buffers =
      makeRankBuffers(*plan, drawn, gradLAux, [&](int r) -> ExpertSliceFn {
        return [&, r](const char *name, const std::vector<double> &global) {
          return sliceExpertParameter(config, W, r, name, global);
        };
      });
  std::vector<std::map<std::string, std::vector<uint8_t>>> inputsBefore(W);
  for (int r = 0; r < W; ++r)
    for (const Argument &a : plan->arguments)
      if (a.role == ArgumentRole::Input || a.role == ArgumentRole::GradInput)
        inputsBefore[r][a.name] = buffers[r].data[a.name];

  // The reference per rank; expert gradients summed over ranks.
  const RankReference want =
      referenceOnRanks(config, refOptions, drawn, gradLAux, /*training=*/true);

  // Variants 0, 1, ..., n-1, then 0 again.
  const size_t numVariants = plan->variants.size();
  ASSERT_GE(numVariants, 2u);
  std::vector<std::vector<std::map<std::string, std::vector<uint8_t>>>> results(
      W, std::vector<std::map<std::string, std::vector<uint8_t>>>(numVariants +
                                                                  1));
  auto ranks = localRanks(W);
  ASSERT_EQ(static_cast<int>(ranks.size()), W);
  std::vector<std::string> failures(W);
  onRanks(W, [&](int r) {
    // A workspace of NaN bytes.
    CpuRankExecutor rank;
    Status s = rank.create(plan, ranks[r], 0xff);
    for (size_t run = 0; s && run <= numVariants; ++run) {
      size_t v = run % numVariants;
      buffers[r].poison();
      std::vector<Binding> bindings = buffers[r].bindings();
      s = runVariant(*rank.executor, static_cast<int64_t>(v), bindings,
                     /*backward=*/true);
      if (!s)
        failures[r] = plan->variants[v].name + ": " + s.message();
      results[r][run] = buffers[r].data;
    }
    if (!s && failures[r].empty())
      failures[r] = s.message();
  });
  for (int r = 0; r < W; ++r)
    ASSERT_TRUE(failures[r].empty()) << "rank " << r << ": " << failures[r];

  const double tolerance = config.dtype == DType::F32 ? 1e-5 : 2e-2;
  for (int r = 0; r < W; ++r) {
    for (size_t v = 0; v < numVariants; ++v) {
      SCOPED_TRACE("rank " + std::to_string(r) + " variant " +
                   plan->variants[v].name);
      RankBuffers b = buffers[r];
      b.data = results[r][v];
      auto check = [&](const char *name, const std::vector<double> &ref,
                       double floor = -1) {
        if (!b.has(name))
          return;
        if (floor < 0)
          floor = reference::normL2(ref) == 0.0 ? 1.0 : 0.0;
        EXPECT_LE(reference::relativeL2(b.get(name), ref, floor), tolerance)
            << name;
      };
      // Expert gradients sum every rank's part: their floor is the parts'
      // magnitude (a bf16 sum of parts that cancel errs relative to them).
      auto checkExpert =
          [&](const char *name, const char *argument,
              std::vector<double> reference::LayerGradients::*field) {
            check(name,
                  sliceExpertParameter(config, W, r, argument,
                                       want.expertSum.*field),
                  expertFloor(sliceExpertParameter(config, W, r, argument,
                                                   want.expertAbsSum.*field)));
          };
      check("out", want.forward[r].out);
      check("l_aux", {want.forward[r].lAux});
      check("grad_x", want.grads[r].x);
      // The router's gradient passes through the gate's softmax backward, a
      // difference of near-equal terms where a token's top choices score
      // alike, so in 16 bits (the expert outputs summed over ranks, rounded)
      // its error relative to its own norm has a long tail: over 202 seeds
      // of the bf16 plan the worst rank and variant erred by 0.0038 at the
      // median, 0.011 at the 99th percentile, 0.0201 at most (seed
      // 931557501, which failed 2e-2 in CI). Twice that most.
      if (config.dtype == DType::F32)
        check("grad_wg", want.grads[r].wg);
      else if (b.has("grad_wg")) {
        EXPECT_LE(
            reference::relativeL2(b.get("grad_wg"), want.grads[r].wg, 0.0),
            4e-2)
            << "grad_wg";
      }
      checkExpert("grad_w1", "w1", &reference::LayerGradients::w1);
      checkExpert("grad_b1", "b1", &reference::LayerGradients::b1);
      checkExpert("grad_w2", "w2", &reference::LayerGradients::w2);
      checkExpert("grad_b2", "b2", &reference::LayerGradients::b2);
      checkExpert("grad_w3", "w3", &reference::LayerGradients::w3);
    }
    // Back to variant 0: the same bytes; the inputs never changed.
    for (const auto &[name, bytes] : results[r][0])
      EXPECT_EQ(bytes, results[r][numVariants].at(name))
          << "rank " << r << ": '" << name << "' of variant "
          << plan->variants[0].name << " changed after the other variants ran";
    for (const auto &[name, bytes] : inputsBefore[r])
      EXPECT_EQ(bytes, buffers[r].data[name])
          << "rank " << r << ": input '" << name << "' was written";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Plans, ShardedRun, ::testing::ValuesIn(kShardPlans),
    [](const ::testing::TestParamInfo<const char *> &info) {
      std::string name = info.param;
      name = name.substr(0, name.find('.'));
      for (char &c : name)
        if (!std::isalnum(static_cast<unsigned char>(c)))
          c = '_';
      return name;
    });

} // namespace
