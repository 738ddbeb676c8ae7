//===- MultiRankTest.cpp - Multi-rank plans without MPI -------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests what multi-rank plans need apart from MPI: the row mapping
// of all_to_all, the self and local (threads) communicators, the loader's
// rules for `world` and the collective steps, the padded zero-fill and the
// accumulating weight gradient of the kernels, and every multi-rank test plan
// run on W threads against the fp64 reference of the one-rank layer applied
// to each rank's tokens (expert weight gradients summed over ranks); and
// plans with the glu-fused step (grouped_gemm_glu) against those they were
// made from.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/AllToAllLayout.h"
#include "flex/Runtime/Comm/CallbackCommunicator.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

using namespace flex;
using namespace flex::test;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

//===----------------------------------------------------------------------===//
// all_to_all row mapping
//===----------------------------------------------------------------------===//

// Every row says where it came from: (rank, global expert, slot).
float rowTag(int64_t rank, int64_t expert, int64_t slot) {
  return static_cast<float>(rank * 10000 + expert * 100 + slot);
}

struct AllToAllCase {
  int64_t world, local, capacity, chunks;
};

class AllToAllMapping : public ::testing::TestWithParam<AllToAllCase> {};

// PlanFormat.md: for chunk q, rank i sends input[j, :, q*Cq:(q+1)*Cq] to
// rank j, which stores it at output[q, :, i] ([D, L, W, Cq]); combine is the
// exact inverse.
TEST_P(AllToAllMapping, DispatchFollowsThePlanFormatAndCombineInvertsIt) {
  const AllToAllCase c = GetParam();
  const int64_t W = c.world, L = c.local, C = c.capacity, D = c.chunks;
  const int64_t E = W * L, Cq = C / D, width = 2;
  const int64_t rowBytes = width * sizeof(float);
  auto ranks = localRanks(static_cast<int>(W));
  std::vector<std::vector<float>> input(W), received(W), back(W);
  for (int64_t r = 0; r < W; ++r) {
    input[r].assign(E * C * width, kNaN);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t s = 0; s < C; ++s)
        for (int64_t i = 0; i < width; ++i)
          input[r][(e * C + s) * width + i] = rowTag(r, e, s) + 0.5f * i;
    received[r].assign(E * C * width, kNaN);
    back[r].assign(E * C * width, kNaN);
  }
  onRanks(static_cast<int>(W), [&](int rank) {
    std::vector<uint8_t> send(E * C * rowBytes), recv(E * C * rowBytes);
    for (int64_t q = 0; q < D; ++q)
      for (AllToAllDirection direction :
           {AllToAllDirection::Dispatch, AllToAllDirection::Combine}) {
        AllToAllLayout layout{W, L, C, D, q};
        int64_t block = layout.blockRows() * rowBytes;
        std::vector<int64_t> offsets(W), sizes(W, block);
        for (int64_t p = 0; p < W; ++p)
          offsets[p] = p * block;
        bool dispatch = direction == AllToAllDirection::Dispatch;
        layout.pack(direction,
                    dispatch ? input[rank].data() : received[rank].data(),
                    rowBytes, send.data());
        Status status = ranks[rank]->allToAll(
            send.data(), offsets.data(), sizes.data(), recv.data(),
            offsets.data(), sizes.data(), "test all_to_all");
        ASSERT_TRUE(status.isOk()) << status.message();
        layout.unpack(direction, recv.data(), rowBytes,
                      dispatch ? received[rank].data() : back[rank].data());
      }
  });
  for (int64_t j = 0; j < W; ++j) {
    for (int64_t q = 0; q < D; ++q)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t i = 0; i < W; ++i)
          for (int64_t s = 0; s < Cq; ++s) {
            int64_t row = ((q * L + l) * W + i) * Cq + s;
            EXPECT_EQ(received[j][row * width],
                      rowTag(i, j * L + l, q * Cq + s))
                << "rank " << j << " row " << row;
          }
    EXPECT_EQ(back[j], input[j]) << "combine(dispatch(x)) != x on rank " << j;
  }

  // The in-place blocks (allToAllBlocks, what device ranks use) move every
  // row to the same place as pack, allToAll, unpack.
  std::vector<std::vector<float>> blockReceived(W), blockBack(W);
  for (int64_t r = 0; r < W; ++r) {
    blockReceived[r].assign(E * C * width, kNaN);
    blockBack[r].assign(E * C * width, kNaN);
  }
  onRanks(static_cast<int>(W), [&](int rank) {
    for (int64_t q = 0; q < D; ++q)
      for (AllToAllDirection direction :
           {AllToAllDirection::Dispatch, AllToAllDirection::Combine}) {
        AllToAllLayout layout{W, L, C, D, q};
        std::vector<Communicator::Block> sendBlocks, recvBlocks;
        layout.blocks(direction, rowBytes, sendBlocks, recvBlocks);
        bool dispatch = direction == AllToAllDirection::Dispatch;
        Status status = ranks[rank]->allToAllBlocks(
            dispatch ? input[rank].data() : blockReceived[rank].data(),
            sendBlocks,
            dispatch ? blockReceived[rank].data() : blockBack[rank].data(),
            recvBlocks, "test all_to_all blocks");
        ASSERT_TRUE(status.isOk()) << status.message();
      }
  });
  for (int64_t j = 0; j < W; ++j) {
    EXPECT_EQ(0, std::memcmp(blockReceived[j].data(), received[j].data(),
                             received[j].size() * sizeof(float)))
        << "rank " << j << ": blocks and staging received different rows";
    EXPECT_EQ(blockBack[j], input[j]) << "rank " << j;
  }
}

