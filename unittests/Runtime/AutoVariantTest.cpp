//===- AutoVariantTest.cpp - The executor's automatic variant choice ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// variant = auto (docs/CostModel.md, "The automatic choice"): the default
// for a plan of several variants, turned on and off by selectVariant, the
// profile fallback kept for explain, explain's JSON, and on W ranks (threads)
// every rank picking the same variant, even when the ranks were given
// different profiles, with the outputs still matching the fp64 reference.
//
//===----------------------------------------------------------------------===//

#include "MultiRankTestSupport.h"

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/CostModel/DeviceProfile.h"
#include "flex/Runtime/PlanLoader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <map>

using namespace flex;
using namespace flex::test;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::shared_ptr<const Plan> loadTestPlan(const std::string &name) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readTestPlan(name), *plan);
  EXPECT_TRUE(status.isOk()) << status.message();
  return plan;
}

std::unique_ptr<Executor> makeExecutor(std::shared_ptr<const Plan> plan,
                                       const RuntimeOptions &options = {}) {
  std::unique_ptr<Executor> executor;
  Status status =
      Executor::create(std::move(plan), createCpuBackend(), options, executor);
  EXPECT_TRUE(status.isOk()) << status.message();
  return executor;
}

} // namespace

TEST(AutoVariant, IsTheDefaultForSeveralVariantsOnly) {
  auto several = loadTestPlan("ffn_fixed_train.json");
  std::unique_ptr<Executor> executor = makeExecutor(several);
  EXPECT_TRUE(executor->automaticVariant());
  Explanation explanation = executor->explain();
  EXPECT_EQ(executor->selectedVariant(), explanation.chosen);
  // A fixed capacity is known before the first call.
  EXPECT_EQ(explanation.capacitySource, "static");
  EXPECT_GT(explanation.capacity, 0);

  EXPECT_FALSE(makeExecutor(loadTestPlan("gated_bounded_infer.json"))
                   ->automaticVariant());

  // Naming a variant turns auto off; "auto" turns it on again.
  ASSERT_TRUE(executor->selectVariant("ragged").isOk());
  EXPECT_FALSE(executor->automaticVariant());
  EXPECT_EQ(executor->selectedVariant(), 1);
  EXPECT_THAT(executor->explain().reason, HasSubstr("named by the caller"));
  ASSERT_TRUE(executor->selectVariant("auto").isOk());
  EXPECT_TRUE(executor->automaticVariant());
  ASSERT_TRUE(executor->selectVariant(int64_t{0}).isOk());
  EXPECT_FALSE(executor->automaticVariant());

  RuntimeOptions options;
  ASSERT_TRUE(options.set("variant", "auto").isOk());
  EXPECT_TRUE(makeExecutor(loadTestPlan("gated_bounded_infer.json"), options)
                  ->automaticVariant());
  ASSERT_TRUE(options.set("variant", "padded").isOk());
  EXPECT_FALSE(makeExecutor(several, options)->automaticVariant());
}

TEST(AutoVariant, KeepsWhyTheProfileFellBack) {
  auto plan = loadTestPlan("ffn_fixed_train.json");
  Explanation none = makeExecutor(plan)->explain();
  EXPECT_EQ(none.profileSource, "builtin");
  EXPECT_THAT(none.profileWhy, HasSubstr("no device profile given"));

  RuntimeOptions options;
  ASSERT_TRUE(options.set("profile", "/nonexistent/profile.json").isOk());
  std::string text;
  ASSERT_TRUE(options.get("profile", text).isOk());
  EXPECT_EQ(text, "/nonexistent/profile.json");
  Explanation missing = makeExecutor(plan, options)->explain();
  EXPECT_EQ(missing.profileSource, "builtin");
  EXPECT_THAT(missing.profileWhy,
              HasSubstr("cannot read device profile '/nonexistent"));
  EXPECT_THAT(missing.profileWhy, HasSubstr("using the built-in cpu profile"));

  // A good file is used; a CUDA one is stale here.
  std::string path = ::testing::TempDir() + "flex_auto_profile.json";
  ASSERT_TRUE(writeProfileFile(path, defaultProfile("cpu", 1)).isOk());
  options.profile = path;
  EXPECT_EQ(makeExecutor(plan, options)->explain().profileSource, "builtin");
  DeviceProfile measured = defaultProfile("cpu", 1);
  measured.builtin = false;
  measured.deviceName = "test-cpu";
  ASSERT_TRUE(writeProfileFile(path, measured).isOk());
  Explanation used = makeExecutor(plan, options)->explain();
  EXPECT_EQ(used.profileSource, "file");
  EXPECT_EQ(used.profileDevice, "test-cpu");
  EXPECT_EQ(used.profileWhy, "");
  ASSERT_TRUE(writeProfileFile(path, defaultProfile("cuda", 1)).isOk());
  EXPECT_THAT(makeExecutor(plan, options)->explain().profileWhy,
              HasSubstr("stale"));
  std::filesystem::remove(path);
}

