//===- StepFactsTest.cpp - Tests of the compiled step facts ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests computeStepFacts on the checked-in plans: the static
// capacity of fixed and dynamic routings, the chunk of each segment op of a
// pipelined variant, backward steps referring to the forward gate, and the
// consumers of shard_routing; the JSON form round-trips; and a plan whose
// recorded facts differ from its data flow is rejected naming the field.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/StepFacts.h"
#include "flex/Runtime/PlanLoader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

using namespace flex;
using Json = nlohmann::ordered_json;
using ::testing::HasSubstr;

namespace {

std::string readFile(const std::string &path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

const char *const kRuntimePlans[] = {"ffn_fixed_train.json",
                                     "ffn_dropless_ragged_train.json",
                                     "ffn_dropless_ragged_train_bf16.json",
                                     "gated_bounded_infer.json",
                                     "gated_fixed_train.json",
                                     "mr_ffn_dropless_w4_train.json",
                                     "mr_ffn_fixed_w2_train.json",
                                     "mr_ffn_fixed_w4_infer.json",
                                     "mr_gated_bounded_w2_train_bf16.json",
                                     "mr_shard_ffn_e1_w2_train.json",
                                     "mr_shard_ffn_e1_w4_train.json",
                                     "mr_shard_ffn_e2_w4_train_bf16.json",
                                     "mr_shard_gated_e2_w4_train.json",
                                     "mr_small_ffn_2dh_w4_train.json"};
const char *const kCudaPlans[] = {
    "c1_ffn_relu_infer.json", "c1_ffn_relu_train.json", "small_ffn_train.json",
    "small_swiglu_bf16_train.json"};

/// Loads a checked-in plan (unittests/Runtime/plans, or unittests/Cuda/plans
/// with `cuda`) into `plan` and computes its facts.
::testing::AssertionResult loadInto(Plan &plan, const std::string &name,
                                    bool cuda = false) {
  std::string dir = cuda ? FLEX_TEST_CUDA_PLANS_DIR : FLEX_TEST_PLANS_DIR;
  Status status = parsePlan(readFile(dir + "/" + name), plan);
  if (!status.isOk())
    return ::testing::AssertionFailure() << name << ": " << status.message();
  computeStepFacts(plan);
  return ::testing::AssertionSuccess();
}
#define LOAD_PLAN(plan, ...)                                                   \
  Plan plan;                                                                   \
  ASSERT_TRUE(loadInto(plan, __VA_ARGS__))

const Variant &variantNamed(const Plan &plan, const std::string &name) {
  int64_t index = plan.findVariant(name);
  EXPECT_GE(index, 0) << "no variant " << name;
  return plan.variants.at(index < 0 ? 0 : index);
}

StepRef fwd(int32_t index) { return {false, index}; }
StepRef bwd(int32_t index) { return {true, index}; }

/// The index of the first step of `op` in `steps`; -1 when none.
int32_t firstOf(const std::vector<Step> &steps, StepOp op) {
  for (size_t i = 0; i < steps.size(); ++i)
    if (steps[i].op == op)
      return static_cast<int32_t>(i);
  return -1;
}

/// [cap-1] for a fixed capacity: k * int(f * ceil(T / E)), aligned.
int64_t fixedC(const LayerConfig &layer, int64_t alignment = 1) {
  int64_t spe = (layer.tokens + layer.experts - 1) / layer.experts;
  int64_t c =
      layer.topK * static_cast<int64_t>(layer.capacityFactor * double(spe));
  return (c + alignment - 1) / alignment * alignment;
}

bool readsRouting(StepOp op) {
  return op == StepOp::Dispatch || op == StepOp::Combine ||
         op == StepOp::CombineBackward || op == StepOp::DispatchBackward;
}

} // namespace

TEST(StepFacts, StepRefText) {
  EXPECT_EQ(toString(fwd(3)), "forward[3]");
  EXPECT_EQ(toString(bwd(0)), "backward[0]");
  EXPECT_EQ(toString(StepRef{}), "none");
  EXPECT_EQ(parseStepRef("backward[12]"), bwd(12));
  for (const char *bad : {"none", "forward[]", "forward[-1]", "forward[1",
                          "forward[1]x", "side[1]", "forward[x]"})
    EXPECT_FALSE(parseStepRef(bad).has_value()) << bad;
}

// A fixed capacity with the padded layout is known on the host: C of [cap-1].
// The ragged variant of the same plan shares the buffer names but not the
// layout: its C is known only on the device.
TEST(StepFacts, FixedPaddedHasStaticCapacity) {
  LOAD_PLAN(plan, "ffn_fixed_train.json");
  const int64_t C = fixedC(plan.layer);
  ASSERT_GT(C, 0);
  const Variant &padded = variantNamed(plan, "padded");
  const int32_t gate = firstOf(padded.forward, StepOp::Gate);
  ASSERT_GE(gate, 0);
  EXPECT_EQ(padded.forward[gate].facts.capacityFrom, fwd(gate));
  EXPECT_EQ(padded.forward[gate].facts.staticCapacity, C);
  for (const std::vector<Step> *steps : {&padded.forward, &padded.backward})
    for (const Step &step : *steps)
      if (step.in(OperandRole::ExpertOffsets).isValid()) {
        EXPECT_EQ(step.facts.routing, fwd(gate)) << toString(step.op);
        EXPECT_EQ(step.facts.staticCapacity, C) << toString(step.op);
        EXPECT_TRUE(step.facts.padded) << toString(step.op);
        EXPECT_EQ(step.facts.wait, ExchangeWait::Overlapping);
      }
  const Variant &ragged = variantNamed(plan, "ragged");
  for (const Step &step : ragged.forward) {
    EXPECT_EQ(step.facts.staticCapacity, -1) << toString(step.op);
    EXPECT_FALSE(step.facts.padded) << toString(step.op);
  }

  LOAD_PLAN(cuda, "small_ffn_train.json", /*cuda=*/true);
  EXPECT_EQ(cuda.variants[0]
                .forward[firstOf(cuda.variants[0].forward, StepOp::Dispatch)]
                .facts.staticCapacity,
            fixedC(cuda.layer));
}

TEST(StepFacts, DroplessAndBoundedAreDynamic) {
  for (const char *name :
       {"ffn_dropless_ragged_train.json", "gated_bounded_infer.json",
        "mr_ffn_dropless_w4_train.json", "mr_shard_gated_e2_w4_train.json"}) {
    LOAD_PLAN(plan, name);
    for (const Variant &variant : plan.variants)
      for (const std::vector<Step> *steps :
           {&variant.forward, &variant.backward})
        for (const Step &step : *steps) {
          EXPECT_EQ(step.facts.staticCapacity, -1)
              << name << " " << variant.name << " " << toString(step.op);
          EXPECT_EQ(step.facts.segments.rows, -1);
          EXPECT_EQ(step.facts.segments.baseRow, 0);
        }
  }
  LOAD_PLAN(plan, "ffn_dropless_ragged_train.json");
  const Variant &v = plan.variants[0];
  const int32_t gate = firstOf(v.forward, StepOp::Gate);
  EXPECT_EQ(v.forward[firstOf(v.forward, StepOp::GroupedGemm)].facts.routing,
            fwd(gate));
}

// Each chunk's segment ops read the offsets of their own chunk's
// uniform_segments (the chunks share one offsets buffer), with the static
// rows n = W * C / D and base row q * G * n; backward steps that read the
// routing refer to the forward gate.
TEST(StepFacts, PipelinedChunksReferToTheirOwnSegments) {
  LOAD_PLAN(plan, "mr_ffn_fixed_w2_train.json");
  for (const char *name : {"ep2", "ex2"}) {
    const Variant &v = variantNamed(plan, name);
    const int32_t gate = firstOf(v.forward, StepOp::Gate);
    ASSERT_GE(gate, 0);
    const int64_t C =
        fixedC(plan.layer, v.forward[gate].attrs.capacityAlignment);
    int segmentOps = 0;
    for (bool backward : {false, true}) {
      const std::vector<Step> &steps = backward ? v.backward : v.forward;
      StepRef lastSegments;
      for (size_t i = 0; i < steps.size(); ++i) {
        const Step &step = steps[i];
        const StepFacts &facts = step.facts;
        std::string at =
            std::string(name) + " " + toString(StepRef{backward, int32_t(i)});
        if (step.op == StepOp::UniformSegments)
          lastSegments = {backward, static_cast<int32_t>(i)};
        if (step.op == StepOp::AllToAll) {
          EXPECT_TRUE(facts.exchangeStream) << at;
          EXPECT_EQ(facts.wait, ExchangeWait::None) << at;
          EXPECT_EQ(facts.capacityFrom, fwd(gate)) << at;
          EXPECT_EQ(facts.staticCapacity, C) << at;
        }
        if (readsRouting(step.op)) {
          EXPECT_EQ(facts.routing, fwd(gate)) << at;
          EXPECT_FALSE(facts.segments.isValid()) << at;
        }
        if (!step.in(OperandRole::ExpertOffsets).isValid() ||
            readsRouting(step.op))
          continue;
        ++segmentOps;
        ASSERT_TRUE(lastSegments.isValid()) << at;
        const StepAttrs &seg = steps[lastSegments.index].attrs;
        EXPECT_EQ(facts.segments.step, lastSegments) << at;
        EXPECT_FALSE(facts.routing.isValid()) << at;
        EXPECT_EQ(facts.capacityFrom, fwd(gate)) << at;
        EXPECT_EQ(facts.segments.chunk, seg.chunk) << at;
        EXPECT_EQ(facts.segments.chunks, 2) << at;
        const int64_t n = plan.worldSize * C / 2;
        EXPECT_EQ(facts.segments.rows, n) << at;
        EXPECT_EQ(facts.segments.baseRow, seg.chunk * seg.groups * n) << at;
        EXPECT_EQ(facts.wait, ExchangeWait::Overlapping) << at;
      }
    }
    EXPECT_EQ(segmentOps, 2 * 2 + 5 * 2) << name;
  }
  // The explicit numbers of ep2: T = 12, E = 4, k = 2, f = 1.25 gives
  // C = 2 * int(1.25 * 3) = 6; n = 2 * 6 / 2 = 6; chunk 1 from row 2 * 6.
  const Variant &ep2 = variantNamed(plan, "ep2");
  EXPECT_EQ(ep2.forward[10].facts.segments.step, fwd(9));
  EXPECT_EQ(ep2.forward[10].facts.segments.baseRow, 12);
  EXPECT_EQ(ep2.forward[5].facts.segments.step, fwd(4));
  EXPECT_EQ(ep2.forward[5].facts.segments.baseRow, 0);
  EXPECT_EQ(ep2.backward[3].facts.segments.step, bwd(2));
  EXPECT_EQ(ep2.backward[3].facts.segments.baseRow, 12);
  EXPECT_EQ(ep2.backward[11].facts.segments.step, bwd(10));
  EXPECT_EQ(ep2.backward[11].facts.segments.baseRow, 0);
  EXPECT_EQ(ep2.backward[0].facts.routing, fwd(1));
  // The data-parallel variant runs no exchange: its collectives join.
  const Variant &dp = variantNamed(plan, "dp");
  EXPECT_EQ(dp.forward[0].facts.wait, ExchangeWait::All);
}

// Experts sharded over ranks: the steps that move tokens read the routing
// shard_routing writes, and keep the gate's padded C.
TEST(StepFacts, ShardRoutingConsumersReferToShardRouting) {
  LOAD_PLAN(plan, "mr_shard_ffn_e1_w2_train.json");
  for (const Variant &v : plan.variants) {
    const int32_t gate = firstOf(v.forward, StepOp::Gate);
    const int32_t shard = firstOf(v.forward, StepOp::ShardRouting);
    ASSERT_GE(shard, 0) << v.name;
    const int64_t C =
        fixedC(plan.layer, v.forward[gate].attrs.capacityAlignment);
    int consumers = 0;
    for (const std::vector<Step> *steps : {&v.forward, &v.backward})
      for (const Step &step : *steps)
        if (readsRouting(step.op)) {
          ++consumers;
          EXPECT_EQ(step.facts.routing, fwd(shard)) << v.name;
          EXPECT_EQ(step.facts.capacityFrom, fwd(gate)) << v.name;
          EXPECT_EQ(step.facts.staticCapacity, C) << v.name;
          EXPECT_TRUE(step.facts.padded) << v.name;
        }
    EXPECT_EQ(consumers, 4) << v.name;
  }
}

// ranks_per_node N with 1 < N < W: the 2DH exchange runs on the compute
// stream after every pending exchange.
TEST(StepFacts, TwoPhaseExchangeJoins) {
  LOAD_PLAN(plan, "mr_small_ffn_2dh_w4_train.json");
  int exchanges = 0;
  for (const Variant &v : plan.variants)
    for (const Step &step : v.forward)
      if (step.op == StepOp::AllToAll) {
        ++exchanges;
        EXPECT_FALSE(step.facts.exchangeStream);
        EXPECT_EQ(step.facts.wait, ExchangeWait::All);
      }
  EXPECT_GT(exchanges, 0);
}

// Every checked-in plan: the facts it gets are the ones the check accepts,
// and each step's facts survive their JSON form.
TEST(StepFacts, RoundTripAndCheckOnEveryPlan) {
  auto check = [](const Plan &plan, const std::string &name) {
    EXPECT_TRUE(verifyStepFacts(plan).isOk()) << name;
    for (const Variant &v : plan.variants)
      for (const std::vector<Step> *steps : {&v.forward, &v.backward})
        for (const Step &step : *steps) {
          Json json = writeStepFacts(step.facts);
          EXPECT_EQ(readStepFacts(Json::parse(json.dump()), "facts"),
                    step.facts)
              << name << ": " << json.dump();
        }
  };
  for (bool cuda : {false, true})
    for (const char *name :
         cuda ? std::vector<const char *>(std::begin(kCudaPlans),
                                          std::end(kCudaPlans))
              : std::vector<const char *>(std::begin(kRuntimePlans),
                                          std::end(kRuntimePlans))) {
      Plan plan;
      ::testing::AssertionResult loaded = loadInto(plan, name, cuda);
      EXPECT_TRUE(loaded);
      if (loaded)
        check(plan, name);
    }
}

TEST(StepFacts, AlteredFactsAreRejectedNamingTheField) {
  LOAD_PLAN(plan, "mr_ffn_fixed_w2_train.json");
  const int64_t v = plan.findVariant("ep2");
  ASSERT_GE(v, 0);
  auto expectRejected = [&](const Plan &altered, const std::string &field) {
    Status status = verifyStepFacts(altered);
    ASSERT_FALSE(status.isOk()) << field;
    EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
    EXPECT_THAT(status.message(), HasSubstr(field));
  };
  std::string at = "variants[" + std::to_string(v) + "].";
  {
    Plan altered = plan;
    altered.variants[v].forward[10].facts.staticCapacity += 2;
    expectRejected(altered, at + "forward[10].facts.static_capacity");
  }
  {
    Plan altered = plan;
    altered.variants[v].forward[10].facts.segments.baseRow = 0;
    expectRejected(altered, at + "forward[10].facts.segments");
  }
  {
    Plan altered = plan;
    altered.variants[v].backward[0].facts.routing = bwd(0);
    expectRejected(altered, at + "backward[0].facts.routing");
  }
  {
    Plan altered = plan;
    altered.variants[v].forward[3].facts.exchangeStream = false;
    expectRejected(altered, at + "forward[3].facts.exchange_stream");
  }
}

TEST(StepFacts, ReaderNamesTheBadField) {
  auto expectThrows = [](const char *text, const std::string &part) {
    try {
      (void)readStepFacts(Json::parse(text), "variants[0].forward[2].facts");
      ADD_FAILURE() << "accepted " << text;
    } catch (const StepFactsError &error) {
      EXPECT_THAT(error.what(), HasSubstr(part)) << text;
    }
  };
  expectThrows(R"({"routing": "forward"})",
               "'variants[0].forward[2].facts.routing'");
  expectThrows(R"({"static_capacity": "8"})", "facts.static_capacity'");
  expectThrows(R"({"static_capacity": -2})", "facts.static_capacity'");
  expectThrows(R"({"padded": 1})", "facts.padded'");
  expectThrows(R"({"wait": "later"})", "facts.wait'");
  expectThrows(R"({"capacity": 4})", "facts.capacity'");
  expectThrows(R"({"segments": {"step": "forward[1]"}})",
               "facts.segments.groups'");
  expectThrows(R"([])", "'variants[0].forward[2].facts'");
  EXPECT_EQ(readStepFacts(Json::object(), "facts"), StepFacts());
}