TEST(LocalCommunicator, AllToAllBlocksRejectsAPeerOutOfRange) {
  auto ranks = localRanks(1);
  float data[2] = {1, 2}, out[2] = {kNaN, kNaN};
  std::vector<Communicator::Block> bad = {{3, 0, sizeof(float)}};
  Status status = ranks[0]->allToAllBlocks(data, bad, out, bad, "blocks");
  EXPECT_FALSE(status.isOk());
  EXPECT_THAT(status.message(), HasSubstr("peer 3 of 1"));
  EXPECT_TRUE(std::isnan(out[0]));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AllToAllMapping,
    ::testing::Values(AllToAllCase{1, 3, 4, 2}, AllToAllCase{2, 2, 3, 1},
                      AllToAllCase{2, 1, 4, 2}, AllToAllCase{4, 2, 6, 3},
                      AllToAllCase{3, 2, 4, 4}),
    [](const ::testing::TestParamInfo<AllToAllCase> &info) {
      const AllToAllCase &c = info.param;
      return "W" + std::to_string(c.world) + "_L" + std::to_string(c.local) +
             "_C" + std::to_string(c.capacity) + "_D" +
             std::to_string(c.chunks);
    });

//===----------------------------------------------------------------------===//
// Communicators
//===----------------------------------------------------------------------===//

TEST(LocalCommunicator, CollectivesOnFourThreads) {
  const int W = 4;
  auto ranks = localRanks(W);
  const int64_t count = 3;
  std::vector<std::vector<float>> gathered(W);
  std::vector<std::vector<uint16_t>> reduced(W);
  std::vector<int32_t> maxima(W);
  onRanks(W, [&](int r) {
    Communicator &comm = *ranks[r];
    EXPECT_EQ(comm.rank(), r);
    EXPECT_EQ(comm.size(), W);
    int32_t value = 10 * r + 1;
    ASSERT_TRUE(comm.allReduceMaxInt32(&value, 1, "max").isOk());
    maxima[r] = value;
    float mine[2] = {static_cast<float>(r), static_cast<float>(-r)};
    gathered[r].assign(2 * W, kNaN);
    ASSERT_TRUE(comm.allGather(mine, sizeof(mine), gathered[r].data(), "gather")
                    .isOk());
    // bf16 blocks [W, count]: 1 + 2^-8 four times is exact in fp32 and
    // rounds once; summed in bf16 it would lose the small parts.
    std::vector<uint16_t> send(W * count);
    for (int64_t i = 0; i < W * count; ++i)
      send[i] = floatToBf16(i % count == 0 ? 1.0f + 0x1p-7f : 1.0f);
    reduced[r].assign(count, 0);
    ASSERT_TRUE(comm.reduceScatterSum(send.data(), reduced[r].data(), count,
                                      DType::BF16, "reduce_scatter")
                    .isOk());
    ASSERT_TRUE(comm.barrier("barrier").isOk());
  });
  for (int r = 0; r < W; ++r) {
    EXPECT_EQ(maxima[r], 31);
    for (int p = 0; p < W; ++p) {
      EXPECT_EQ(gathered[r][2 * p], static_cast<float>(p));
      EXPECT_EQ(gathered[r][2 * p + 1], static_cast<float>(-p));
    }
    EXPECT_EQ(bf16ToFloat(reduced[r][0]), 4.0f + 4 * 0x1p-7f);
    EXPECT_EQ(bf16ToFloat(reduced[r][1]), 4.0f);
  }
}

// Groups of 2 consecutive ranks and of the ranks of one parity on 4
// threads, then a split of a split: each sub-communicator holds its group
// in index order, and a gather, a sum and an all-to-all reach exactly it.
TEST(LocalCommunicator, SplitIntoGroupsOfRanks) {
  const int W = 4;
  std::vector<std::shared_ptr<Communicator>> ranks;
  ASSERT_TRUE(createLocalCommunicators(W, ranks, 10).isOk());
  std::vector<std::string> failures(W);
  std::vector<std::thread> threads;
  for (int me = 0; me < W; ++me)
    threads.emplace_back([&, me] {
      auto check = [&](bool ok, const std::string &what) {
        if (!ok && failures[me].empty())
          failures[me] = what;
      };
      for (RankGroups groups : {RankGroups{2, 1}, RankGroups{2, 2}}) {
        std::shared_ptr<Communicator> group;
        Status status = splitIntoGroups(*ranks[me], groups, group);
        check(status.isOk(), status.message());
        if (!status)
          return;
        check(group->size() == 2 && group->rank() == groups.index(me),
              "rank/size");
        int32_t mine = me, members[2] = {-1, -1};
        check(group->allGather(&mine, 4, members, "gather").isOk(), "gather");
        const int base = groups.stride == 1 ? me / 2 * 2 : me % 2;
        check(members[0] == base && members[1] == base + groups.stride,
              "members " + std::to_string(members[0]) + "," +
                  std::to_string(members[1]));
        float send[2] = {float(me), float(10 * me)}, recv = -1;
        check(group->reduceScatterSum(send, &recv, 1, DType::F32, "rs").isOk(),
              "rs");
        float want = group->rank() == 0
                         ? float(2 * base + groups.stride)
                         : float(10 * (2 * base + groups.stride));
        check(recv == want, "sum " + std::to_string(recv));
        int64_t offsets[2] = {0, 1}, bytes[2] = {1, 1};
        uint8_t out[2] = {uint8_t(me * 2), uint8_t(me * 2 + 1)}, in[2] = {};
        check(group->allToAll(out, offsets, bytes, in, offsets, bytes, "a2a")
                  .isOk(),
              "a2a");
        const int other = members[1 - group->rank()];
        check(in[1 - group->rank()] == uint8_t(other * 2 + group->rank()),
              "a2a bytes");
        // A split of the group: one rank each.
        std::shared_ptr<Communicator> single;
        check(group->split(group->rank(), 0, single, "again").isOk() &&
                  single->size() == 1,
              "split of a split");
      }
    });
  for (std::thread &thread : threads)
    thread.join();
  for (int me = 0; me < W; ++me)
    EXPECT_EQ(failures[me], "") << "rank " << me;
  std::shared_ptr<Communicator> self;
  EXPECT_TRUE(createSelfCommunicator()->split(0, 0, self, "self").isOk());
  EXPECT_EQ(self->size(), 1);
}

