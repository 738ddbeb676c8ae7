//===- TopologyTest.cpp - Collectives priced from a node shape ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The node-shape pricing of docs/CostModel.md ("Past the machines") with
// figures that add up by hand: the group members on a node, the flat
// all_to_all (NVLink and network parts at once), the 2DH one (two phases
// and the staging copies), rings and the all_reduce tree; the profile's
// `topology` field and the node shape read alone; and the cost model using
// the node shape where no exact measured point exists, always for 2DH.
//
//===----------------------------------------------------------------------===//

#include "MultiRankTestSupport.h"

#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/CostModel/Topology.h"
#include "flex/Runtime/PlanLoader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

using namespace flex;
using ::testing::HasSubstr;

namespace {

constexpr double kUs = 1e-6;

/// Nodes of 4; NVLink 10 us + 1 us per peer at 100 GB/s; the network 20 us
/// + 2 us per peer at 10 GB/s.
Topology fourPerNode() {
  Topology t;
  t.gpusPerNode = 4;
  t.intra = {10 * kUs, 1 * kUs, 100e9};
  t.inter = {20 * kUs, 2 * kUs, 10e9};
  return t;
}

TEST(Topology, MembersOnTheFirstNode) {
  const Topology t = fourPerNode();
  EXPECT_EQ(membersOnNode(t, 16, 1), 4);
  EXPECT_EQ(membersOnNode(t, 3, 1), 3); // the group is smaller than a node
  EXPECT_EQ(membersOnNode(t, 8, 2), 2); // ranks 0 and 2
  EXPECT_EQ(membersOnNode(t, 4, 4), 1); // one per node
  EXPECT_EQ(membersOnNode(t, 8, 8), 1);
  EXPECT_EQ(membersOnNode(t, 1, 1), 1);
}

TEST(Topology, LinkCostIsAlphaPlusPeersPlusBytes) {
  const Topology t = fourPerNode();
  // 10 + 3 x 1 + 3 MB / 100 GB/s = 43 us.
  EXPECT_NEAR(linkSeconds(t.intra, 3, 1e6), 43 * kUs, 1e-12);
  EXPECT_EQ(linkSeconds(t.intra, 0, 1e6), 0);
}

TEST(Topology, FlatAllToAllRunsBothLinksAtOnce) {
  const Topology t = fourPerNode();
  // 16 ranks, 1 MB per peer: 3 local peers (43 us) and 12 remote ones
  // (20 + 24 + 12 MB / 10 GB/s = 1244 us); the slower part is the time.
  TopologyCost cost = flatAllToAllCost(t, 16, 1, 1e6);
  EXPECT_NEAR(cost.intraSeconds, 43 * kUs, 1e-12);
  EXPECT_NEAR(cost.interSeconds, 1244 * kUs, 1e-12);
  EXPECT_NEAR(cost.seconds, 1244 * kUs, 1e-12);
  // Inside one node: NVLink only.
  cost = flatAllToAllCost(t, 4, 1, 1e6);
  EXPECT_EQ(cost.interSeconds, 0);
  EXPECT_NEAR(cost.seconds, 43 * kUs, 1e-12);
  // A group 4 apart has one member per node: 3 remote peers.
  EXPECT_NEAR(flatAllToAllCost(t, 4, 4, 1e6).seconds, (20 + 6 + 300) * kUs,
              1e-12);
  // The all_to_all kind of collectiveCost is the same exchange.
  EXPECT_NEAR(collectiveCost(t, CollectiveKind::AllToAll, 16, 1, 15e6).seconds,
              1244 * kUs, 1e-12);
}

TEST(Topology, TwoDHIsTwoPhasesAndItsCopies) {
  const Topology t = fourPerNode();
  StagingFigures staging{1e12, 5 * kUs, /*copyPerBlock=*/false};
  // 16 ranks on nodes of 4, 1 MB per peer. Phase 1: 3 node peers, 4 MB
  // each: 10 + 3 + 12 MB / 100 GB/s = 133 us. Phase 2: 3 other nodes,
  // 4 MB each: 20 + 6 + 1200 = 1226 us. Staging: 4 copies reading and
  // writing 16 MB at 1 TB/s = 128 us, 4 launches of 5 us.
  TopologyCost cost = hierarchicalAllToAllCost(t, 16, 4, 1e6, staging);
  EXPECT_NEAR(cost.intraSeconds, 133 * kUs, 1e-12);
  EXPECT_NEAR(cost.interSeconds, 1226 * kUs, 1e-12);
  EXPECT_NEAR(cost.stagingSeconds, (128 + 20) * kUs, 1e-12);
  EXPECT_NEAR(cost.seconds, (133 + 1226 + 148) * kUs, 1e-12);
  // The CUDA backend's reorders: one copy per block, 2 + 2 x 16 launches.
  staging.copyPerBlock = true;
  EXPECT_NEAR(hierarchicalAllToAllCost(t, 16, 4, 1e6, staging).stagingSeconds,
              (128 + 34 * 5) * kUs, 1e-12);
  // Large messages: the same network bytes as the flat exchange (1244 us)
  // plus a phase and copies, so 2DH loses.
  EXPECT_GT(cost.seconds, flatAllToAllCost(t, 16, 1, 1e6).seconds);
}

TEST(Topology, TwoDHWinsWithSmallMessagesOnManyNodes) {
  const Topology t = fourPerNode();
  StagingFigures fused{1e12, 5 * kUs, /*copyPerBlock=*/false};
  // 64 ranks, 1 KB per peer. Flat: 60 remote peers, 20 + 120 + 60 KB /
  // 10 GB/s = 146 us.
  EXPECT_NEAR(flatAllToAllCost(t, 64, 1, 1e3).seconds, 146 * kUs, 1e-12);
  // 2DH: phase 1 10 + 3 + 48 KB / 100 GB/s = 13.48 us; phase 2 15 nodes,
  // 4 KB each: 20 + 30 + 6 = 56 us; staging 8 x 64 KB / 1 TB/s + 20 us.
  TopologyCost cost = hierarchicalAllToAllCost(t, 64, 4, 1e3, fused);
  EXPECT_NEAR(cost.intraSeconds, 13.48 * kUs, 1e-12);
  EXPECT_NEAR(cost.interSeconds, 56 * kUs, 1e-12);
  EXPECT_NEAR(cost.seconds, (13.48 + 56 + 0.512 + 20) * kUs, 1e-12);
  // With a copy per block (130 launches: 650 us) it loses again.
  StagingFigures perBlock = fused;
  perBlock.copyPerBlock = true;
  EXPECT_GT(hierarchicalAllToAllCost(t, 64, 4, 1e3, perBlock).seconds,
            146 * kUs);
}

TEST(Topology, RingsRunAtTheSlowestLink) {
  const Topology t = fourPerNode();
  // 8 ranks span two nodes: the network, 20 + 7 x 2 + 7 MB / 10 GB/s.
  EXPECT_NEAR(collectiveCost(t, CollectiveKind::AllGather, 8, 1, 7e6).seconds,
              734 * kUs, 1e-12);
  // 4 ranks of one node: NVLink, 10 + 3 + 3 MB / 100 GB/s.
  TopologyCost inside =
      collectiveCost(t, CollectiveKind::ReduceScatter, 4, 1, 3e6);
  EXPECT_NEAR(inside.seconds, 43 * kUs, 1e-12);
  EXPECT_NEAR(inside.intraSeconds, 43 * kUs, 1e-12);
  // A 4-byte all_reduce over 64 ranks: the tree's 2 x 6 steps (44 us and
  // 8 bytes), not the ring's 2 x 63.
  EXPECT_NEAR(collectiveCost(t, CollectiveKind::AllReduce, 64, 1, 4).seconds,
              44 * kUs + 8 / 10e9, 1e-12);
  // 2 ranks: the ring (2 x 1 step, 4 bytes) equals the tree.
  EXPECT_NEAR(collectiveCost(t, CollectiveKind::AllReduce, 2, 1, 4).seconds,
              12 * kUs + 4 / 100e9, 1e-12);
  EXPECT_EQ(collectiveCost(t, CollectiveKind::AllGather, 1, 1, 0).seconds, 0);
}

/// A calibrated profile of 4 ranks, `extra` JSON appended before the end.
std::string profileText(const std::string &collectives,
                        const std::string &extra, bool builtin = false) {
  return std::string(R"({
  "format": "flex-device-profile", "version": 2, "source": ")") +
         (builtin ? "builtin" : "calibrated") + R"(",
  "device": {"name": "golden", "backend": "cuda"},
  "world": {"size": 4, "ranks_per_node": 4},
  "gemm": [{"m": 12, "n": 12, "k": 8, "dtype": "f32", "ragged": false,
            "flops_per_s": 2304e6}],
  "memory": {"bandwidth_bytes_per_s": 1e30, "launch_s": 1e-6},
  "collectives": [)" +
         collectives +
         R"(],
  "overlap": {"compute_slowdown": 1})" +
         extra + "\n}";
}

