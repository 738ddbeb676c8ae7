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
#include "flex/Runtime/Cpu/Half.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/ExpertSlices.h"
#include "flex/Runtime/PlanLoader.h"

#include "ReferenceMoE.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <thread>

using namespace flex;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::string readText(const std::string &name) {
  std::ifstream file(std::string(FLEX_TEST_PLANS_DIR) + "/" + name);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

uint64_t runSeed() {
  if (const char *fixed = std::getenv("FLEX_TEST_SEED"))
    return std::strtoull(fixed, nullptr, 10);
  return std::random_device{}();
}

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
    cpu::Routing routing;
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
    Status status = parsePlan(readText(name), plan, {true});
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

void expectRejected(const std::string &name,
                    const std::function<void(Json &)> &edit,
                    const std::string &what) {
  Json doc = Json::parse(readText(name));
  edit(doc);
  Plan plan;
  Status status = parsePlan(doc.dump(), plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan) << what;
  EXPECT_THAT(status.message(), HasSubstr(what));
}

/// The first step of `op` with a group_size (a grouped collective).
Json *findGroupedStep(Json &doc, const std::string &op) {
  for (Json &v : doc["variants"])
    for (const char *list : {"forward", "backward"})
      for (Json &step : v[list])
        if (step["op"] == op && step["attrs"].contains("group_size"))
          return &step;
  return nullptr;
}

// Grouped collectives (1 <= r < s): the groups must partition the W ranks,
// the gathered buffers must be group_size blocks, and only the collectives
// take a group.
TEST(ShardedPlanLoader, RejectsGroupsThatDoNotPartitionTheRanks) {
  const std::string plan = "mr_shard_ffn_e1_w4_train.json";
  expectRejected(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["group_size"] = 3;
      },
      "do not partition the plan's world size 4");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["group_stride"] = 0;
      },
      "group_stride >= 1");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_gather"))["attrs"]["group_size"] = 4;
      },
      "times group_size = 4 in the first dimension");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findGroupedStep(doc, "all_to_all"))["attrs"]["ranks_per_node"] = 2;
      },
      "a grouped all_to_all (group_size 2) is flat");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findStep(doc, "dispatch"))["attrs"]["group_size"] = 2;
      },
      "op 'dispatch' takes no group");
}

