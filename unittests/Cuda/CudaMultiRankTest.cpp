//===- CudaMultiRankTest.cpp - Multi-rank plans on GPUs through NCCL ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs the multi-rank test plans (unittests/Runtime/plans/mr_*)
// on the CUDA backend, one rank per GPU as one thread each, through the
// NCCL communicator, against the fp64 reference of the one-rank layer
// applied to each rank's tokens (expert weight gradients summed over ranks),
// as MultiRankTest.cpp does on CPU ranks. The workspace starts as NaN bytes,
// so a padding row that no step zeroes shows. The sharded-expert plans
// (mr_shard_*, E < W: each rank holds one shard, ExpertSlices.h) run the
// same way, as ShardedExpertsTest.cpp does on CPU ranks. A plan for W ranks
// skips without W usable GPUs, with the reason.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/NcclCommunicator.h"
#include "flex/Runtime/Cuda/CudaBackend.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/ExpertSlices.h"
#include "flex/Runtime/PlanLoader.h"

#include "CudaTestSupport.h"
#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <random>
#include <thread>

using namespace flex;
using namespace flex::cudatest;
using namespace flex::test;

namespace {

class CudaMultiRankRun : public ::testing::TestWithParam<PlanVariant> {};

TEST_P(CudaMultiRankRun, MatchesTheReferenceOnEveryRank) {
  FLEX_SKIP_WITHOUT_CUDA();
  if (!isNcclAvailable())
    GTEST_SKIP() << "this build has no NCCL communicator";
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readTestPlan(GetParam().plan), *plan);
  ASSERT_TRUE(status.isOk()) << status.message();
  const int64_t variant = plan->findVariant(GetParam().variant);
  ASSERT_GE(variant, 0);
  const int W = static_cast<int>(plan->worldSize);
  int devices = 0;
  cudaGetDeviceCount(&devices);
  if (devices < W)
    GTEST_SKIP() << "the plan runs on " << W << " ranks, one GPU each; this "
                 << "machine has " << devices;
  const LayerConfig &config = plan->layer;
  reference::ReferenceOptions refOptions;
  for (const Step &step : plan->variants[variant].forward)
    if (step.op == StepOp::Gate)
      refOptions.capacityAlignment = step.attrs.capacityAlignment;