TEST(LocalCommunicator, TimesOutNamingTheMissingRank) {
  auto ranks = localRanks(3, /*timeout=*/0.2);
  std::vector<Status> results(3);
  onRanks(3, [&](int r) {
    if (r != 2)
      results[r] = ranks[r]->barrier("all_to_all dispatch chunk 0");
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].code(), StatusCode::CommunicationError);
    EXPECT_THAT(results[r].message(), HasSubstr("all_to_all dispatch"));
  }
  // The first rank to time out names rank 2; the communicator stays broken.
  EXPECT_THAT(results[0].message() + results[1].message(),
              HasSubstr("waiting for rank(s) 2"));
  Status later = ranks[0]->barrier("later");
  EXPECT_EQ(later.code(), StatusCode::CommunicationError);
  EXPECT_THAT(later.message(), HasSubstr("failed earlier"));
}

TEST(LocalCommunicator, RejectsRanksInDifferentCollectives) {
  auto ranks = localRanks(2);
  std::vector<Status> results(2);
  onRanks(2, [&](int r) {
    int32_t value = r;
    results[r] = r == 0
                     ? ranks[r]->barrier("barrier")
                     : ranks[r]->allReduceMaxInt32(&value, 1, "sync_capacity");
  });
  for (const Status &status : results) {
    EXPECT_EQ(status.code(), StatusCode::CommunicationError);
    EXPECT_THAT(status.message(), HasSubstr("same collectives"));
  }
}

TEST(SelfCommunicator, IsOneRank) {
  std::shared_ptr<Communicator> self = createSelfCommunicator();
  EXPECT_EQ(self->size(), 1);
  EXPECT_EQ(self->rank(), 0);
  int32_t value = 5;
  EXPECT_TRUE(self->allReduceMaxInt32(&value, 1, "max").isOk());
  EXPECT_EQ(value, 5);
  float in[2] = {1, 2}, out[2] = {0, 0};
  EXPECT_TRUE(self->reduceScatterSum(in, out, 2, DType::F32, "rs").isOk());
  EXPECT_EQ(out[1], 2.0f);
  EXPECT_EQ(self->reduceScatterSum(in, out, 2, DType::I32, "rs").code(),
            StatusCode::InvalidArgument);
  int dummy = 0;
  EXPECT_FALSE(self->setStream(&dummy).isOk());
}

TEST(CollectiveTimeout, ReadsTheEnvironment) {
  double seconds = 0;
  setenv("FLEX_COLLECTIVE_TIMEOUT_S", "2.5", 1);
  EXPECT_TRUE(getCollectiveTimeout(seconds).isOk());
  EXPECT_EQ(seconds, 2.5);
  setenv("FLEX_COLLECTIVE_TIMEOUT_S", "soon", 1);
  Status status = getCollectiveTimeout(seconds);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("FLEX_COLLECTIVE_TIMEOUT_S='soon'"));
  unsetenv("FLEX_COLLECTIVE_TIMEOUT_S");
  EXPECT_TRUE(getCollectiveTimeout(seconds).isOk());
  EXPECT_EQ(seconds, kDefaultCollectiveTimeoutSeconds);
}

//===----------------------------------------------------------------------===//
// Kernels: padded zero-fill, accumulating weight gradient
//===----------------------------------------------------------------------===//

// In the padded layout dispatch writes zeros into every row of [0, E*C) no
// kept slot fills, and combine_backward likewise into grad_expert_out; rows
// past E*C stay untouched.
TEST(PaddedLayout, DispatchAndCombineBackwardZeroThePadding) {
  const int64_t T = 3, k = 2, E = 2, d = 2, C = 3;
  std::vector<int32_t> indices = {0, 1, 1, 0, 0, 1};
  std::vector<int32_t> locations = {0, 0, 1, 1, 2, 3};
  std::vector<float> gates = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  int32_t capacity = C;
  std::vector<int32_t> offsets = {0, 3, 6}, rows = {3, 2};
  Routing routing{indices.data(),
                  locations.data(),
                  gates.data(),
                  &capacity,
                  offsets.data(),
                  rows.data(),
                  T,
                  k,
                  E};
  std::vector<float> x = {1, 2, 3, 4, 5, 6};
  // One row past E * C keeps its poison.
  std::vector<float> disp((E * C + 1) * d, kNaN);
  cpu::dispatch({x.data()}, d, routing, {disp.data()});
  EXPECT_EQ(std::vector<float>(disp.begin(), disp.begin() + E * C * d),
            (std::vector<float>{1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 0, 0}));
  EXPECT_TRUE(std::isnan(disp[E * C * d]));
  std::vector<float> gradOut = {1, 1, 1, 1, 1, 1};
  std::vector<float> gradY((E * C + 1) * d, kNaN), gradGates(T * k, kNaN);
  cpu::combineBackward({gradOut.data()}, {disp.data()}, d, routing,
                       {gradY.data()}, gradGates.data());
  EXPECT_EQ(gradY[5 * d], 0.0f); // expert 1, slot 2: padding
  EXPECT_EQ(gradY[5 * d + 1], 0.0f);
  EXPECT_TRUE(std::isnan(gradY[E * C * d]));
  for (int64_t i = 0; i < E * C * d; ++i)
    EXPECT_FALSE(std::isnan(gradY[i])) << i;
}