/// Nodes of 2: NVLink 2 us + 1 us per peer, the network 5 us + 2 us per
/// peer; a message of the small_ffn plan's 327680-byte block takes 1 us
/// over NVLink and 10 us over the network.
const char *kTwoPerNode = R"(,
  "topology": {"gpus_per_node": 2,
    "intra": {"alpha_s": 2e-6, "per_peer_s": 1e-6, "beta_bytes_per_s": 327.68e9},
    "inter": {"alpha_s": 5e-6, "per_peer_s": 2e-6, "beta_bytes_per_s": 32.768e9},
    "source": "test"})";

DeviceProfile parsed(const std::string &text) {
  DeviceProfile profile;
  Status status = parseProfile(text, profile);
  EXPECT_TRUE(status.isOk()) << status.message();
  return profile;
}

TEST(Topology, ProfileFieldRoundTripsAndErrorsNameTheField) {
  DeviceProfile profile = parsed(profileText("", kTwoPerNode));
  ASSERT_TRUE(profile.topology.has_value());
  EXPECT_EQ(profile.topology->gpusPerNode, 2);
  EXPECT_DOUBLE_EQ(profile.topology->inter.perPeerSeconds, 2e-6);
  EXPECT_EQ(profile.topology->source, "test");
  DeviceProfile again = parsed(writeProfile(profile));
  ASSERT_TRUE(again.topology.has_value());
  EXPECT_DOUBLE_EQ(again.topology->intra.betaBytesPerSecond, 327.68e9);
  EXPECT_EQ(writeProfile(again), writeProfile(profile));
  // Optional: a profile without one has none, and writes none.
  EXPECT_FALSE(parsed(profileText("", "")).topology.has_value());
  EXPECT_THAT(writeProfile(parsed(profileText("", ""))),
              ::testing::Not(HasSubstr("topology")));

  auto error = [](const std::string &topology) {
    DeviceProfile p;
    return parseProfile(profileText("", ",\n  \"topology\": " + topology), p)
        .message();
  };
  const std::string link =
      R"({"alpha_s": 0, "per_peer_s": 0, "beta_bytes_per_s": 1})";
  EXPECT_EQ(error("[]"), "profile field 'topology': not an object");
  EXPECT_EQ(error(R"({"gpus_per_node": 0, "intra": )" + link +
                  R"(, "inter": )" + link + "}"),
            "profile field 'topology.gpus_per_node': must be >= 1, got 0");
  EXPECT_EQ(error(R"({"gpus_per_node": 8, "intra": )" + link + "}"),
            "profile field 'topology.inter': missing");
  EXPECT_EQ(error(R"({"gpus_per_node": 8, "intra": )" + link +
                  R"(, "inter": {"alpha_s": 0, "per_peer_s": -1,
                      "beta_bytes_per_s": 1}})"),
            "profile field 'topology.inter.per_peer_s': must be a finite "
            "number >= 0");
  EXPECT_EQ(error(R"({"gpus_per_node": 8, "intra": )" + link +
                  R"(, "inter": {"alpha_s": 0, "per_peer_s": 0,
                      "beta_bytes_per_s": 0}})"),
            "profile field 'topology.inter.beta_bytes_per_s': must be a "
            "finite number > 0");
  EXPECT_EQ(error(R"({"gpus_pernode": 8})"),
            "profile field 'topology.gpus_pernode': unknown field");
}