  // One communicator per rank, kept over the seeds. FLEX_A2A_TRANSPORT=ce:
  // exchanges through the copy engines, handshaking over local threads.
  NcclUniqueId id;
  ASSERT_TRUE(createNcclUniqueId(id).isOk());
  std::vector<std::shared_ptr<Communicator>> comms(W);
  const char *transport = std::getenv("FLEX_A2A_TRANSPORT");
  const bool peerCopies = transport && std::string(transport) == "ce";
  std::vector<std::shared_ptr<Communicator>> hosts;
  if (peerCopies) {
    ASSERT_TRUE(createLocalCommunicators(W, hosts, 120).isOk());
  }
  {
    std::vector<Status> made(W);
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r)
      threads.emplace_back([&, r] {
        NcclCommunicatorOptions options;
        options.device = r;
        options.timeoutSeconds = 120;
        if (peerCopies) {
          options.peerCopies = true;
          options.hostAllGather = hostAllGatherOver(hosts[r]);
        }
        made[r] = createNcclCommunicator(comms[r], id, r, W, options);
      });
    for (std::thread &t : threads)
      t.join();
    for (int r = 0; r < W; ++r)
      ASSERT_TRUE(made[r].isOk()) << "rank " << r << ": " << made[r].message();
  }

  for (uint64_t seed : {1u, 2u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937_64 rng(seed);
    RankInputs drawn;
    ASSERT_TRUE(makeRankInputs(config, refOptions, W, rng, drawn));
    const double gradLAux = 0.5;

    // Per rank: the arguments in device memory on its GPU, read back after.
    std::vector<std::map<std::string, std::vector<double>>> results(W);
    std::vector<Status> statuses(W);
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r)
      threads.emplace_back([&, r] {
        cudaSetDevice(r);
        // Rank r's experts r*L .. r*L+L-1, or its shard of expert r / s.
        auto slice = [&](const char *name, const std::vector<double> &all) {
          return sliceExpertParameter(config, W, r, name, all);
        };
        std::map<std::string, std::vector<double>> values =
            rankArgumentValues(drawn, r, gradLAux, slice);
        std::map<std::string, Buffer> buffers;
        std::vector<Binding> bindings;
        for (const Argument &arg : plan->arguments) {
          Buffer buffer(arg.dtype, static_cast<size_t>(arg.numElements()));
          auto given = values.find(arg.name);
          if (given != values.end() && !given->second.empty())
            buffer.set(given->second);
          else
            buffer.poison();
          auto [it, inserted] = buffers.emplace(arg.name, std::move(buffer));
          bindings.push_back(
              {arg.name, it->second.device, arg.numBytes()});
        }
        std::unique_ptr<Backend> backend;
        CudaBackendOptions options;
        options.device = r;
        Status s = createCudaBackend(backend, options);
        std::unique_ptr<Executor> executor;
        if (s)
          s = Executor::create(plan, std::move(backend), executor);
        // A workspace of NaN bytes.
        void *workspace = nullptr;
        const int64_t bytes = std::max<int64_t>(plan->workspace.bytes, 1);
        if (s && cudaMalloc(&workspace, bytes) != cudaSuccess)
          s = Status(StatusCode::Internal, "cudaMalloc of the workspace");
        if (s && cudaMemset(workspace, 0xff, bytes) != cudaSuccess)
          s = Status(StatusCode::Internal, "cudaMemset of the workspace");
        if (s)
          s = executor->setWorkspace(workspace, plan->workspace.bytes);
        if (s)
          s = executor->setCommunicator(comms[r]);
        if (s)
          s = executor->selectVariant(variant);
        if (s)
          s = executor->forward(bindings.data(), bindings.size());
        if (s && plan->training)
          s = executor->backward(bindings.data(), bindings.size());
        if (s && cudaDeviceSynchronize() != cudaSuccess)
          s = Status(StatusCode::Internal, "cudaDeviceSynchronize");
        statuses[r] = s;
        for (auto &[name, buffer] : buffers) {
          buffer.download();
          std::vector<double> got(buffer.count);
          for (size_t i = 0; i < buffer.count; ++i)
            got[i] = buffer.at(i);
          results[r][name] = std::move(got);
        }
        executor.reset();
        if (workspace)
          cudaFree(workspace);
      });
    for (std::thread &t : threads)
      t.join();
    for (int r = 0; r < W; ++r)
      ASSERT_TRUE(statuses[r].isOk())
          << "rank " << r << ": " << statuses[r].message();

    const double tolerance = config.dtype == DType::F32 ? 1e-5 : 2e-2;
    const RankReference ref =
        referenceOnRanks(config, refOptions, drawn, gradLAux, plan->training);
    const std::vector<reference::LayerForward> &forward = ref.forward;
    const std::vector<reference::LayerGradients> &grads = ref.grads;
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      auto &got = results[r];
      EXPECT_LE(reference::relativeL2(got["out"], forward[r].out), tolerance);
      EXPECT_LE(reference::relativeL2(got["l_aux"], {forward[r].lAux}),
                tolerance);
      if (!plan->training)
        continue;
      EXPECT_LE(reference::relativeL2(got["grad_x"], grads[r].x), tolerance);
      EXPECT_LE(reference::relativeL2(got["grad_wg"], grads[r].wg), tolerance);
      // Expert gradients sum every rank's part: relative to the parts'
      // magnitude where they cancel (expertFloor).
      // A sharded rank's grad_b2 is the whole b2 gradient of its expert.
      for (auto [name, want, magnitude] : expertGradients(ref))
        if (got.count(name)) {
          EXPECT_LE(reference::relativeL2(
                        got[name],
                        sliceExpertParameter(config, W, r, name, *want),
                        expertFloor(sliceExpertParameter(config, W, r, name,
                                                         *magnitude))),
                    tolerance)
              << name;
        }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Plans, CudaMultiRankRun,
    ::testing::Values(PlanVariant{"mr_ffn_fixed_w2_train.json", "ep1"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "ep2"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "ex2"},
                      PlanVariant{"mr_ffn_fixed_w2_train.json", "dp"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "ep2"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "ex2"},
                      PlanVariant{"mr_gated_bounded_w2_train_bf16.json", "dp"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "ep1"},
                      PlanVariant{"mr_ffn_dropless_w4_train.json", "ep2"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "ep1"},
                      PlanVariant{"mr_ffn_fixed_w4_infer.json", "ep2"},
                      // Experts sharded over ranks (E < W).
                      PlanVariant{"mr_shard_ffn_e1_w2_train.json", "r2d1"},
                      PlanVariant{"mr_shard_ffn_e1_w2_train.json", "r2d2"},
                      PlanVariant{"mr_shard_ffn_e1_w2_train.json", "r0d1"},
                      PlanVariant{"mr_shard_gated_e2_w4_train.json", "r2d1"},
                      PlanVariant{"mr_shard_gated_e2_w4_train.json", "r2d2"},
                      PlanVariant{"mr_shard_gated_e2_w4_train.json", "r0d1"},
                      PlanVariant{"mr_shard_ffn_e2_w4_train_bf16.json", "r2d1"},
                      PlanVariant{"mr_shard_ffn_e2_w4_train_bf16.json", "r2d2"},
                      PlanVariant{"mr_shard_ffn_e2_w4_train_bf16.json", "r0d1"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r4d1"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r4d2"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r0d1"},
                      // 1 <= r < s: grouped collectives (token classes and
                      // shard groups) over NCCL sub-communicators.
                      PlanVariant{"mr_shard_ffn_e1_w2_train.json", "r1d1"},
                      PlanVariant{"mr_shard_gated_e2_w4_train.json", "r1d1"},
                      PlanVariant{"mr_shard_ffn_e2_w4_train_bf16.json", "r1d1"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r2d1"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r2d2"},
                      PlanVariant{"mr_shard_ffn_e1_w4_train.json", "r1d1"}),
    planVariantName);

} // namespace