TEST(AutoVariant, MeasuredTimesOverruleTheModelOnOneRank) {
  // The built-in profile predicts padded and ragged within 25% of each
  // other on this plan: both are explored (timed calls), then the faster
  // measured one runs.
  auto plan = loadTestPlan("ffn_fixed_train.json");
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  RankBuffers buffers;
  buffers.init(*plan);
  std::vector<Binding> bindings = buffers.bindings();
  // Exploration is bounded: at most 4 calls measuring each variant.
  std::map<std::string, int> measuring;
  int explored = 0;
  for (int call = 0; call < 12; ++call) {
    ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
    ASSERT_TRUE(executor->backward(bindings.data(), bindings.size()).isOk());
    const Explanation now = executor->explain();
    bool named = false;
    for (const Variant &variant : plan->variants)
      if (now.reason.find("measuring '" + variant.name + "'") !=
          std::string::npos) {
        ++measuring[variant.name];
        named = true;
      }
    // `exploring` says what the reason names: the call measured a variant.
    EXPECT_EQ(now.exploring, named) << "call " << call << ": " << now.reason;
    EXPECT_EQ(toJson(now).find("\"exploring\": true") != std::string::npos,
              named);
    explored += named;
  }
  EXPECT_GT(explored, 0);
  EXPECT_FALSE(executor->explain().exploring) << "exploration is bounded";
  for (const auto &[name, calls] : measuring)
    EXPECT_LE(calls, 4) << name;
  Explanation explanation = executor->explain();
  ASSERT_EQ(explanation.variants.size(), 2u);
  double measured[2];
  for (int v = 0; v < 2; ++v) {
    const VariantExplanation &each = explanation.variants[v];
    EXPECT_GE(each.forwardRuns, 2) << each.name;
    EXPECT_GE(each.backwardRuns, 2) << each.name;
    measured[v] = each.measuredForwardUs + each.measuredBackwardUs;
  }
  // The next call runs, by the times measured so far, the fastest, or the
  // variant already running while it is within 3% of the fastest.
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  const int64_t ran = executor->lastRunStats().variant;
  EXPECT_LE(measured[ran],
            1.03 * std::min(measured[0], measured[1]) * (1 + 1e-12));
  EXPECT_THAT(
      executor->explain().reason,
      ::testing::AnyOf(HasSubstr("measured fastest at this capacity: '" +
                                 plan->variants[ran].name),
                       HasSubstr("keeping '" + plan->variants[ran].name)));

  // refine_variant off: the model's pick alone runs.
  RuntimeOptions options;
  ASSERT_TRUE(options.set("refine_variant", "0").isOk());
  std::unique_ptr<Executor> model = makeExecutor(plan, options);
  for (int call = 0; call < 6; ++call)
    ASSERT_TRUE(model->forward(bindings.data(), bindings.size()).isOk());
  const int64_t pick = model->explain().chosen;
  EXPECT_EQ(model->measurements(pick).forwardCalls, 6);
  EXPECT_EQ(model->measurements(1 - pick).forwardCalls, 0);
  // Untimed calls never explore (no measurement would come back).
  std::unique_ptr<Executor> untimed = makeExecutor(plan);
  RunOptions quiet;
  quiet.timeSteps = false;
  for (int call = 0; call < 6; ++call)
    ASSERT_TRUE(
        untimed->forward(bindings.data(), bindings.size(), quiet).isOk());
  const int64_t first = untimed->explain().chosen;
  EXPECT_EQ(untimed->measurements(first).forwardCalls, 6);
}