TEST(Topology, NodeShapeReadAlone) {
  Topology t;
  ASSERT_TRUE(parseTopology(writeTopology(fourPerNode()), t).isOk());
  EXPECT_EQ(t.gpusPerNode, 4);
  EXPECT_DOUBLE_EQ(t.inter.alphaSeconds, 20 * kUs);
  Status bad = parseTopology(R"({"gpus_per_node": 8, "intra": {"alpha_s":
      0, "per_peer_s": 0, "beta_bytes_per_s": "fast"}})",
                             t);
  EXPECT_EQ(bad.code(), StatusCode::InvalidArgument);
  EXPECT_EQ(bad.message(),
            "node shape field 'intra.beta_bytes_per_s': not a number");
  EXPECT_THAT(parseTopology("{", t).message(),
              HasSubstr("node shape is not valid JSON"));
}

Plan loadPlan(const std::string &name) {
  Plan plan;
  Status status = parsePlan(test::readTestPlan(name), plan);
  EXPECT_TRUE(status.isOk()) << status.message();
  return plan;
}

/// The first forward all_to_all of variant `name`.
Step *firstExchange(Plan &plan, const std::string &name) {
  for (Step &step : plan.variants.at(plan.findVariant(name)).forward)
    if (step.op == StepOp::AllToAll)
      return &step;
  return nullptr;
}