// accumulate adds a^T grad_c and the column sums to what grad_b and
// grad_bias hold, in f32 and bf16; an expert without rows keeps its value.
TEST(GroupedGemmWgrad, AccumulateAddsToTheGradient) {
  const int64_t E = 2, K = 2, N = 2;
  std::vector<int32_t> offsets = {0, 2, 2}, rows = {2, 0};
  ExpertSegments seg{offsets.data(), rows.data(), E};
  std::vector<float> a = {1, 2, 3, 4}, gradC = {1, 0, 0, 1};
  for (DType type : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(std::string(toString(type)));
    std::vector<float> startB(E * K * N, 0.5f), startBias(E * N, 0.25f);
    std::vector<uint8_t> gradB(E * K * N * 4), gradBias(E * N * 4);
    auto put = [&](std::vector<uint8_t> &bytes, const std::vector<float> &v) {
      for (size_t i = 0; i < v.size(); ++i) {
        if (type == DType::F32)
          std::memcpy(bytes.data() + 4 * i, &v[i], 4);
        else
          reinterpret_cast<uint16_t *>(bytes.data())[i] = floatToBf16(v[i]);
      }
    };
    auto get = [&](const std::vector<uint8_t> &bytes, size_t i) {
      return type == DType::F32
                 ? reinterpret_cast<const float *>(bytes.data())[i]
                 : bf16ToFloat(
                       reinterpret_cast<const uint16_t *>(bytes.data())[i]);
    };
    put(gradB, startB);
    put(gradBias, startBias);
    GroupedGemmWgradOptions options;
    options.accumulate = true;
    cpu::groupedGemmWgrad({a.data()}, {gradC.data()}, K, N, seg,
                          {gradB.data(), type}, {gradBias.data(), type},
                          options);
    // a^T grad_c = [[1, 3], [2, 4]] for expert 0.
    EXPECT_EQ(get(gradB, 0), 1.5f);
    EXPECT_EQ(get(gradB, 1), 3.5f);
    EXPECT_EQ(get(gradB, 2), 2.5f);
    EXPECT_EQ(get(gradB, 3), 4.5f);
    EXPECT_EQ(get(gradBias, 0), 1.25f);
    EXPECT_EQ(get(gradBias, 1), 1.25f);
    for (size_t i = K * N; i < E * K * N; ++i)
      EXPECT_EQ(get(gradB, i), 0.5f);
    EXPECT_EQ(get(gradBias, 2), 0.25f);
  }
}

// sync_capacity makes C the largest C over ranks. In the dropless and
// bounded modes that keeps exactly the slots each rank keeps with its own
// C: C only grows, and a rank that drops a slot already has C at the bound,
// which no rank exceeds.
TEST(SyncCapacity, KeepsExactlyTheSlotsEachRankKeeps) {
  const int64_t T = 24, E = 6, W = 4;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (CapacityMode mode : {CapacityMode::Dropless, CapacityMode::Bounded})
    for (int64_t k : {1, 2})
      for (int64_t alignment : {1, 2, 4})
        for (int trial = 0; trial < 20; ++trial) {
          GateAttrs attrs;
          attrs.topK = k;
          attrs.capacityMode = mode;
          attrs.capacityFactor = 0.75;
          attrs.capacityAlignment = alignment;
          std::vector<std::vector<int32_t>> locations(W);
          std::vector<int32_t> capacity(W);
          for (int64_t r = 0; r < W; ++r) {
            std::vector<float> logits(T * E);
            for (float &v : logits)
              v = normal(rng);
            std::vector<float> scores(T * E), gates(T * k);
            std::vector<int32_t> indices(T * k), offsets(E + 1), rows(E);
            float lAux;
            locations[r].resize(T * k);
            cpu::gate(logits.data(), T, E, attrs,
                      {scores.data(), indices.data(), locations[r].data(),
                       gates.data(), &capacity[r], offsets.data(), rows.data(),
                       &lAux});
          }
          int32_t synced = *std::max_element(capacity.begin(), capacity.end());
          for (int64_t r = 0; r < W; ++r)
            for (int32_t location : locations[r])
              ASSERT_EQ(location < capacity[r], location < synced)
                  << toString(mode) << " k=" << k << " rank " << r
                  << " location " << location << " C " << capacity[r]
                  << " synced " << synced;
        }
}

//===----------------------------------------------------------------------===//
// Loader
//===----------------------------------------------------------------------===//

const char *const kMultiRankPlans[] = {
    "mr_ffn_fixed_w2_train.json", "mr_ffn_dropless_w4_train.json",
    "mr_gated_bounded_w2_train_bf16.json", "mr_ffn_fixed_w4_infer.json"};

TEST(MultiRankPlanLoader, LoadsAndRoundTripsEveryTestPlan) {
  for (const char *name : kMultiRankPlans) {
    SCOPED_TRACE(name);
    Plan plan;
    Status status = parsePlan(readTestPlan(name), plan);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_GT(plan.worldSize, 1);
    EXPECT_EQ(plan.layer.experts % plan.worldSize, 0);
    const Argument &w1 = plan.arguments[plan.findArgument("w1")];
    EXPECT_EQ(w1.shape[0], plan.localExperts());
    Plan again;
    status = parsePlan(writePlan(plan), again);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_EQ(writePlan(again), writePlan(plan));
  }
}

Json *findStep(Json &doc, const std::string &variant, const std::string &op,
               int skip = 0) {
  for (Json &v : doc["variants"])
    if (v["name"] == variant)
      for (const char *list : {"forward", "backward"})
        for (Json &step : v[list])
          if (step["op"] == op && skip-- == 0)
            return &step;
  return nullptr;
}