TEST(AutoVariant, ExplainsPredictionsAndMeasurements) {
  auto plan = loadTestPlan("ffn_fixed_train.json");
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  RankBuffers buffers;
  buffers.init(*plan);
  std::vector<Binding> bindings = buffers.bindings();
  for (int call = 0; call < 2; ++call) {
    ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
    ASSERT_TRUE(executor->backward(bindings.data(), bindings.size()).isOk());
  }
  Explanation explanation = executor->explain();
  ASSERT_EQ(explanation.variants.size(), 2u);
  EXPECT_TRUE(explanation.automatic);
  EXPECT_EQ(explanation.chosen, executor->lastRunStats().variant);
  const VariantExplanation &chosen = explanation.variants[explanation.chosen];
  EXPECT_EQ(chosen.forwardCalls, 2);
  EXPECT_EQ(chosen.backwardCalls, 2);
  // The first forward and backward paid one-time costs: not measured.
  EXPECT_EQ(chosen.forwardRuns, 1);
  EXPECT_EQ(chosen.backwardRuns, 1);
  EXPECT_GT(chosen.measuredForwardUs, 0);
  EXPECT_TRUE(std::isfinite(chosen.error));
  const VariantExplanation &other =
      explanation.variants[1 - explanation.chosen];
  EXPECT_EQ(other.forwardRuns, 0);
  EXPECT_TRUE(std::isnan(other.error));
  for (const VariantExplanation &v : explanation.variants) {
    EXPECT_GT(v.predictedForwardUs, 0);
    EXPECT_GT(v.predictedBackwardUs, 0);
    EXPECT_DOUBLE_EQ(v.predictedUs,
                     v.predictedForwardUs + v.predictedBackwardUs);
  }

  Json json = Json::parse(toJson(explanation));
  EXPECT_EQ(json["format"], "flex-explain");
  EXPECT_EQ(json["chosen"], explanation.chosen);
  EXPECT_EQ(json["profile"]["source"], "builtin");
  ASSERT_EQ(json["variants"].size(), 2u);
  for (const char *stage :
       {"gate", "dispatch", "experts", "combine", "collectives"})
    EXPECT_TRUE(json["variants"][0]["forward_stages_us"].contains(stage));
  EXPECT_TRUE(json["variants"][1 - explanation.chosen]["measured_forward_us"]
                  .is_null());
  EXPECT_EQ(json["variants"][explanation.chosen]["chosen"], true);
}

namespace {

/// Runs `calls` forwards and backwards of `planName` in auto mode on W
/// thread ranks (rank r given profiles[r], "" for none); checks that every
/// rank ran the same variant in every call and the last call's outputs
/// against the fp64 reference. Returns rank 0's explanation.
Explanation runAutoOnRanks(const std::string &planName,
                           const std::vector<std::string> &profiles,
                           int calls) {
  auto plan = loadTestPlan(planName);
  const int W = static_cast<int>(plan->worldSize);
  std::mt19937_64 rng(7);
  reference::ReferenceOptions refOptions;
  RankInputs drawn;
  EXPECT_TRUE(makeRankInputs(plan->layer, refOptions, W, rng, drawn));
  const double gradLAux = 0.5;
  std::vector<RankBuffers> buffers = makeRankBuffers(*plan, drawn, gradLAux);
  auto comms = localRanks(W);
  std::vector<Status> results(W);
  std::vector<std::vector<int64_t>> ran(W);
  std::vector<Explanation> explanations(W);
  onRanks(W, [&](int r) {
    RuntimeOptions options;
    options.profile = profiles[r];
    std::unique_ptr<Executor> executor;
    Status s = Executor::create(plan, createCpuBackend(), options, executor);
    if (s)
      s = executor->setCommunicator(comms[r]);
    std::vector<Binding> bindings = buffers[r].bindings();
    for (int call = 0; s && call < calls; ++call) {
      buffers[r].poison();
      s = executor->forward(bindings.data(), bindings.size());
      if (s)
        ran[r].push_back(executor->lastRunStats().variant);
      if (s && plan->training)
        s = executor->backward(bindings.data(), bindings.size());
    }
    if (s)
      explanations[r] = executor->explain();
    results[r] = s;
  });
  for (int r = 0; r < W; ++r) {
    EXPECT_TRUE(results[r].isOk())
        << "rank " << r << ": " << results[r].message();
    EXPECT_EQ(ran[r], ran[0]) << "rank " << r << " chose otherwise";
    EXPECT_EQ(explanations[r].chosen, explanations[0].chosen);
    EXPECT_EQ(explanations[r].capacity, explanations[0].capacity);
    EXPECT_TRUE(explanations[r].automatic);
  }
  if (ran[0].empty())
    return explanations[0];
  // The reference for the variant that ran last (its capacity alignment).
  for (const Step &step : plan->variants[ran[0].back()].forward)
    if (step.op == StepOp::Gate)
      refOptions.capacityAlignment = step.attrs.capacityAlignment;
  const RankReference ref = referenceOnRanks(plan->layer, refOptions, drawn,
                                             gradLAux, plan->training);
  const double tolerance = plan->layer.dtype == DType::F32 ? 1e-5 : 2e-2;
  for (int r = 0; r < W; ++r) {
    EXPECT_LE(reference::relativeL2(buffers[r].get("out"), ref.forward[r].out),
              tolerance)
        << "rank " << r;
    if (plan->training) {
      EXPECT_LE(reference::relativeL2(buffers[r].get("grad_x"), ref.grads[r].x),
                tolerance)
          << "rank " << r;
    }
  }
  return explanations[0];
}

} // namespace