TEST(Topology, TheCostModelPricesTwoDHFromTheNodeShape) {
  // small_ffn on 4 ranks, 2DH on nodes of 2: E 8 x C 160 rows of 256 f32,
  // 1310720 bytes, a 327680-byte block per peer.
  Plan plan = loadPlan("mr_small_ffn_2dh_w4_train.json");
  Step *step = firstExchange(plan, "r1d1");
  ASSERT_NE(step, nullptr);
  ASSERT_EQ(step->attrs.ranksPerNode, 2);
  CostModel model(parsed(profileText("", kTwoPerNode)));
  const int64_t rows = 8 * 160;
  EXPECT_DOUBLE_EQ(model.stepBasis(plan, *step, rows).bytesExchanged,
                   1310720.0 * 3 / 4);
  EXPECT_TRUE(model.usesTopology(plan, *step));
  // Phase 1: 2 + 1 + one 2-block message (2 us) = 5 us. Phase 2: 5 + 2 +
  // one 2-block message over the network (20 us) = 27 us. Staging: no
  // bytes time at 1e30 B/s, 2 + 2 x 4 copies of 1 us.
  EXPECT_NEAR(model.stepSeconds(plan, *step, rows), (5 + 27 + 10) * kUs, 1e-12);
  CostModelOptions fused;
  fused.hierarchicalCopyPerBlock = false;
  CostModel fusedModel(parsed(profileText("", kTwoPerNode)), fused);
  EXPECT_NEAR(fusedModel.stepSeconds(plan, *step, rows), (5 + 27 + 4) * kUs,
              1e-12);
  // The same exchange flat: 1 local peer (2 + 1 + 1 = 4 us) beside 2
  // remote ones (5 + 4 + 20 = 29 us).
  step->attrs.ranksPerNode = 0;
  EXPECT_NEAR(model.stepSeconds(plan, *step, rows), 29 * kUs, 1e-12);
}

TEST(Topology, AnExactMeasuredPointWinsOverTheNodeShape) {
  Plan plan = loadPlan("mr_small_ffn_2dh_w4_train.json");
  Step *step = firstExchange(plan, "r1d1");
  ASSERT_NE(step, nullptr);
  const int64_t rows = 8 * 160;
  const std::string measured =
      R"({"kind": "all_to_all", "world_size": 4, "group_size": 4,
          "transport": "nccl", "alpha_s": 0, "beta_bytes_per_s": 983040e6})";
  CostModel model(parsed(profileText(measured, kTwoPerNode)));
  // 2DH: a measured point is a flat exchange, so the node shape prices it.
  EXPECT_TRUE(model.usesTopology(plan, *step));
  EXPECT_NEAR(model.stepSeconds(plan, *step, rows), 42 * kUs, 1e-12);
  // Flat, W 4, group 4: the measured 1 us.
  step->attrs.ranksPerNode = 0;
  EXPECT_FALSE(model.usesTopology(plan, *step));
  EXPECT_NEAR(model.stepSeconds(plan, *step, rows), 1 * kUs, 1e-12);
  // Another transport asked for: not exact, the node shape.
  CostModelOptions mpi;
  mpi.transport = "mpi";
  CostModel other(parsed(profileText(measured, kTwoPerNode)), mpi);
  EXPECT_NEAR(other.stepSeconds(plan, *step, rows), 29 * kUs, 1e-12);
  // A built-in profile's points are no measurement.
  CostModel builtin(parsed(profileText(measured, kTwoPerNode, true)));
  EXPECT_TRUE(builtin.usesTopology(plan, *step));
  EXPECT_NEAR(builtin.stepSeconds(plan, *step, rows), 29 * kUs, 1e-12);
  // Without a node shape, the nearest point as before (2DH priced flat).
  CostModel plain(parsed(profileText(measured, "")));
  step->attrs.ranksPerNode = 2;
  EXPECT_FALSE(plain.usesTopology(plan, *step));
  EXPECT_NEAR(plain.stepSeconds(plan, *step, rows), 1 * kUs, 1e-12);
}

TEST(Topology, GathersOfADataParallelVariantCrossNodes) {
  // mr_ffn_fixed_w4_infer's dp gathers every rank's experts over 4 ranks:
  // on nodes of 2 the ring crosses the network, 5 + 3 x 2 us + bytes.
  Plan plan = loadPlan("mr_ffn_fixed_w4_infer.json");
  CostModel model(parsed(profileText("", kTwoPerNode)));
  for (const Step &step : plan.variants.at(plan.findVariant("dp")).forward) {
    if (step.op != StepOp::AllGather)
      continue;
    const double bytes = model.stepBasis(plan, step, -1).bytesExchanged;
    EXPECT_GT(bytes, 0);
    EXPECT_NEAR(model.stepSeconds(plan, step, -1), 11 * kUs + bytes / 32.768e9,
                1e-12);
  }
}

} // namespace