TEST(MultiRankPlanLoader, RejectsWhatTheFormatForbids) {
  const std::string fixed = "mr_ffn_fixed_w2_train.json";
  const std::string dropless = "mr_ffn_dropless_w4_train.json";
  // E % W != 0 and W % E != 0; W % E == 0 shards each expert over W / E
  // ranks (h / s hidden units each, [1, ...] arguments).
  expectRejectedAfterEdit(
      fixed, [](Json &doc) { doc["world"]["size"] = 3; },
      "3 ranks cannot hold the 4 experts whole");
  expectRejectedAfterEdit(
      fixed, [](Json &doc) { doc["world"]["size"] = 8; },
      "argument 'w1' has shape [2, 8, 12], which disagrees with the layer: "
      "expected [1, 8, 6]");
  expectRejectedAfterEdit(
      fixed, [](Json &doc) { doc["world"]["size"] = 20; },
      "hidden_dim 12 is not a multiple of s");
  expectRejectedAfterEdit(
      fixed, [](Json &doc) { doc["world"]["size"] = 0; },
      "world size 0 is out of range");
  expectRejectedAfterEdit(
      fixed, [](Json &doc) { doc["world"] = 2; }, "world");
  // Parameters are the rank's L = E / W experts.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        for (Json &arg : doc["arguments"])
          if (arg["name"] == "w1")
            arg["shape"][0] = 4;
      },
      "argument 'w1' has shape [4, 8, 12], which disagrees with the layer: "
      "expected [2, 8, 12]");
  // Multi-rank plans use the padded layout.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "dp", "gate"))["attrs"]["layout"] = "ragged";
      },
      "use the 'padded' layout");
  // Dropless on several ranks: one C before tokens move.
  expectRejectedAfterEdit(
      dropless,
      [](Json &doc) {
        for (Json &v : doc["variants"])
          if (v["name"] == "ep1") {
            Json kept = Json::array();
            for (Json &step : v["forward"])
              if (step["op"] != "sync_capacity")
                kept.push_back(step);
            v["forward"] = kept;
          }
      },
      "reads 'capacity' before a 'sync_capacity' step");
  // Chunks must divide the aligned capacity.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep2", "gate"))["attrs"]["capacity_alignment"] = 1;
      },
      "the gate's capacity_alignment 1 is not a multiple of it");
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep2", "all_to_all"))["attrs"]["chunk"] = 2;
      },
      "chunk 2 is out of range");
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep1", "all_to_all"))["attrs"].erase("direction");
      },
      "missing (required by op 'all_to_all')");
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep1", "uniform_segments"))["attrs"]["groups"] = 4;
      },
      "groups 4 disagrees with the local experts of the plan: L = E / W = 4 "
      "/ 2 = 2");
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep1", "uniform_segments"))["attrs"]["ranks"] = 4;
      },
      "ranks 4 disagrees with the plan's world size 2");
  // all_gather gives W times the rank's block.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "dp", "all_gather"))["out"]["output"] = "w1";
      },
      "needs the rank's block [2, 8, 12] times W = 2");
  // Accumulating weight gradients need an earlier write.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep2", "grouped_gemm_wgrad"))["attrs"]["accumulate"] =
            true;
      },
      "adds into 'grad_w2', which no earlier step writes");
  // An unknown direction names the allowed ones.
  expectRejectedAfterEdit(
      fixed,
      [](Json &doc) {
        (*findStep(doc, "ep1", "all_to_all"))["attrs"]["direction"] = "up";
      },
      "allowed: dispatch, combine");
}

//===----------------------------------------------------------------------===//
// Multi-rank plans on local ranks vs the fp64 reference
//===----------------------------------------------------------------------===//

void PrintTo(const AllToAllCase &c, std::ostream *os) {
  *os << "W=" << c.world << " L=" << c.local << " C=" << c.capacity
      << " D=" << c.chunks;
}

class MultiRankRun : public ::testing::TestWithParam<PlanVariant> {};

// Each rank runs the plan on its own tokens with its slice of one global
// layer. Per-rank capacity makes the W-rank layer equal to the one-rank layer
// applied to each rank's tokens: out, l_aux, grad_x and grad_wg (the rank's
// partial) compare directly; expert weight gradients are the reference's
// summed over ranks, sliced.
TEST_P(MultiRankRun, MatchesTheReferenceOnEveryRank) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readTestPlan(GetParam().plan), *plan);
  ASSERT_TRUE(status.isOk()) << status.message();
  const int64_t variant = plan->findVariant(GetParam().variant);
  ASSERT_GE(variant, 0);
  const int W = static_cast<int>(plan->worldSize);
  const LayerConfig &config = plan->layer;
  reference::ReferenceOptions refOptions;
  for (const Step &step : plan->variants[variant].forward)
    if (step.op == StepOp::Gate)
      refOptions.capacityAlignment = step.attrs.capacityAlignment;

  for (uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    // One global layer; each rank's tokens drawn apart, away from ties.
    std::mt19937_64 rng(seed);
    RankInputs drawn;
    ASSERT_TRUE(makeRankInputs(config, refOptions, W, rng, drawn));
    const double gradLAux = 0.5;

    std::vector<RankBuffers> buffers = makeRankBuffers(*plan, drawn, gradLAux);
    auto ranks = localRanks(W);
    std::vector<Status> results(W);
    onRanks(W, [&](int r) {
      // A workspace of NaN bytes.
      CpuRankExecutor rank;
      Status s = rank.create(plan, ranks[r], 0xff);
      std::vector<Binding> bindings = buffers[r].bindings();
      if (s)
        s = runVariant(*rank.executor, variant, bindings, plan->training);
      results[r] = s;
    });
    for (int r = 0; r < W; ++r)
      ASSERT_TRUE(results[r].isOk())
          << "rank " << r << ": " << results[r].message();

    const double tolerance = config.dtype == DType::F32 ? 1e-5 : 2e-2;
    const RankReference ref =
        referenceOnRanks(config, refOptions, drawn, gradLAux, plan->training);
    const std::vector<reference::LayerForward> &forward = ref.forward;
    const std::vector<reference::LayerGradients> &grads = ref.grads;
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      const RankBuffers &b = buffers[r];
      EXPECT_LE(reference::relativeL2(b.get("out"), forward[r].out), tolerance);
      EXPECT_LE(reference::relativeL2(b.get("l_aux"), {forward[r].lAux}),
                tolerance);
      if (!plan->training)
        continue;
      EXPECT_LE(reference::relativeL2(b.get("grad_x"), grads[r].x), tolerance);
      EXPECT_LE(reference::relativeL2(b.get("grad_wg"), grads[r].wg),
                tolerance);
      // Expert gradients sum every rank's part: relative to the parts'
      // magnitude where they cancel (expertFloor).
      for (auto [name, want, magnitude] : expertGradients(ref))
        if (b.has(name)) {
          EXPECT_LE(
              reference::relativeL2(b.get(name), expertSlice(*want, r, W),
                                    expertFloor(expertSlice(*magnitude, r, W))),
              tolerance)
              << name;
        }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Plans, MultiRankRun,
    ::testing::Values(PlanVariant{"mr_ffn_fixed_w2_train.json", "ep1"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "ep2"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "ex2"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "dp"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "ep1"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "ep2"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "dp"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "ep2"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "ex2"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "dp"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "ep1"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "ep2"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "dp"}),
    planVariantName);

