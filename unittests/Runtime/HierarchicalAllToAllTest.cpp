//===- HierarchicalAllToAllTest.cpp - 2DH all_to_all equals flat ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the two-phase hierarchical (2DH) all_to_all
// (HierarchicalAllToAll.h) on the local (threads) communicator: its result is
// the flat exchange's byte for byte, for both directions and every chunk;
// each phase talks only to its peers; the loader reads, writes and checks
// `ranks_per_node`; and whole multi-rank plans give the same bytes with and
// without it.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/HierarchicalAllToAll.h"
#include "flex/Runtime/Comm/AllToAllLayout.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include "MultiRankTestSupport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <map>
#include <random>

using namespace flex;
using namespace flex::test;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::vector<uint8_t> randomBytes(size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> bytes(count);
  for (uint8_t &b : bytes)
    b = static_cast<uint8_t>(rng());
  return bytes;
}

//===----------------------------------------------------------------------===//
// The index math
//===----------------------------------------------------------------------===//

// Phase 1 talks only within the node, phase 2 only across nodes at one local
// index, and the two reorders are permutations.
TEST(HierarchicalAllToAll, PhasesTalkOnlyToTheirPeers) {
  for (auto [W, N] : {std::pair<int64_t, int64_t>{8, 2}, {8, 4}, {6, 3}}) {
    for (int64_t r = 0; r < W; ++r) {
      HierarchicalAllToAll h{W, N, r};
      std::vector<int64_t> offsets, sizes;
      h.phaseBlocks(1, 10, offsets, sizes);
      for (int64_t p = 0; p < W; ++p)
        EXPECT_EQ(sizes[p] != 0, p / N == r / N) << W << " " << N << " " << p;
      h.phaseBlocks(2, 10, offsets, sizes);
      for (int64_t p = 0; p < W; ++p)
        EXPECT_EQ(sizes[p] != 0, p % N == r % N) << W << " " << N << " " << p;
      std::vector<int> seen1(W), seen2(W);
      for (int64_t i = 0; i < W; ++i) {
        ++seen1[h.phase1Source(i)];
        ++seen2[h.phase2Source(i)];
      }
      EXPECT_EQ(seen1, std::vector<int>(W, 1));
      EXPECT_EQ(seen2, std::vector<int>(W, 1));
    }
  }
}

//===----------------------------------------------------------------------===//
// 2DH == flat, byte for byte
//===----------------------------------------------------------------------===//

struct Case {
  int64_t world, perNode, local, capacity, chunks;
};

void PrintTo(const Case &c, std::ostream *os) {
  *os << "W=" << c.world << " N=" << c.perNode << " L=" << c.local
      << " C=" << c.capacity << " D=" << c.chunks;
}

class TwoDHEqualsFlat : public ::testing::TestWithParam<Case> {};