// A dropless capacity: the first call chooses for the buffers' bound, later
// ones for the previous call's synced C, the same on every rank.
TEST(AutoVariant, EveryRankPicksTheSameVariantDropless) {
  Explanation explanation =
      runAutoOnRanks("mr_ffn_dropless_w4_train.json", {"", "", "", ""}, 3);
  EXPECT_EQ(explanation.capacitySource, "previous call");
  EXPECT_GT(explanation.capacity, 0);
}

TEST(AutoVariant, EveryRankPicksTheSameVariantFixed) {
  Explanation explanation =
      runAutoOnRanks("mr_ffn_fixed_w2_train.json", {"", ""}, 2);
  EXPECT_EQ(explanation.capacitySource, "static");
}

// Measured times refine the choice on several ranks too: the ranks explore
// the same variants at the same calls, then agree once (an all-reduce of the
// means) and run the variant fastest on the slowest rank - the same on
// every rank in every call (runAutoOnRanks checks), though each rank's own
// times differ.
TEST(AutoVariant, RanksRefineTogetherOnTheSlowestRanksTimes) {
  // Every rank given one profile in which exchanges cost next to nothing:
  // the variants then differ by little and several are candidates.
  int refined = 0;
  for (const char *planName :
       {"mr_ffn_fixed_w2_train.json", "mr_ffn_dropless_w4_train.json"}) {
    SCOPED_TRACE(planName);
    auto plan = loadTestPlan(planName);
    const int W = static_cast<int>(plan->worldSize);
    std::string path = ::testing::TempDir() + "flex_auto_refine_profile.json";
    DeviceProfile profile = defaultProfile("cpu", W);
    profile.builtin = false;
    profile.deviceName = "cheap-exchange-cpu";
    for (CollectivePoint &point : profile.collectives) {
      point.alphaSeconds = 1e-9;
      point.betaBytesPerSecond = 1e15;
    }
    ASSERT_TRUE(writeProfileFile(path, profile).isOk());
    const Explanation explanation = runAutoOnRanks(
        planName, std::vector<std::string>(static_cast<size_t>(W), path), 14);
    std::filesystem::remove(path);
    EXPECT_EQ(explanation.profileSource, "file");
    int64_t candidates = 0;
    double pick = explanation.variants[explanation.chosen].predictedUs;
    for (const VariantExplanation &v : explanation.variants)
      pick = std::min(pick, v.predictedUs);
    for (const VariantExplanation &v : explanation.variants)
      candidates += v.predictedUs <= pick * 1.25 + 1e-9;
    if (candidates < 2)
      continue;
    EXPECT_THAT(explanation.reason,
                HasSubstr("measured fastest at this capacity on the slowest "
                          "rank: '" +
                          plan->variants[explanation.chosen].name + "'"));
    int64_t measuredVariants = 0;
    for (const VariantExplanation &v : explanation.variants)
      measuredVariants += v.forwardRuns >= 2;
    EXPECT_GE(measuredVariants, 2);
    ++refined;
  }
  EXPECT_GT(refined, 0) << "no plan had two candidates: the test is vacuous";
}

// Rank 0 given a file the others lack: every rank sees the difference (a
// one-time all-reduce of the profiles' hashes) and takes the built-in one.
TEST(AutoVariant, RanksGivenDifferentProfilesAgreeOnTheBuiltinOne) {
  std::string path = ::testing::TempDir() + "flex_auto_rank0_profile.json";
  DeviceProfile measured = defaultProfile("cpu", 2);
  measured.builtin = false;
  measured.deviceName = "rank0-cpu";
  for (CollectivePoint &point : measured.collectives)
    point.alphaSeconds = 1e-9; // exchanges look free: another choice
  ASSERT_TRUE(writeProfileFile(path, measured).isOk());
  Explanation explanation =
      runAutoOnRanks("mr_gated_bounded_w2_train_bf16.json", {path, ""}, 2);
  EXPECT_EQ(explanation.profileSource, "builtin");
  EXPECT_THAT(explanation.profileWhy, HasSubstr("different device profiles"));
  std::filesystem::remove(path);
}