//===----------------------------------------------------------------------===//
// grouped_gemm_glu in plans
//===----------------------------------------------------------------------===//

/// The output arguments of one rank, by name.
using Outputs = std::map<std::string, std::vector<uint8_t>>;

/// Every variant of `plan` run on its W ranks (forward, and backward when
/// training) with the inputs `drawn`, the outputs poisoned and the
/// workspace NaN first: the outputs per variant and rank.
std::vector<std::vector<Outputs>>
runEveryVariant(std::shared_ptr<const Plan> plan, const RankInputs &drawn) {
  const int W = static_cast<int>(plan->worldSize);
  std::vector<std::vector<Outputs>> result;
  for (int64_t v = 0; v < static_cast<int64_t>(plan->variants.size()); ++v) {
    SCOPED_TRACE("variant " + plan->variants[v].name);
    std::vector<RankBuffers> buffers = makeRankBuffers(*plan, drawn, 0.5);
    auto ranks = localRanks(W);
    std::vector<Status> results(W);
    onRanks(W, [&](int r) {
      CpuRankExecutor rank;
      Status s = rank.create(plan, ranks[r], 0xff);
      std::vector<Binding> bindings = buffers[r].bindings();
      if (s)
        s = runVariant(*rank.executor, v, bindings, plan->training);
      results[r] = s;
    });
    std::vector<Outputs> outputs(W);
    for (int r = 0; r < W; ++r) {
      EXPECT_TRUE(results[r].isOk())
          << "rank " << r << ": " << results[r].message();
      for (const Argument &a : plan->arguments)
        if (a.role == ArgumentRole::Output ||
            a.role == ArgumentRole::GradOutput)
          outputs[r][a.name] = buffers[r].data[a.name];
    }
    result.push_back(std::move(outputs));
  }
  return result;
}

// Plans whose glu and the two GEMMs before it are one grouped_gemm_glu
// (as --moert-fuse-glu's variants) compute every output bit for bit as the
// plans they were made from, on the CPU backend: padded and ragged, f32,
// bf16 and f16, a received buffer's chunks on two ranks, rows gathered
// through row_tokens, inference and training (the products kept for
// glu_backward).
TEST(GluFusedSteps, RunBitForBitLikeTheStepsTheyReplace) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  auto layer = [](DType type, CapacityMode mode) {
    LayerConfig c;
    c.tokens = 48;
    c.modelDim = 16;
    c.hiddenDim = 24;
    c.experts = 4;
    c.topK = 2;
    c.capacityMode = mode;
    c.expertKind = ExpertKind::Gated;
    c.dtype = type;
    return c;
  };
  std::ifstream gathered(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                         "/small_swiglu_bf16_gather_train.json");
  std::ostringstream gatheredText;
  gatheredText << gathered.rdbuf();
  const std::pair<std::string, std::string> plans[] = {
      {"gated_fixed_train.json", readTestPlan("gated_fixed_train.json")},
      {"gated_bounded_infer.json", readTestPlan("gated_bounded_infer.json")},
      {"small_swiglu_bf16.json", readTestPlan("fuzz/small_swiglu_bf16.json")},
      {"mr_gated_bounded_w2_train_bf16.json",
       readTestPlan("mr_gated_bounded_w2_train_bf16.json")},
      {"small_swiglu_bf16_gather_train.json", gatheredText.str()},
      {"f16 ragged gathered",
       swigluInferencePlan(layer(DType::F16, CapacityMode::Dropless),
                           DispatchLayout::Ragged, /*gathered=*/true)},
      {"f16 padded fixed",
       swigluInferencePlan(layer(DType::F16, CapacityMode::Fixed),
                           DispatchLayout::Padded, /*gathered=*/false)}};
  for (const auto &[name, text] : plans) {
    SCOPED_TRACE(name);
    auto unfused = std::make_shared<Plan>();
    Status status = parsePlan(text, *unfused);
    ASSERT_TRUE(status.isOk()) << status.message();
    Json doc = Json::parse(text);
    ASSERT_GE(fuseGluSteps(doc, unfused->training), 1);
    auto fused = std::make_shared<Plan>();
    status = parsePlan(doc.dump(), *fused);
    ASSERT_TRUE(status.isOk()) << status.message();

    RankInputs drawn;
    ASSERT_TRUE(makeRankInputs(
        unfused->layer, {}, static_cast<int>(unfused->worldSize), rng, drawn));
    const auto want = runEveryVariant(unfused, drawn);
    const auto got = runEveryVariant(fused, drawn);
    ASSERT_EQ(got.size(), want.size());
    for (size_t v = 0; v < want.size(); ++v)
      for (size_t r = 0; r < want[v].size(); ++r)
        for (const auto &[output, bytes] : want[v][r]) {
          EXPECT_TRUE(got[v][r].at(output) == bytes)
              << output << " of variant " << unfused->variants[v].name
              << " on rank " << r << " differs from the unfused plan's";
          // The layer's output was written (poisoned with NaN first).
          if (output == "out") {
            const Argument &out = fused->arguments[fused->findArgument(output)];
            for (int64_t i = 0; i < out.numElements(); ++i)
              ASSERT_TRUE(
                  std::isfinite(loadValue(got[v][r].at(output), out.dtype, i)))
                  << output << "[" << i << "]";
          }
        }
  }
}