// Random rows through the all_to_all step's packing (AllToAllLayout), both
// directions, every chunk: the hierarchical exchange writes the same bytes
// into the same places as the flat one, and leaves the rest alone.
TEST_P(TwoDHEqualsFlat, ForBothDirectionsAndEveryChunk) {
  const Case c = GetParam();
  const int64_t W = c.world, L = c.local, C = c.capacity, D = c.chunks;
  const int64_t E = W * L, rowBytes = 12; // 3 f32 or 6 bf16 columns
  const size_t bufferBytes = static_cast<size_t>(E * C * rowBytes);
  auto ranks = localRanks(static_cast<int>(W));
  std::vector<Status> results(W);
  std::vector<int> mismatches(W, 0);
  onRanks(static_cast<int>(W), [&](int rank) {
    Communicator &comm = *ranks[rank];
    std::vector<uint8_t> scratch;
    for (int64_t q = 0; q < D; ++q)
      for (AllToAllDirection direction :
           {AllToAllDirection::Dispatch, AllToAllDirection::Combine}) {
        const uint64_t seed =
            1000 * rank + 10 * q + (direction == AllToAllDirection::Dispatch);
        std::vector<uint8_t> input = randomBytes(bufferBytes, seed);
        // The rows no chunk writes keep the same garbage in both outputs.
        std::vector<uint8_t> flat = randomBytes(bufferBytes, seed + 7);
        std::vector<uint8_t> twoDH = flat;
        AllToAllLayout layout{W, L, C, D, q};
        const int64_t block = layout.blockRows() * rowBytes;
        std::vector<int64_t> offsets(W), sizes(W, block);
        for (int64_t p = 0; p < W; ++p)
          offsets[p] = p * block;
        std::vector<uint8_t> send(W * block), recv(W * block);

        layout.pack(direction, input.data(), rowBytes, send.data());
        Status s =
            comm.allToAll(send.data(), offsets.data(), sizes.data(),
                          recv.data(), offsets.data(), sizes.data(), "flat");
        if (s)
          layout.unpack(direction, recv.data(), rowBytes, flat.data());

        std::fill(recv.begin(), recv.end(), 0xab);
        layout.pack(direction, input.data(), rowBytes, send.data());
        if (s)
          s = hierarchicalAllToAll(comm, c.perNode, send.data(), recv.data(),
                                   block, scratch, "2dh");
        if (!s) {
          results[rank] = s;
          return;
        }
        layout.unpack(direction, recv.data(), rowBytes, twoDH.data());
        mismatches[rank] += flat != twoDH;
      }
  });
  for (int64_t r = 0; r < W; ++r) {
    EXPECT_TRUE(results[r].isOk())
        << "rank " << r << ": " << results[r].message();
    EXPECT_EQ(mismatches[r], 0) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, TwoDHEqualsFlat,
    ::testing::Values(Case{4, 2, 2, 4, 1}, Case{4, 2, 2, 4, 2},
                      Case{8, 2, 1, 4, 1}, Case{8, 2, 2, 6, 2},
                      Case{8, 4, 1, 4, 1}, Case{8, 4, 2, 4, 2},
                      Case{6, 3, 1, 2, 2},
                      // One node, one rank per node, one rank.
                      Case{4, 4, 2, 4, 2}, Case{4, 1, 2, 4, 2},
                      Case{8, 8, 1, 2, 1}, Case{1, 1, 3, 4, 2}),
    [](const ::testing::TestParamInfo<Case> &info) {
      const Case &c = info.param;
      // Appended piecewise: "W" + std::to_string trips GCC 12's -Wrestrict.
      std::string name;
      for (auto [key, value] : {std::pair<char, int64_t>{'W', c.world},
                                {'N', c.perNode},
                                {'L', c.local},
                                {'C', c.capacity},
                                {'D', c.chunks}}) {
        name += name.empty() ? "" : "_";
        name += key;
        name += std::to_string(value);
      }
      return name;
    });

TEST(HierarchicalAllToAll, RejectsANodeSizeThatDoesNotDivideTheRanks) {
  auto ranks = localRanks(1);
  std::vector<uint8_t> send(8), recv(8), scratch;
  Status status = hierarchicalAllToAll(*ranks[0], 3, send.data(), recv.data(),
                                       8, scratch, "step 4");
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(
      status.message(),
      HasSubstr("step 4: ranks_per_node 3 does not divide the 1 ranks"));
}

//===----------------------------------------------------------------------===//
// The plan format
//===----------------------------------------------------------------------===//

const char *const kPlan = "mr_ffn_dropless_w4_train.json";

/// Sets ranks_per_node on every all_to_all of `doc` (erases it for 0).
void setRanksPerNode(Json &doc, const Json &value) {
  for (Json &v : doc["variants"])
    for (const char *list : {"forward", "backward"})
      if (v.contains(list))
        for (Json &step : v[list])
          if (step["op"] == "all_to_all")
            step["attrs"]["ranks_per_node"] = value;
}

Status parseWith(const std::string &name, const Json &perNode, Plan &plan) {
  Json doc = Json::parse(readTestPlan(name));
  setRanksPerNode(doc, perNode);
  return parsePlan(doc.dump(), plan);
}

TEST(RanksPerNodePlan, LoadsWritesAndDefaultsToFlat) {
  Plan plan;
  ASSERT_TRUE(parseWith(kPlan, 2, plan).isOk());
  int exchanges = 0;
  for (const Variant &v : plan.variants)
    for (const Step &step : v.forward)
      if (step.op == StepOp::AllToAll) {
        EXPECT_EQ(step.attrs.ranksPerNode, 2);
        ++exchanges;
      }
  EXPECT_GT(exchanges, 0);
  std::string text = writePlan(plan);
  EXPECT_THAT(text, HasSubstr("\"ranks_per_node\": 2"));
  Plan again;
  ASSERT_TRUE(parsePlan(text, again).isOk());
  EXPECT_EQ(writePlan(again), text);
  // 0: flat, written as 0 (format 2 writes every attribute).
  Plan flat;
  ASSERT_TRUE(parseWith(kPlan, 0, flat).isOk());
  EXPECT_THAT(writePlan(flat), HasSubstr("\"ranks_per_node\": 0"));
  EXPECT_THAT(writePlan(flat),
              ::testing::Not(HasSubstr("\"ranks_per_node\": 2")));
  // N == W (one node) and N == 1 are allowed.
  EXPECT_TRUE(parseWith(kPlan, 4, plan).isOk());
  EXPECT_TRUE(parseWith(kPlan, 1, plan).isOk());
}

TEST(RanksPerNodePlan, RejectsNodeSizesThatDoNotDivideTheWorld) {
  for (int bad : {3, 8, -2}) {
    Plan plan;
    Status status = parseWith(kPlan, bad, plan);
    EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
    EXPECT_THAT(status.message(),
                HasSubstr(".attrs.ranks_per_node': ranks_per_node " +
                          std::to_string(bad) +
                          " does not divide the plan's world size 4; "
                          "allowed: 0 (flat), 1, 2, 4"));
  }
  Plan plan;
  Status status = parseWith(kPlan, "two", plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  EXPECT_THAT(status.message(), HasSubstr("ranks_per_node"));
}

//===----------------------------------------------------------------------===//
// Whole plans: 2DH == flat
//===----------------------------------------------------------------------===//

/// Runs `variant` of `plan` forward (and backward) on W local ranks with the
/// same seeded inputs every time; returns every rank's arguments.
std::vector<std::map<std::string, std::vector<uint8_t>>>
runOnRanks(const std::shared_ptr<Plan> &plan, const std::string &variant) {
  const int W = static_cast<int>(plan->worldSize);
  std::vector<std::map<std::string, std::vector<uint8_t>>> args(W);
  for (int r = 0; r < W; ++r) {
    std::mt19937_64 rng(17 + r);
    std::normal_distribution<float> normal(0.0f, 0.3f);
    for (const Argument &arg : plan->arguments) {
      std::vector<uint8_t> &bytes = args[r][arg.name];
      bytes.assign(arg.numBytes(), 0xff); // outputs start as NaN
      if (arg.role != ArgumentRole::Output &&
          arg.role != ArgumentRole::GradOutput) {
        EXPECT_EQ(arg.dtype, DType::F32) << arg.name;
        auto *values = reinterpret_cast<float *>(bytes.data());
        for (int64_t i = 0; i < arg.numElements(); ++i)
          values[i] = normal(rng);
      }
    }
  }
  auto ranks = localRanks(W);
  std::vector<Status> results(W);
  onRanks(W, [&](int r) {
    CpuRankExecutor rank;
    Status s = rank.create(plan, ranks[r], 0);
    std::vector<Binding> bindings;
    for (auto &[name, data] : args[r])
      bindings.push_back(
          {name.c_str(), data.data(), static_cast<int64_t>(data.size())});
    if (s)
      s = runVariant(*rank.executor, plan->findVariant(variant), bindings,
                     plan->training);
    results[r] = s;
  });
  for (int r = 0; r < W; ++r)
    EXPECT_TRUE(results[r].isOk())
        << "rank " << r << ": " << results[r].message();
  return args;
}

class TwoDHPlan : public ::testing::TestWithParam<PlanVariant> {};

TEST_P(TwoDHPlan, GivesTheFlatPlansBytes) {
  auto flat = std::make_shared<Plan>(), twoDH = std::make_shared<Plan>();
  ASSERT_TRUE(parseWith(GetParam().plan, 0, *flat).isOk());
  ASSERT_TRUE(parseWith(GetParam().plan, 2, *twoDH).isOk());
  auto want = runOnRanks(flat, GetParam().variant);
  auto got = runOnRanks(twoDH, GetParam().variant);
  for (size_t r = 0; r < want.size(); ++r)
    for (auto &[name, bytes] : want[r])
      EXPECT_TRUE(got[r][name] == bytes) << "rank " << r << " " << name;
}

INSTANTIATE_TEST_SUITE_P(
    Plans, TwoDHPlan,
    ::testing::Values(PlanVariant{"mr_ffn_dropless_w4_train.json", "ep1"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "ep2"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "ep2"}),
    planVariantName);

} // namespace