namespace {

/// A backend whose "device" memory is the host's, counting the copies: the
/// path a CUDA backend takes, run on CPU threads.
class CountingDeviceBackend final : public Backend {
public:
  std::string_view name() const override { return "counting-device"; }
  bool isHostMemory() const override { return false; }
  Status copyToHost(void *hostDst, const void *src, int64_t bytes) override {
    ++toHost;
    return Backend::copyToHost(hostDst, src, bytes);
  }
  Status copyFromHost(void *dst, const void *hostSrc, int64_t bytes) override {
    ++fromHost;
    return Backend::copyFromHost(dst, hostSrc, bytes);
  }
  Status synchronize() override {
    ++synchronized;
    return Status::ok();
  }
  int toHost = 0, fromHost = 0, synchronized = 0;
};

/// A host communicator that says its collectives take device memory, and
/// refuses to reduce values that live on the caller's stack (the host
/// pointer the agreement starts from), as NCCL could not read them.
class DeviceMemoryCommunicator final : public Communicator {
public:
  DeviceMemoryCommunicator(std::shared_ptr<Communicator> inner,
                           const void *hostValues)
      : inner_(std::move(inner)), hostValues_(hostValues) {}
  std::string_view name() const override { return "device-memory"; }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  CommMemory memory() const override { return CommMemory::Device; }
  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    return inner_->allToAll(send, sendOffsets, sendBytes, recv, recvOffsets,
                            recvBytes, what);
  }
  Status allReduceMaxInt32(int32_t *values, int64_t count,
                           std::string_view what) override {
    if (values == hostValues_)
      return Status(StatusCode::Internal, "given the host's values");
    return inner_->allReduceMaxInt32(values, count, what);
  }
  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view what) override {
    return inner_->allGather(send, bytes, recv, what);
  }
  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    return inner_->reduceScatterSum(send, recv, count, type, what);
  }
  Status barrier(std::string_view what) override {
    return inner_->barrier(what);
  }

private:
  std::shared_ptr<Communicator> inner_;
  const void *hostValues_;
};

} // namespace

// The agreements of the automatic choice on a device communicator (NCCL)
// go through the backend's memory: copied in, reduced there, waited for,
// copied back; on a host communicator directly.
TEST(AutoVariant, AgreementsReduceThroughDeviceMemoryOnDeviceCommunicators) {
  const int W = 3;
  auto comms = localRanks(W);
  std::vector<Status> results(W);
  std::vector<std::array<int32_t, 3>> reduced(W);
  std::vector<CountingDeviceBackend> backends(W);
  onRanks(W, [&](int r) {
    std::array<int32_t, 3> values = {r, 10 - r, r == 1 ? 77 : -1};
    DeviceMemoryCommunicator device(comms[r], values.data());
    results[r] = allReduceMaxOnHost(device, backends[r], values.data(), 3,
                                    "test agreement");
    reduced[r] = values;
  });
  for (int r = 0; r < W; ++r) {
    ASSERT_TRUE(results[r].isOk()) << "rank " << r << ": "
                                   << results[r].message();
    EXPECT_EQ(reduced[r], (std::array<int32_t, 3>{W - 1, 10, 77}))
        << "rank " << r;
    EXPECT_EQ(backends[r].fromHost, 1);
    EXPECT_EQ(backends[r].synchronized, 1);
    EXPECT_EQ(backends[r].toHost, 1);
  }
  // A host communicator reduces the host values in place, no copies.
  auto hostComms = localRanks(W);
  std::vector<CountingDeviceBackend> unused(W);
  onRanks(W, [&](int r) {
    std::array<int32_t, 3> values = {r, -r, 5};
    results[r] = allReduceMaxOnHost(*hostComms[r], unused[r], values.data(), 3,
                                    "test agreement");
    reduced[r] = values;
  });
  for (int r = 0; r < W; ++r) {
    ASSERT_TRUE(results[r].isOk()) << results[r].message();
    EXPECT_EQ(reduced[r], (std::array<int32_t, 3>{W - 1, 0, 5}));
    EXPECT_EQ(unused[r].fromHost + unused[r].toHost, 0);
  }
}