//===----------------------------------------------------------------------===//
// The callback communicator
//===----------------------------------------------------------------------===//

/// HostCollectives that forward to `comm` (a local rank), counting calls.
HostCollectives forwardingTo(std::shared_ptr<Communicator> comm,
                             std::shared_ptr<int> calls) {
  HostCollectives h;
  h.allToAll = [comm, calls](const void *send, const int64_t *so,
                             const int64_t *sb, void *recv, const int64_t *ro,
                             const int64_t *rb) {
    ++*calls;
    return comm->allToAll(send, so, sb, recv, ro, rb, "forwarded all_to_all");
  };
  h.allGather = [comm, calls](const void *send, int64_t bytes, void *recv) {
    ++*calls;
    return comm->allGather(send, bytes, recv, "forwarded all_gather");
  };
  h.reduceScatterSum = [comm, calls](const void *send, void *recv,
                                     int64_t count, DType type) {
    ++*calls;
    return comm->reduceScatterSum(send, recv, count, type,
                                  "forwarded reduce_scatter");
  };
  h.allReduceMaxInt32 = [comm, calls](int32_t *values, int64_t count) {
    ++*calls;
    return comm->allReduceMaxInt32(values, count, "forwarded all_reduce");
  };
  h.barrier = [comm, calls] {
    ++*calls;
    return comm->barrier("forwarded barrier");
  };
  return h;
}

// Every variant (expert-parallel, pipelined, data-parallel: all_to_all,
// all_gather, reduce_scatter, sync_capacity's all_reduce) gives bit for bit
// what the local communicator gives when its collectives come through the
// callbacks, and the callbacks are what ran them.
TEST(CallbackCommunicator, RunsEveryVariantLikeTheCommunicatorBehindIt) {
  const PlanVariant cases[] = {{"mr_ffn_fixed_w2_train.json", "ep1"},
                               {"mr_ffn_fixed_w2_train.json", "ex2"},
                               {"mr_ffn_fixed_w2_train.json", "dp"},
                               {"mr_ffn_dropless_w4_train.json", "ep2"},
                               {"mr_ffn_dropless_w4_train.json", "dp"}};
  for (const PlanVariant &c : cases) {
    SCOPED_TRACE(std::string(c.plan) + " " + c.variant);
    auto plan = std::make_shared<Plan>();
    ASSERT_TRUE(parsePlan(readTestPlan(c.plan), *plan).isOk());
    const int64_t variant = plan->findVariant(c.variant);
    ASSERT_GE(variant, 0);
    const int W = static_cast<int>(plan->worldSize);
    std::mt19937_64 rng(runSeed());
    RankInputs drawn;
    ASSERT_TRUE(makeRankInputs(plan->layer, {}, W, rng, drawn));
    std::vector<RankBuffers> direct = makeRankBuffers(*plan, drawn, 0.5);
    std::vector<RankBuffers> through = direct;
    auto calls = std::make_shared<int>(0);
    std::mutex mutex;
    auto run = [&](std::vector<RankBuffers> &buffers, bool callbacks) {
      auto ranks = localRanks(W);
      std::vector<Status> results(W);
      onRanks(W, [&](int r) {
        std::shared_ptr<Communicator> comm = ranks[r];
        auto mine = std::make_shared<int>(0);
        Status s = callbacks
                       ? createCallbackCommunicator(
                             comm, r, W, forwardingTo(ranks[r], mine), "test")
                       : Status::ok();
        if (callbacks && s) {
          EXPECT_EQ(comm->name(), "test");
        }
        CpuRankExecutor rank;
        if (s)
          s = rank.create(plan, comm, 0xff);
        std::vector<Binding> bindings = buffers[r].bindings();
        if (s)
          s = runVariant(*rank.executor, variant, bindings, true);
        std::lock_guard<std::mutex> lock(mutex);
        *calls += *mine;
        results[r] = s;
      });
      for (int r = 0; r < W; ++r)
        ASSERT_TRUE(results[r].isOk()) << r << ": " << results[r].message();
    };
    run(direct, false);
    run(through, true);
    EXPECT_GT(*calls, 0);
    for (int r = 0; r < W; ++r) {
      for (double v : through[r].get("out"))
        ASSERT_TRUE(std::isfinite(v)) << "rank " << r << ": out not written";
      for (const auto &[name, bytes] : direct[r].data)
        EXPECT_EQ(through[r].data.at(name), bytes)
            << "rank " << r << " " << name;
    }
  }
}

/// A forward of mr_ffn_fixed_w2_train.json's ep1 with zeroed arguments,
/// through `comm`: its status.
Status forwardEp1(const std::shared_ptr<Plan> &plan,
                  std::shared_ptr<Communicator> comm) {
  std::unique_ptr<Executor> executor;
  if (Status s = Executor::create(plan, createCpuBackend(), executor); !s)
    return s;
  if (Status s = executor->setCommunicator(std::move(comm)); !s)
    return s;
  // A multi-variant plan defaults to auto: ep1 by name.
  if (Status s = executor->selectVariant("ep1"); !s)
    return s;
  RankBuffers buffers;
  buffers.init(*plan);
  std::vector<Binding> bindings = buffers.bindings();
  return executor->forward(bindings.data(), bindings.size());
}