TEST(ShardedPlanLoader, RejectsInconsistentShards) {
  const std::string plan = "mr_shard_ffn_e1_w2_train.json";
  expectRejected(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing"))["attrs"]["shards"] = 4;
      },
      "shards 4 disagrees with the plan: s = W / E = 2 / 1 = 2");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing"))["attrs"].erase("shards");
      },
      "missing (required by op 'shard_routing')");
  expectRejected(
      plan,
      [](Json &doc) {
        (*findStep(doc, "shard_routing_backward"))["attrs"]["shards"] = 1;
      },
      "shards 1 disagrees with the plan");
  // Dispatch of a sharded plan reads the routing over the shards.
  expectRejected(
      plan,
      [](Json &doc) {
        Json &dispatch = *findStep(doc, "dispatch");
        dispatch["in"]["indices"] = (*findStep(doc, "gate"))["out"]["indices"];
      },
      "indices [T, k * s] i32 (k * s = 2");
  expectRejected(
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
  expectRejected(
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

//===----------------------------------------------------------------------===//
// Plans on local ranks vs the reference
//===----------------------------------------------------------------------===//

void store(std::vector<uint8_t> &bytes, DType type, int64_t i, double value) {
  switch (type) {
  case DType::F32: {
    float v = static_cast<float>(value);
    std::memcpy(bytes.data() + 4 * i, &v, 4);
    return;
  }
  case DType::BF16:
    reinterpret_cast<uint16_t *>(bytes.data())[i] =
        cpu::floatToBf16(static_cast<float>(value));
    return;
  case DType::F16:
    reinterpret_cast<uint16_t *>(bytes.data())[i] =
        cpu::floatToF16(static_cast<float>(value));
    return;
  case DType::I32:
    return;
  }
}

double load(const std::vector<uint8_t> &bytes, DType type, int64_t i) {
  switch (type) {
  case DType::F32:
    return reinterpret_cast<const float *>(bytes.data())[i];
  case DType::BF16:
    return cpu::bf16ToFloat(
        reinterpret_cast<const uint16_t *>(bytes.data())[i]);
  case DType::F16:
    return cpu::f16ToFloat(reinterpret_cast<const uint16_t *>(bytes.data())[i]);
  case DType::I32:
    return 0;
  }
  return 0;
}

/// The arguments of one rank, by name.
struct RankBuffers {
  std::map<std::string, std::vector<uint8_t>> data;
  const Plan *plan = nullptr;

  const Argument &arg(const std::string &name) const {
    return plan->arguments[plan->findArgument(name)];
  }
  bool has(const std::string &name) const {
    return plan->findArgument(name) >= 0;
  }
  void init(const Plan &p) {
    plan = &p;
    for (const Argument &a : p.arguments)
      data[a.name].assign(a.numBytes(), 0);
    poison();
  }
  /// Outputs start as NaN: an element no step writes cannot pass.
  void poison() {
    for (const Argument &a : plan->arguments)
      if (a.role == ArgumentRole::Output || a.role == ArgumentRole::GradOutput)
        set(a.name,
            std::vector<double>(a.numElements(),
                                std::numeric_limits<double>::quiet_NaN()));
  }
  void set(const std::string &name, const std::vector<double> &values) {
    if (!has(name))
      return;
    ASSERT_EQ(static_cast<int64_t>(values.size()), arg(name).numElements())
        << name;
    for (size_t i = 0; i < values.size(); ++i)
      store(data[name], arg(name).dtype, i, values[i]);
  }
  std::vector<double> get(const std::string &name) const {
    std::vector<double> values(arg(name).numElements());
    for (size_t i = 0; i < values.size(); ++i)
      values[i] = load(data.at(name), arg(name).dtype, i);
    return values;
  }
  std::vector<Binding> bindings() {
    std::vector<Binding> result;
    for (auto &[name, bytes] : data)
      result.push_back(
          {arg(name).name, bytes.data(), static_cast<int64_t>(bytes.size())});
    return result;
  }
};

class ShardedRun : public ::testing::TestWithParam<const char *> {};

// One executor per rank runs every variant in turn on the same bindings, then
// the first variant again. Each variant equals the one-rank layer on each
// rank's tokens (expert gradients: the reference's summed over ranks, in the
// rank's shard; b2's whole on every shard rank); the repeated variant gives
// the same bytes as its first run, and no input changes.
TEST_P(ShardedRun, EveryVariantMatchesTheReferenceAndSwitchingIsFree) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readText(GetParam()), *plan);
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
  reference::LayerInputs global = reference::makeRandomInputs(config, rng);
  std::vector<reference::LayerInputs> inputs(W);
  std::vector<std::vector<double>> gradOut(W);
  for (int r = 0; r < W; ++r) {
    for (int attempt = 0;; ++attempt) {
      ASSERT_LT(attempt, 1000) << "no tie-free tokens";
      inputs[r] = global;
      inputs[r].x = reference::makeRandomInputs(config, rng).x;
      reference::RoutingMargins margins = reference::routingMargins(
          config, reference::referenceRouting(config, inputs[r], refOptions));
      if (margins.logitGap > 1e-3 &&
          (!config.batchPrioritized || margins.priorityGap > 1e-3))
        break;
    }
    std::normal_distribution<double> normal;
    gradOut[r].resize(config.tokens * config.modelDim);
    for (double &v : gradOut[r])
      v = normal(rng);
    gradOut[r] = reference::roundTo(gradOut[r], config.dtype);
  }
  const double gradLAux = 0.5;
  std::vector<RankBuffers> buffers(W);
  for (int r = 0; r < W; ++r) {
    RankBuffers &b = buffers[r];
    b.init(*plan);
    b.set("x", inputs[r].x);
    b.set("wg", global.wg);
    for (auto [name, values] :
         {std::pair<const char *, const std::vector<double> *>{"w1",
                                                               &global.w1},
          {"b1", &global.b1},
          {"w2", &global.w2},
          {"b2", &global.b2},
          {"w3", &global.w3}})
      b.set(name, sliceExpertParameter(config, W, r, name, *values));
    b.set("grad_out", gradOut[r]);
    b.set("grad_l_aux", {gradLAux});
  }
  std::vector<std::map<std::string, std::vector<uint8_t>>> inputsBefore(W);
  for (int r = 0; r < W; ++r)
    for (const Argument &a : plan->arguments)
      if (a.role == ArgumentRole::Input || a.role == ArgumentRole::GradInput)
        inputsBefore[r][a.name] = buffers[r].data[a.name];

  // The reference per rank; expert gradients summed over ranks.
  std::vector<reference::LayerForward> forward(W);
  std::vector<reference::LayerGradients> grads(W);
  reference::LayerGradients sum;
  for (int r = 0; r < W; ++r) {
    grads[r] = reference::referenceBackward(config, inputs[r], gradOut[r],
                                            gradLAux, refOptions, &forward[r]);
    for (auto field :
         {&reference::LayerGradients::w1, &reference::LayerGradients::b1,
          &reference::LayerGradients::w2, &reference::LayerGradients::b2,
          &reference::LayerGradients::w3}) {
      std::vector<double> &to = sum.*field;
      const std::vector<double> &v = grads[r].*field;
      to.resize(v.size(), 0.0);
      for (size_t i = 0; i < v.size(); ++i)
        to[i] += v[i];
    }
  }

  // Variants 0, 1, ..., n-1, then 0 again.
  const size_t numVariants = plan->variants.size();
  ASSERT_GE(numVariants, 2u);
  std::vector<std::vector<std::map<std::string, std::vector<uint8_t>>>> results(
      W, std::vector<std::map<std::string, std::vector<uint8_t>>>(numVariants +
                                                                  1));
  std::vector<std::shared_ptr<Communicator>> ranks;
  ASSERT_TRUE(createLocalCommunicators(W, ranks, 30).isOk());
  std::vector<std::string> failures(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      std::unique_ptr<Executor> executor;
      Status s = Executor::create(plan, createCpuBackend(), executor);
      // A workspace of NaN bytes: a padding row no step zeroes would reach
      // the GEMMs over whole capacity blocks and show.
      const size_t align = plan->workspace.alignment;
      const size_t bytes = (plan->workspace.bytes + align - 1) / align * align;
      std::unique_ptr<void, void (*)(void *)> workspace(
          std::aligned_alloc(align, bytes), std::free);
      std::memset(workspace.get(), 0xff, bytes);
      if (s)
        s = executor->setWorkspace(workspace.get(), plan->workspace.bytes);
      if (s)
        s = executor->setCommunicator(ranks[r]);
      for (size_t run = 0; s && run <= numVariants; ++run) {
        size_t v = run % numVariants;
        buffers[r].poison();
        std::vector<Binding> bindings = buffers[r].bindings();
        s = executor->selectVariant(static_cast<int64_t>(v));
        if (s)
          s = executor->forward(bindings.data(), bindings.size());
        if (s)
          s = executor->backward(bindings.data(), bindings.size());
        if (!s)
          failures[r] = plan->variants[v].name + ": " + s.message();
        results[r][run] = buffers[r].data;
      }
      if (!s && failures[r].empty())
        failures[r] = s.message();
    });
  for (std::thread &thread : threads)
    thread.join();
  for (int r = 0; r < W; ++r)
    ASSERT_TRUE(failures[r].empty()) << "rank " << r << ": " << failures[r];

  const double tolerance = config.dtype == DType::F32 ? 1e-5 : 2e-2;
  for (int r = 0; r < W; ++r) {
    for (size_t v = 0; v < numVariants; ++v) {
      SCOPED_TRACE("rank " + std::to_string(r) + " variant " +
                   plan->variants[v].name);
      RankBuffers b = buffers[r];
      b.data = results[r][v];
      auto check = [&](const char *name, const std::vector<double> &want) {
        if (!b.has(name))
          return;
        double floor = reference::normL2(want) == 0.0 ? 1.0 : 0.0;
        EXPECT_LE(reference::relativeL2(b.get(name), want, floor), tolerance)
            << name;
      };
      check("out", forward[r].out);
      check("l_aux", {forward[r].lAux});
      check("grad_x", grads[r].x);
      check("grad_wg", grads[r].wg);
      check("grad_w1", sliceExpertParameter(config, W, r, "w1", sum.w1));
      check("grad_b1", sliceExpertParameter(config, W, r, "b1", sum.b1));
      check("grad_w2", sliceExpertParameter(config, W, r, "w2", sum.w2));
      check("grad_b2", sliceExpertParameter(config, W, r, "b2", sum.b2));
      check("grad_w3", sliceExpertParameter(config, W, r, "w3", sum.w3));
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