// A failing function fails the step with its message and breaks the
// communicator: the next collective fails at once, naming the first cause.
TEST(CallbackCommunicator, AFailureNamesTheStepAndBreaksIt) {
  auto plan = std::make_shared<Plan>();
  ASSERT_TRUE(
      parsePlan(readTestPlan("mr_ffn_fixed_w2_train.json"), *plan).isOk());
  HostCollectives h =
      forwardingTo(createSelfCommunicator(), std::make_shared<int>(0));
  int failures = 0;
  h.allToAll = [&](const void *, const int64_t *, const int64_t *, void *,
                   const int64_t *, const int64_t *) {
    ++failures;
    return Status(StatusCode::CommunicationError, "peer 1 went away");
  };
  std::shared_ptr<Communicator> comm;
  ASSERT_TRUE(createCallbackCommunicator(comm, 0, 2, h).isOk());
  EXPECT_EQ(comm->name(), "callbacks");
  Status status = forwardEp1(plan, comm);
  EXPECT_EQ(status.code(), StatusCode::CommunicationError);
  EXPECT_THAT(status.message(), HasSubstr("all_to_all"));
  EXPECT_THAT(status.message(), HasSubstr("peer 1 went away"));
  EXPECT_THAT(status.message(), HasSubstr("rank 0 of 2"));
  status = comm->barrier("the next one");
  EXPECT_EQ(status.code(), StatusCode::CommunicationError);
  EXPECT_THAT(status.message(), HasSubstr("failed earlier"));
  EXPECT_THAT(status.message(), HasSubstr("peer 1 went away"));
  EXPECT_EQ(failures, 1);
}

TEST(CallbackCommunicator, RefusesWhatItCannotDo) {
  HostCollectives h =
      forwardingTo(createSelfCommunicator(), std::make_shared<int>(0));
  std::shared_ptr<Communicator> comm;
  EXPECT_THAT(createCallbackCommunicator(comm, 2, 2, h).message(),
              HasSubstr("rank 2 of 2"));
  EXPECT_EQ(comm, nullptr);
  HostCollectives missing = h;
  missing.reduceScatterSum = nullptr;
  EXPECT_THAT(createCallbackCommunicator(comm, 0, 2, missing).message(),
              HasSubstr("no reduce_scatter_sum function"));
  // Exceptions from a function are failures too.
  HostCollectives throwing = h;
  throwing.barrier = []() -> Status { throw std::runtime_error("boom"); };
  ASSERT_TRUE(createCallbackCommunicator(comm, 0, 2, throwing).isOk());
  EXPECT_THAT(comm->barrier("b").message(), HasSubstr("boom"));
  // No groups: grouped collectives need MPI or NCCL, and the message says so.
  ASSERT_TRUE(createCallbackCommunicator(comm, 0, 2, h).isOk());
  std::shared_ptr<Communicator> group;
  Status status = comm->split(0, 0, group, "grouped all_to_all");
  EXPECT_EQ(status.code(), StatusCode::Unavailable);
  EXPECT_THAT(status.message(), HasSubstr("need the MPI or NCCL"));
}

//===----------------------------------------------------------------------===//
// Executor rules
//===----------------------------------------------------------------------===//

TEST(MultiRankExecutor, NeedsACommunicatorOfTheWorldSize) {
  auto plan = std::make_shared<Plan>();
  ASSERT_TRUE(
      parsePlan(readTestPlan("mr_ffn_fixed_w4_infer.json"), *plan).isOk());
  std::unique_ptr<Executor> executor;
  ASSERT_TRUE(Executor::create(plan, createCpuBackend(), executor).isOk());
  EXPECT_EQ(executor->communicator(), nullptr);
  RankBuffers buffers;
  buffers.init(*plan);
  std::vector<Binding> bindings = buffers.bindings();
  Status status = executor->forward(bindings.data(), bindings.size());
  EXPECT_EQ(status.code(), StatusCode::FailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("no communicator is set"));
  auto two = localRanks(2);
  status = executor->setCommunicator(two[0]);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("the plan runs on 4 rank(s) (world.size), but "
                        "communicator 'local' has 2"));
  status = executor->setCommunicator(createSelfCommunicator());
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
}

TEST(MultiRankExecutor, OneRankPlansStartWithTheSelfCommunicator) {
  auto plan = std::make_shared<Plan>();
  ASSERT_TRUE(parsePlan(readTestPlan("ffn_fixed_train.json"), *plan).isOk());
  std::unique_ptr<Executor> executor;
  ASSERT_TRUE(Executor::create(plan, createCpuBackend(), executor).isOk());
  ASSERT_NE(executor->communicator(), nullptr);
  EXPECT_EQ(executor->communicator()->name(), "self");
  EXPECT_FALSE(executor->setCommunicator(localRanks(2)[0]).isOk());
  EXPECT_TRUE(executor->setCommunicator(nullptr).isOk());
  EXPECT_EQ(executor->communicator()->name(), "self");
}

// A rank that stops calling collectives makes the others fail with the step
// named, instead of hanging.
TEST(MultiRankExecutor, ACollectiveTimeoutNamesTheStep) {
  auto plan = std::make_shared<Plan>();
  ASSERT_TRUE(
      parsePlan(readTestPlan("mr_ffn_fixed_w2_train.json"), *plan).isOk());
  auto ranks = localRanks(2, /*timeout=*/0.3);
  Status status = forwardEp1(plan, ranks[0]);
  EXPECT_EQ(status.code(), StatusCode::CommunicationError);
  EXPECT_THAT(status.message(),
              HasSubstr("variant 'ep1' forward step 3 (all_to_all)"));
  EXPECT_THAT(status.message(), HasSubstr("waiting for rank(s) 1"));
}

} // namespace
