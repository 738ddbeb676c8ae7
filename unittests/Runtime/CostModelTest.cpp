//===- CostModelTest.cpp - The runtime cost model on golden profiles ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The simulation of mr_ffn_fixed_w2_train.json's variants on a hand-written
// profile whose costs are easy to add up by hand (docs/CostModel.md): every
// memory-bound or launch step 1 us, the router 1/3 us, a GEMM over one chunk
// (12 rows) 1 us and over all 24 rows 2 us, an all_to_all of the whole
// dispatch buffer 10 us (its chunk 5 us). Then the choice, the profile's
// JSON form, its fallbacks and the CPU calibration.
//
//===----------------------------------------------------------------------===//

#include "MultiRankTestSupport.h"

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/GroupedGemmRule.h"
#include "flex/Runtime/CostModel/Calibrate.h"
#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/PlanLoader.h"
#include "flex/Runtime/StepSchema.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

using namespace flex;
using ::testing::HasSubstr;

namespace {

/// The golden profile; `beta` of every collective in bytes/s. The whole
/// all_to_all sends 384 bytes (half of [24, 8] f32), so 38.4e6 makes it
/// 10 us.
std::string goldenProfile(double beta = 38.4e6, double slowdown = 1.0,
                          double exchangeSlowdown = 1.0) {
  char text[2048];
  std::snprintf(text, sizeof text, R"({
  "format": "flex-device-profile", "version": 1, "source": "calibrated",
  "device": {"name": "golden", "backend": "cuda"},
  "world": {"size": 2, "ranks_per_node": 2},
  "gemm": [{"m": 12, "n": 12, "k": 8, "dtype": "f32", "ragged": false,
            "flops_per_s": 2304e6}],
  "memory": {"bandwidth_bytes_per_s": 1e30, "launch_s": 1e-6},
  "collectives": [
    {"kind": "all_to_all", "world_size": 2, "group_size": 2,
     "transport": "nccl", "alpha_s": 0, "beta_bytes_per_s": %g},
    {"kind": "all_gather", "world_size": 2, "group_size": 2,
     "transport": "nccl", "alpha_s": 0, "beta_bytes_per_s": %g},
    {"kind": "reduce_scatter", "world_size": 2, "group_size": 2,
     "transport": "nccl", "alpha_s": 0, "beta_bytes_per_s": %g},
    {"kind": "all_reduce", "world_size": 2, "group_size": 2,
     "transport": "nccl", "alpha_s": 0, "beta_bytes_per_s": %g}],
  "overlap": {"compute_slowdown": %g, "exchange_slowdown": %g}
})",
                beta, beta, beta, beta, slowdown, exchangeSlowdown);
  return text;
}

DeviceProfile parsed(const std::string &text) {
  DeviceProfile profile;
  Status status = parseProfile(text, profile);
  EXPECT_TRUE(status.isOk()) << status.message();
  return profile;
}

Plan loadPlan(const std::string &name) {
  Plan plan;
  Status status = parsePlan(test::readTestPlan(name), plan);
  EXPECT_TRUE(status.isOk()) << status.message();
  return plan;
}

constexpr double kThird = 1.0 / 3.0;

TEST(CostModel, OverlappedChunksBeatOneExchangeWhenBytesDominate) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  CostModel model(parsed(goldenProfile()));
  const int64_t ep1 = plan.findVariant("ep1"), ep2 = plan.findVariant("ep2"),
                ex2 = plan.findVariant("ex2");
  // ep1: router, gate, dispatch; a2a 10 (uniform_segments beside it);
  // two 2 us GEMMs; a2a 10; combine.
  EXPECT_NEAR(model.predict(plan, ep1, false, -1).totalUs,
              kThird + 2 + 10 + 4 + 10 + 1, 1e-9);
  // ex2: both dispatch chunks queued at 3.33 (5 us each), chunk 0's GEMMs
  // at 8.33, its combine a2a after chunk 1's dispatch (13.33 .. 18.33),
  // chunk 1's GEMMs at 13.33, its combine a2a 18.33 .. 23.33, combine.
  Prediction ex = model.predict(plan, ex2, false, -1);
  EXPECT_NEAR(ex.totalUs, kThird + 2 + 5 + 5 + 5 + 5 + 1, 1e-9);
  // ep2 queues chunk 1's dispatch after chunk 0's combine: no gain.
  EXPECT_NEAR(model.predict(plan, ep2, false, -1).totalUs,
              model.predict(plan, ep1, false, -1).totalUs, 1e-9);
  // Each exchange ran on the exchange stream; chunk 1's first GEMM waited
  // for its own dispatch only (13.33), not for chunk 0's combine.
  int exchanges = 0;
  const StepPrediction *chunk1Gemm = nullptr;
  int gemms = 0;
  for (const StepPrediction &step : ex.steps) {
    exchanges += step.stream == CostStream::Exchange;
    if (step.op == StepOp::GroupedGemm && ++gemms == 3)
      chunk1Gemm = &step;
  }
  EXPECT_EQ(exchanges, 4);
  ASSERT_NE(chunk1Gemm, nullptr);
  EXPECT_NEAR(chunk1Gemm->startUs, kThird + 2 + 10, 1e-9);
  EXPECT_EQ(chunk1Gemm->rows, 12);
}

TEST(CostModel, WithoutOverlapEveryStepAddsUp) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  CostModelOptions serial;
  serial.overlap = false;
  CostModel model(parsed(goldenProfile()), serial);
  // ex2 serial: 1/3 + gate + dispatch + 4 chunk exchanges of 5 + 2 x
  // (segments + two 1 us GEMMs) + combine.
  Prediction ex = model.predict(plan, plan.findVariant("ex2"), false, -1);
  EXPECT_NEAR(ex.totalUs, kThird + 2 + 20 + 6 + 1, 1e-9);
  double sum = 0;
  for (const StepPrediction &step : ex.steps) {
    EXPECT_EQ(step.stream, CostStream::Compute);
    sum += step.us;
  }
  EXPECT_NEAR(sum, ex.totalUs, 1e-9);
  // Serial, one exchange of each kind is cheaper than two chunks of it.
  EXPECT_EQ(model.choose(plan, false, -1).variant, plan.findVariant("ep1"));
}

TEST(CostModel, StagesSumTheirSteps) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  CostModel model(parsed(goldenProfile()));
  Prediction ep1 = model.predict(plan, plan.findVariant("ep1"), false, -1);
  auto stage = [&](CostStage s) { return ep1.stageUs[static_cast<int>(s)]; };
  EXPECT_NEAR(stage(CostStage::Gate), kThird + 1, 1e-9);
  EXPECT_NEAR(stage(CostStage::Dispatch), 2, 1e-9); // dispatch, segments
  EXPECT_NEAR(stage(CostStage::Experts), 4, 1e-9);
  EXPECT_NEAR(stage(CostStage::Combine), 1, 1e-9);
  EXPECT_NEAR(stage(CostStage::Collectives), 20, 1e-9);
  EXPECT_EQ(getCostStage(StepOp::ReduceScatter), CostStage::Collectives);
  EXPECT_EQ(toString(CostStage::Experts), "experts");
}

TEST(CostModel, ComputeBesideAnExchangeIsSlowed) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  CostModel model(parsed(goldenProfile(38.4e6, 2.0)));
  Prediction ex = model.predict(plan, plan.findVariant("ex2"), false, -1);
  // Chunk 0's uniform_segments runs entirely beside the dispatch: 2 us.
  std::vector<const StepPrediction *> segments, gemms;
  for (const StepPrediction &step : ex.steps) {
    if (step.op == StepOp::UniformSegments)
      segments.push_back(&step);
    if (step.op == StepOp::GroupedGemm)
      gemms.push_back(&step);
  }
  ASSERT_EQ(segments.size(), 2u);
  ASSERT_EQ(gemms.size(), 4u);
  EXPECT_NEAR(segments[0]->us, 2, 1e-9);
  // Chunk 0's GEMMs (from 8.33, beside chunk 1's dispatch) take 2 each.
  EXPECT_NEAR(gemms[0]->startUs, kThird + 2 + 5, 1e-9);
  EXPECT_NEAR(gemms[1]->endUs(), kThird + 2 + 5 + 4, 1e-9);
  // Chunk 1's segments: from 12.33, half a us of work by 13.33 and the rest
  // beside chunk 0's combine: 2 us.
  EXPECT_NEAR(segments[1]->startUs, kThird + 2 + 9, 1e-9);
  EXPECT_NEAR(segments[1]->us, 2, 1e-9);
}

TEST(CostModel, AnExchangeBesideComputeIsSlowed) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  CostModel model(parsed(goldenProfile(38.4e6, 1.0, 2.0)));
  // ex2, each exchange 5 us alone, at half speed while compute runs:
  // chunk 0's dispatch from 2.33 beside 1 us of uniform_segments (5.5);
  // chunk 1's from 7.83 beside chunk 0's GEMMs and chunk 1's segments, 3
  // us (6.5); chunk 0's combine from 14.33 beside chunk 1's GEMMs, 2 us
  // (6); chunk 1's combine alone (5), then the combine.
  Prediction ex = model.predict(plan, plan.findVariant("ex2"), false, -1);
  std::vector<double> exchanges;
  for (const StepPrediction &step : ex.steps)
    if (step.stream == CostStream::Exchange)
      exchanges.push_back(step.us);
  ASSERT_EQ(exchanges.size(), 4u);
  EXPECT_NEAR(exchanges[0], 5.5, 1e-9);
  EXPECT_NEAR(exchanges[1], 6.5, 1e-9);
  EXPECT_NEAR(exchanges[2], 6.0, 1e-9);
  EXPECT_NEAR(exchanges[3], 5.0, 1e-9);
  EXPECT_NEAR(ex.totalUs, kThird + 26, 1e-9);
  // ep1: only its dispatch has compute beside it (1 us of segments).
  EXPECT_NEAR(model.predict(plan, plan.findVariant("ep1"), false, -1).totalUs,
              kThird + 2 + 10.5 + 4 + 10 + 1, 1e-9);
  // Serial: nothing beside anything, the figure changes nothing.
  CostModelOptions serial;
  serial.overlap = false;
  CostModel slowSerial(parsed(goldenProfile(38.4e6, 1.0, 2.0)), serial);
  CostModel plainSerial(parsed(goldenProfile()), serial);
  EXPECT_NEAR(
      slowSerial.predict(plan, plan.findVariant("ex2"), false, -1).totalUs,
      plainSerial.predict(plan, plan.findVariant("ex2"), false, -1).totalUs,
      1e-9);
}

TEST(CostModel, ChoosesByTheExchangeSpeed) {
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  // Slow exchanges: the pipelined ex2 hides half of them.
  Choice slow = CostModel(parsed(goldenProfile())).choose(plan, false, -1);
  EXPECT_EQ(slow.variant, plan.findVariant("ex2"));
  EXPECT_EQ(slow.forward.size(), plan.variants.size());
  EXPECT_THAT(slow.reason, HasSubstr("'ex2'"));
  EXPECT_THAT(slow.reason, HasSubstr("next best 'ep1'"));
  // Free exchanges: dp (no uniform_segments, all experts local) wins:
  // 1/3 + gate + dispatch + two 2 us GEMMs + combine.
  CostModel fast(parsed(goldenProfile(1e30)));
  Choice choice = fast.choose(plan, false, -1);
  EXPECT_EQ(choice.variant, plan.findVariant("dp"));
  EXPECT_NEAR(choice.totalUs[choice.variant], kThird + 2 + 4 + 1, 1e-9);
  // Training adds each variant's backward; the same inputs, the same pick.
  Choice train = fast.choose(plan, true, -1);
  ASSERT_EQ(train.backward.size(), plan.variants.size());
  for (size_t v = 0; v < plan.variants.size(); ++v)
    EXPECT_NEAR(train.totalUs[v],
                train.forward[v].totalUs + train.backward[v].totalUs, 1e-9);
  EXPECT_EQ(fast.choose(plan, true, -1).variant, train.variant);
  EXPECT_EQ(fast.choose(plan, true, -1).reason, train.reason);
}

TEST(CostModel, DeviceCapacityScalesTheRows) {
  // Dropless: C is known only on the device; the caller passes the synced C.
  Plan plan = loadPlan("mr_ffn_dropless_w4_train.json");
  CostModel model(parsed(goldenProfile()));
  Prediction small = model.predict(plan, 0, false, 2);
  Prediction large = model.predict(plan, 0, false, 8);
  EXPECT_LT(small.totalUs, large.totalUs);
  for (const StepPrediction &step : large.steps) {
    if (step.op == StepOp::GroupedGemm) {
      EXPECT_GT(step.rows, 0);
    }
  }
}

TEST(CostModel, EveryCheckedInPlanPredicts) {
  // Every variant of every test plan, forward and backward, on both
  // built-in profiles and several capacities: finite, positive, and each
  // step within the makespan.
  int plans = 0;
  for (const char *dir : {FLEX_TEST_PLANS_DIR, FLEX_TEST_CUDA_PLANS_DIR}) {
    if (!std::filesystem::is_directory(dir))
      continue;
    for (const auto &entry : std::filesystem::directory_iterator(dir)) {
      if (entry.path().extension() != ".json")
        continue;
      Plan plan;
      if (!loadPlanFile(entry.path().string(), plan).isOk())
        continue; // the bad_* plans are meant to be refused
      ++plans;
      for (const char *backend : {"cpu", "cuda"}) {
        CostModel model(defaultProfile(backend, plan.worldSize));
        for (int64_t capacity : {-1, 1, 7}) {
          Choice choice = model.choose(plan, plan.training, capacity);
          ASSERT_GE(choice.variant, 0) << entry.path();
          for (size_t v = 0; v < plan.variants.size(); ++v) {
            EXPECT_TRUE(std::isfinite(choice.totalUs[v]) &&
                        choice.totalUs[v] > 0)
                << entry.path() << " variant " << v;
            for (const StepPrediction &step : choice.forward[v].steps)
              EXPECT_LE(step.endUs(), choice.forward[v].totalUs + 1e-9)
                  << entry.path();
          }
        }
      }
    }
  }
  EXPECT_GE(plans, 10);
}

/// When a step of `work` us started at `start` ends, `slowdown` times
/// slower inside `busy` (sorted, disjoint): the rule the model states,
/// written again here.
double endBeside(double start, double work,
                 const std::vector<std::pair<double, double>> &busy,
                 double slowdown) {
  double t = start;
  for (const auto &[a, b] : busy) {
    if (b <= t)
      continue;
    if (a > t) {
      if (work <= a - t)
        return t + work;
      work -= a - t;
      t = a;
    }
    if (work * slowdown <= b - t)
      return t + work * slowdown;
    work -= (b - t) / slowdown;
    t = b;
  }
  return t + work;
}

TEST(CostModel, SlowedExchangesSettleOnAFixedPoint) {
  // Every multi-rank variant, deep pipelines included: each exchange of the
  // returned schedule takes what the compute intervals of that same
  // schedule make it take (the schedule the model returns is settled).
  int exchanges = 0;
  for (const char *dir : {FLEX_TEST_PLANS_DIR, FLEX_TEST_CUDA_PLANS_DIR}) {
    if (!std::filesystem::is_directory(dir))
      continue;
    for (const auto &entry : std::filesystem::directory_iterator(dir)) {
      Plan plan;
      if (entry.path().extension() != ".json" ||
          !loadPlanFile(entry.path().string(), plan).isOk() ||
          plan.worldSize < 2)
        continue;
      DeviceProfile profile = defaultProfile("cuda", plan.worldSize);
      for (double slowdown : {2.0, 3.0, 8.0}) {
        profile.exchangeSlowdown = slowdown;
        CostModel model(profile);
        for (size_t v = 0; v < plan.variants.size(); ++v)
          for (bool backward : {false, true}) {
            if (backward && !plan.training)
              continue;
            Prediction p = model.predict(plan, v, backward, -1);
            const std::vector<Step> &steps =
                backward ? plan.variants[v].backward : plan.variants[v].forward;
            std::vector<std::pair<double, double>> computing;
            for (const StepPrediction &s : p.steps) {
              if (s.stream != CostStream::Compute || isCollective(s.op) ||
                  s.us <= 0)
                continue;
              if (!computing.empty() && computing.back().second >= s.startUs)
                computing.back().second = s.endUs();
              else
                computing.emplace_back(s.startUs, s.endUs());
            }
            for (const StepPrediction &s : p.steps) {
              if (s.stream != CostStream::Exchange)
                continue;
              ++exchanges;
              const double alone =
                  model.stepSeconds(plan, steps[s.index], s.rows) * 1e6;
              EXPECT_NEAR(s.endUs(),
                          endBeside(s.startUs, alone, computing, slowdown),
                          1e-6 * std::max(1.0, s.endUs()))
                  << entry.path() << " " << plan.variants[v].name
                  << (backward ? " backward" : " forward") << " step "
                  << s.index << " slowdown " << slowdown;
            }
          }
      }
    }
  }
  EXPECT_GT(exchanges, 50);
}

/// A one-rank cuda profile for small_swiglu_bf16_train.json (T 1000, k 2,
/// E 8, d 256, h 704, bf16, dropless: 2000 declared rows, 250 per expert,
/// so `auto` takes the device kernel, large tile). At C = 25 each GEMM runs
/// 200 rows, all 8 experts touched, 25 rows each:
///  - device kernel: 8 x 128 padded rows x 2 x 256 x 704 = 369.1e6 FLOPs at
///    3.69098752e12 = 100 us; bytes (8 x 256 x 704 + 200 x 960) x 2 =
///    3267584 at 6.535168e10 = 50 us; + 10 us launch: 110 us;
///  - cuBLAS per expert: 8 GEMMs of at least the table's 32 rows,
///    2 x 256 x 704 x 8 x 32 = 92.27e6 FLOPs at 0.92274688e12: 100 us;
///  - weight gradient on the device: 8 x 32 rows (its row step) is 25 us of
///    FLOPs, so its bytes' 50 us + 10 us: 60 us.
std::string decodeProfile(const char *backend = "cuda") {
  char text[2048];
  std::snprintf(text, sizeof text, R"({
  "format": "flex-device-profile", "version": 2, "source": "calibrated",
  "device": {"name": "golden", "backend": "%s"},
  "world": {"size": 1, "ranks_per_node": 1},
  "gemm": [{"groups": 8, "m": 32, "n": 704, "k": 256, "dtype": "bf16",
            "ragged": false, "flops_per_s": 2e12},
           {"groups": 8, "m": 32, "n": 704, "k": 256, "dtype": "bf16",
            "ragged": true, "flops_per_s": 0.92274688e12}],
  "memory": {"bandwidth_bytes_per_s": 6.535168e10, "launch_s": 1e-6},
  "collectives": [],
  "overlap": {"compute_slowdown": 1.0},
  "device_gemm": {"small_flops_per_s": 1e12,
                  "large_flops_per_s": 3.69098752e12,
                  "weight_read_efficiency": 1.0, "launch_s": 1e-5}
})",
                backend);
  return text;
}

/// The steps of `op` in a prediction.
std::vector<StepPrediction> stepsOf(const Prediction &prediction, StepOp op) {
  std::vector<StepPrediction> out;
  for (const StepPrediction &step : prediction.steps)
    if (step.op == op)
      out.push_back(step);
  return out;
}

// The gather-fused variant (single+gather): its gathered GEMMs follow the
// rule a plain one does (Core/GroupedGemmRule.h): here 250 rows per expert,
// the device kernel with the wgmma kernel (up to 2048), else cuBLAS over a
// scratch copy of the rows (priced with that copy), as under
// grouped_gemm=cublas; its dispatch_rows writes 4 bytes a row where
// dispatch copies the rows.
TEST(CostModel, GatheredGemmsArePricedOnTheirPath) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                               "/small_swiglu_bf16_gather_train.json",
                           plan)
                  .isOk());
  ASSERT_EQ(plan.variants.size(), 2u);
  ASSERT_EQ(plan.variants[1].name, "single+gather");
  auto model = [&](GroupedGemmImpl impl, bool wgmma = true) {
    CostModelOptions options;
    options.groupedGemm = impl;
    options.wgmmaGemm = wgmma;
    return CostModel(parsed(decodeProfile()), options);
  };
  auto gathered = [&](int64_t variant, const StepPrediction &step) {
    return plan.variants[variant]
        .forward[step.index]
        .in(OperandRole::RowTokens)
        .isValid();
  };
  Prediction fused = model(GroupedGemmImpl::Auto).predict(plan, 1, false, 25);
  int gatheredGemms = 0;
  for (const StepPrediction &step : stepsOf(fused, StepOp::GroupedGemm))
    if (gathered(1, step)) {
      EXPECT_EQ(step.gemmPath, GemmPath::Device);
      ++gatheredGemms;
    }
  EXPECT_EQ(gatheredGemms, 2); // w1 and w3 read x
  Prediction plain = model(GroupedGemmImpl::Auto).predict(plan, 0, false, 25);
  ASSERT_EQ(stepsOf(plain, StepOp::Dispatch).size(), 1u);
  ASSERT_EQ(stepsOf(fused, StepOp::DispatchRows).size(), 1u);
  EXPECT_LT(stepsOf(fused, StepOp::DispatchRows)[0].us,
            stepsOf(plain, StepOp::Dispatch)[0].us);

  // grouped_gemm=cublas, and auto without the wgmma kernel (250 rows per
  // expert is past the mma.sync kernel's 40): per expert, plus the rows'
  // copy.
  for (auto [impl, wgmma] : {std::pair{GroupedGemmImpl::Cublas, true},
                             std::pair{GroupedGemmImpl::Auto, false}}) {
    SCOPED_TRACE(impl == GroupedGemmImpl::Cublas ? "cublas" : "auto");
    Prediction fusedHost = model(impl, wgmma).predict(plan, 1, false, 25);
    Prediction plainHost = model(impl, wgmma).predict(plan, 0, false, 25);
    std::vector<StepPrediction> a = stepsOf(fusedHost, StepOp::GroupedGemm);
    std::vector<StepPrediction> b = stepsOf(plainHost, StepOp::GroupedGemm);
    ASSERT_EQ(a.size(), b.size());
    int copied = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].gemmPath, GemmPath::PerExpert);
      if (gathered(1, a[i])) {
        EXPECT_GT(a[i].us, b[i].us) << "the gathered GEMM's copy is priced";
        ++copied;
      } else {
        EXPECT_DOUBLE_EQ(a[i].us, b[i].us);
      }
    }
    EXPECT_EQ(copied, 2);
  }
}

//===----------------------------------------------------------------------===//
// grouped_gemm_activation_backward
//===----------------------------------------------------------------------===//

/// The backward's predicted time (us) of fc2's input gradient and the
/// activation's backward: the fused step, or the grouped_gemm writing the
/// gradient and the activation_backward; and the fused step's GEMM path.
struct InputGradient {
  double us = 0;
  GemmPath path = GemmPath::None;
};
InputGradient inputGradientOf(const Plan &plan, const Prediction &p) {
  InputGradient result;
  const std::vector<Step> &steps = plan.variants[p.variant].backward;
  for (const StepPrediction &step : p.steps) {
    const Step &s = steps[step.index];
    const bool dgrad = step.op == StepOp::GroupedGemm &&
                       plan.getBuffer(s.in(OperandRole::B)).name == "w2";
    const bool fused = step.op == StepOp::GroupedGemmActivationBackward ||
                       step.op == StepOp::GroupedGemmGluBackward;
    if (fused || step.op == StepOp::ActivationBackward ||
        step.op == StepOp::GluBackward || dgrad)
      result.us += step.us;
    if (fused)
      result.path = step.gemmPath;
  }
  return result;
}

/// The checked-in CUDA test plan `name`, and a copy with its
/// activation_backward pairs fused.
std::pair<Plan, Plan> unfusedAndFused(const std::string &name, int pairs) {
  nlohmann::ordered_json doc;
  {
    std::ifstream file(std::string(FLEX_TEST_CUDA_PLANS_DIR) + "/" + name);
    doc = nlohmann::ordered_json::parse(file);
  }
  Plan unfused, fused;
  EXPECT_TRUE(parsePlan(doc.dump(), unfused).isOk());
  EXPECT_EQ(test::fuseActivationBackwardSteps(doc), pairs);
  Status status = parsePlan(doc.dump(), fused);
  EXPECT_TRUE(status.isOk()) << status.message();
  return {std::move(unfused), std::move(fused)};
}

InputGradient
predictInputGradient(const Plan &plan, int64_t variant, bool wgmma,
                     GroupedGemmImpl impl = GroupedGemmImpl::Auto) {
  CostModelOptions options;
  options.wgmmaGemm = wgmma;
  options.groupedGemm = impl;
  const CostModel model(defaultProfile("cuda", 1), options);
  return inputGradientOf(plan, model.predict(plan, variant, true, -1));
}

// Off the wgmma kernel the fused step is the GEMM on grouped_gemm's path
// plus the activation's pass: the pair's price. On it, one device GEMM and
// no pass: where the plain GEMM takes the device kernel too (a dynamic
// layout at decode sizes: d 256, h 512, 64 tokens), the fused step costs
// that GEMM and the store's read of pre; on a fixed capacity (C1: T 16384, d =
// h = 4096, E 16, k 2: 4096 rows per expert) auto runs the fused step as
// the pair, the GEMM on cuBLAS's batched path and the pass
// (autoFusesBackwardInStore), and grouped_gemm=device takes the wgmma
// kernel's.
TEST(CostModel, ActivationBackwardFusedStepIsPricedOnItsPath) {
  {
    auto [unfused, fused] =
        unfusedAndFused("decode_ffn_bias_bf16_gather_train.json", 2);
    for (int64_t v = 0; v < 2; ++v) {
      const InputGradient pairOff = predictInputGradient(unfused, v, false);
      const InputGradient off = predictInputGradient(fused, v, false);
      const InputGradient pairOn = predictInputGradient(unfused, v, true);
      const InputGradient on = predictInputGradient(fused, v, true);
      std::printf("decode %s: pair %.1f us, fused %.1f us; on wgmma pair "
                  "%.1f us, fused %.1f us\n",
                  fused.variants[v].name.c_str(), pairOff.us, off.us, pairOn.us,
                  on.us);
      EXPECT_NEAR(off.us, pairOff.us, 0.02 * pairOff.us);
      EXPECT_EQ(on.path, GemmPath::Device);
      // The pair on wgmma: the same device GEMM, and the pass.
      double passUs = 0;
      CostModelOptions options;
      options.wgmmaGemm = true;
      for (const StepPrediction &step :
           CostModel(defaultProfile("cuda", 1), options)
               .predict(unfused, v, true, -1)
               .steps)
        if (step.op == StepOp::ActivationBackward)
          passUs = step.us;
      ASSERT_GT(passUs, 0.0);
      // No pass, but the store reads pre beside each product: between the
      // plain GEMM's price and the pair's.
      EXPECT_GE(on.us, pairOn.us - passUs - 1e-9);
      EXPECT_LT(on.us, pairOn.us);
    }
  }
  {
    // The compiled gated decode plan holds both: variant v and v + 4.
    Plan plan;
    ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                                 "/decode_swiglu_bf16_act_backward_train.json",
                             plan)
                    .isOk());
    ASSERT_EQ(plan.variants.size(), 8u);
    for (int64_t v = 0; v < 4; ++v) {
      const InputGradient pairOff = predictInputGradient(plan, v, false);
      const InputGradient off = predictInputGradient(plan, v + 4, false);
      const InputGradient pairOn = predictInputGradient(plan, v, true);
      const InputGradient on = predictInputGradient(plan, v + 4, true);
      std::printf("gated decode %s: pair %.1f us, fused %.1f us; on wgmma "
                  "pair %.1f us, fused %.1f us\n",
                  plan.variants[v + 4].name.c_str(), pairOff.us, off.us,
                  pairOn.us, on.us);
      EXPECT_NEAR(off.us, pairOff.us, 0.02 * pairOff.us);
      EXPECT_EQ(on.path, GemmPath::Device);
      EXPECT_LT(on.us, pairOn.us);
    }
  }
  {
    auto [unfused, fused] = unfusedAndFused("c1_ffn_relu_train.json", 1);
    const InputGradient pair = predictInputGradient(unfused, 0, false);
    const InputGradient off = predictInputGradient(fused, 0, false);
    const InputGradient on = predictInputGradient(fused, 0, true);
    const InputGradient device =
        predictInputGradient(fused, 0, true, GroupedGemmImpl::Device);
    std::printf("C1: pair %.1f us, fused %.1f us, fused with wgmma %.1f us, "
                "on grouped_gemm=device %.1f us\n",
                pair.us, off.us, on.us, device.us);
    EXPECT_EQ(off.path, GemmPath::Batched);
    EXPECT_NEAR(off.us, pair.us, 0.02 * pair.us);
    EXPECT_EQ(on.path, GemmPath::Batched);
    EXPECT_NEAR(on.us, pair.us, 0.02 * pair.us);
    EXPECT_EQ(device.path, GemmPath::Device);
    // The fused step's FLOPs are one product's.
    for (const Step &step : fused.variants[0].backward)
      if (step.op == StepOp::GroupedGemmActivationBackward) {
        const int64_t rows = fused.getBuffer(step.out(OperandRole::C)).shape[0];
        EXPECT_EQ(getStepWork(fused, step, -1).flops,
                  2.0 * static_cast<double>(rows) * 4096 * 4096);
      }
  }
}

//===----------------------------------------------------------------------===//
// grouped_gemm_combine
//===----------------------------------------------------------------------===//

/// The forward's predicted time (us) of fc2 and the combine: the fused step,
/// or the grouped_gemm writing expert_out and the combine; and the fused
/// step's GEMM path.
InputGradient secondLayerAndCombine(
    const Plan &plan, int64_t variant, GroupedGemmImpl impl,
    const DeviceProfile &profile = defaultProfile("cuda", 1)) {
  CostModelOptions options;
  options.groupedGemm = impl;
  const Prediction p =
      CostModel(profile, options).predict(plan, variant, false, -1);
  InputGradient result;
  const std::vector<Step> &steps = plan.variants[variant].forward;
  for (const StepPrediction &step : p.steps) {
    const Step &s = steps[step.index];
    const bool fc2 = step.op == StepOp::GroupedGemm &&
                     plan.getBuffer(s.in(OperandRole::B)).name == "w2";
    if (fc2 || step.op == StepOp::Combine ||
        step.op == StepOp::GroupedGemmCombine)
      result.us += step.us;
    if (step.op == StepOp::GroupedGemmCombine)
      result.path = step.gemmPath;
  }
  return result;
}

// The fused step's GEMM is priced on grouped_gemm's path (at decode sizes,
// d 256, h 512, E 16, k 4, 64 tokens: the device kernel; with
// grouped_gemm=cublas cuBLAS) and its combine as the combine step, times
// the slowdown measured for the store's sums where the device kernel sums
// them (Runs 35-36: about 5x the combine kernel at decode): above the pair
// on the device path, the pair's price off it.
TEST(CostModel, CombineFusedStepIsPricedOnItsPath) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                               "/decode_ffn_bias_bf16_combine.json",
                           plan)
                  .isOk());
  ASSERT_EQ(plan.variants.size(), 4u);
  for (int64_t v = 0; v < 2; ++v) {
    const InputGradient pair =
        secondLayerAndCombine(plan, v, GroupedGemmImpl::Auto);
    const InputGradient fused =
        secondLayerAndCombine(plan, v + 2, GroupedGemmImpl::Auto);
    const InputGradient pairCublas =
        secondLayerAndCombine(plan, v, GroupedGemmImpl::Cublas);
    const InputGradient fusedCublas =
        secondLayerAndCombine(plan, v + 2, GroupedGemmImpl::Cublas);
    std::printf("decode %s: pair %.1f us, fused %.1f us; cublas pair %.1f "
                "us, fused %.1f us\n",
                plan.variants[v + 2].name.c_str(), pair.us, fused.us,
                pairCublas.us, fusedCublas.us);
    // On the device kernel the store's sums cost what they measured
    // (several combine steps: RESULTS.md Runs 35-36); off it, the two
    // steps run and cost the pair's.
    EXPECT_EQ(fused.path, GemmPath::Device);
    EXPECT_GT(fused.us, 1.05 * pair.us);
    // A profile whose store sums as fast as the combine kernel prices the
    // two alike again.
    DeviceProfile even = defaultProfile("cuda", 1);
    ASSERT_TRUE(even.deviceGemm.has_value());
    even.deviceGemm->storeCombineSlowdown = 1.0;
    const InputGradient evenFused =
        secondLayerAndCombine(plan, v + 2, GroupedGemmImpl::Auto, even);
    EXPECT_NEAR(evenFused.us, pair.us, 0.02 * pair.us);
    EXPECT_NE(fusedCublas.path, GemmPath::Device);
    EXPECT_NEAR(fusedCublas.us, pairCublas.us, 0.02 * pairCublas.us);
  }
}

//===----------------------------------------------------------------------===//
// grouped_gemm_glu
//===----------------------------------------------------------------------===//

/// A one-rank SwiGLU inference layer (test::swigluInferencePlan), as
/// written (grouped_gemm w1, grouped_gemm w3, glu) or with those fused into
/// one grouped_gemm_glu.
Plan swigluPlan(int64_t T, int64_t d, int64_t h, int64_t E, int64_t k,
                bool fused, DispatchLayout layout = DispatchLayout::Ragged,
                CapacityMode mode = CapacityMode::Dropless,
                bool gathered = false) {
  LayerConfig layer;
  layer.tokens = T;
  layer.modelDim = d;
  layer.hiddenDim = h;
  layer.experts = E;
  layer.topK = k;
  layer.capacityMode = mode;
  layer.expertKind = ExpertKind::Gated;
  layer.dtype = DType::BF16;
  nlohmann::ordered_json doc = nlohmann::ordered_json::parse(
      test::swigluInferencePlan(layer, layout, gathered));
  if (fused) {
    EXPECT_EQ(test::fuseGluSteps(doc, /*keepProducts=*/false), 1);
  }
  Plan plan;
  Status status = parsePlan(doc.dump(), plan);
  EXPECT_TRUE(status.isOk()) << status.message();
  return plan;
}

/// The predicted time (us) of the first layer of the experts: the fused
/// step, or the two GEMMs before the glu and the glu.
struct FirstLayer {
  double us = 0;
  std::vector<GemmPath> paths;
};
FirstLayer firstLayerOf(const Plan &plan, const Prediction &p) {
  FirstLayer first;
  for (const StepPrediction &step : p.steps) {
    const Step &s = plan.variants[p.variant].forward[step.index];
    const bool firstGemm = step.op == StepOp::GroupedGemm &&
                           plan.getBuffer(s.in(OperandRole::B)).name != "w2";
    if (step.op == StepOp::GroupedGemmGlu || step.op == StepOp::Glu ||
        firstGemm) {
      first.us += step.us;
      if (step.op != StepOp::Glu)
        first.paths.push_back(step.gemmPath);
    }
  }
  return first;
}

/// The built-in CUDA profile's predictions of a layer with and without the
/// fused step, under `impl`.
std::pair<FirstLayer, FirstLayer>
firstLayers(const Plan &unfused, const Plan &fused, GroupedGemmImpl impl) {
  CostModelOptions options;
  options.groupedGemm = impl;
  const CostModel model(defaultProfile("cuda", 1), options);
  return {firstLayerOf(unfused, model.predict(unfused, 0, false, -1)),
          firstLayerOf(fused, model.predict(fused, 0, false, -1))};
}

// The work of the fused step is two products'.
TEST(CostModel, GluFusedStepCountsTwoProducts) {
  const Plan unfused = swigluPlan(64, 32, 48, 4, 2, false);
  const Plan fused = swigluPlan(64, 32, 48, 4, 2, true);
  const Step &gemm = unfused.variants[0].forward[3];
  const Step &glu = fused.variants[0].forward[3];
  ASSERT_EQ(gemm.op, StepOp::GroupedGemm);
  ASSERT_EQ(glu.op, StepOp::GroupedGemmGlu);
  EXPECT_EQ(getStepWork(fused, glu, 100).flops, 2.0 * 2 * 100 * 32 * 48);
  EXPECT_EQ(getStepWork(fused, glu, 100).flops,
            2.0 * getStepWork(unfused, gemm, 100).flops);
}

// Decode (T 256, d 2048, h 1408, E 64, k 6, bf16 ragged): 24 rows per
// expert. The fused step is one device GEMM of 2N columns: it reads the
// rows once and pays one launch, where the triple pays two GEMM launches
// and a glu pass.
TEST(CostModel, GluFusedStepIsCheaperAtDecode) {
  const Plan unfused = swigluPlan(256, 2048, 1408, 64, 6, false);
  const Plan fused = swigluPlan(256, 2048, 1408, 64, 6, true);
  for (GroupedGemmImpl impl :
       {GroupedGemmImpl::Auto, GroupedGemmImpl::Device}) {
    auto [triple, one] = firstLayers(unfused, fused, impl);
    std::printf("decode %s: grouped_gemm x2 + glu %.1f us, grouped_gemm_glu "
                "%.1f us\n",
                impl == GroupedGemmImpl::Auto ? "auto" : "device", triple.us,
                one.us);
    EXPECT_THAT(one.paths, ::testing::ElementsAre(GemmPath::Device));
    EXPECT_LT(one.us, triple.us);
  }
}

// Large (T 16384, d 4096, h 14336, E 8, k 2): 4096 rows per expert, where
// grouped_gemm=auto leaves the device kernel for cuBLAS's. The fused step
// still takes the device kernel (the only one that fuses): the unfused
// triple is the cheaper.
TEST(CostModel, GluFusedStepLosesToCublasWhereItsKernelIsSlower) {
  const Plan unfused = swigluPlan(16384, 4096, 14336, 8, 2, false);
  const Plan fused = swigluPlan(16384, 4096, 14336, 8, 2, true);
  auto [triple, one] = firstLayers(unfused, fused, GroupedGemmImpl::Auto);
  std::printf("large auto: grouped_gemm x2 + glu %.1f us, grouped_gemm_glu "
              "%.1f us\n",
              triple.us, one.us);
  EXPECT_THAT(triple.paths, ::testing::Each(GemmPath::PerExpert));
  EXPECT_THAT(one.paths, ::testing::ElementsAre(GemmPath::Device));
  EXPECT_LT(triple.us, one.us);
}

// grouped_gemm=cublas (or a shape the kernel does not take): the fused
// step runs two GEMMs on grouped_gemm's path (a gathered one's rows copied
// for each) and the glu's pass, so it costs what the triple costs, but for
// the few hundred bytes of expert offsets and rows the glu step also reads.
TEST(CostModel, GluFusedStepOffTheDeviceKernelCostsTwoGemmsAndAGlu) {
  struct Shape {
    int64_t T, d, h, E, k;
    bool gathered;
  };
  for (Shape s : {Shape{256, 2048, 1408, 64, 6, false},
                  Shape{256, 2048, 1408, 64, 6, true},
                  Shape{16384, 4096, 14336, 8, 2, false},
                  Shape{64, 36, 44, 4, 2, false}}) {
    SCOPED_TRACE("d " + std::to_string(s.d) + (s.gathered ? " gathered" : ""));
    const Plan unfused =
        swigluPlan(s.T, s.d, s.h, s.E, s.k, false, DispatchLayout::Ragged,
                   CapacityMode::Dropless, s.gathered);
    const Plan fused =
        swigluPlan(s.T, s.d, s.h, s.E, s.k, true, DispatchLayout::Ragged,
                   CapacityMode::Dropless, s.gathered);
    // d 36 and h 44 are not multiples of 8: never the device kernel.
    const bool fits = s.d % 8 == 0;
    for (GroupedGemmImpl impl :
         {GroupedGemmImpl::Cublas, GroupedGemmImpl::Auto}) {
      if (fits && impl != GroupedGemmImpl::Cublas)
        continue;
      auto [triple, one] = firstLayers(unfused, fused, impl);
      std::printf("d %lld%s %s: grouped_gemm x2 + glu %.1f us, "
                  "grouped_gemm_glu %.1f us\n",
                  static_cast<long long>(s.d), s.gathered ? " gathered" : "",
                  impl == GroupedGemmImpl::Auto ? "auto" : "cublas", triple.us,
                  one.us);
      EXPECT_THAT(one.paths, ::testing::ElementsAre(GemmPath::PerExpert));
      EXPECT_NEAR(one.us, triple.us, 1e-5 * triple.us);
    }
  }
}

// A static row space (a fixed capacity, padded): the triple's GEMMs are
// one batched cuBLAS call each whatever grouped_gemm says; the fused step
// takes the device kernel under auto (the only engine that fuses) and the
// batched calls under cublas.
TEST(CostModel, GluFusedStepOnAStaticRowSpace) {
  const Plan unfused = swigluPlan(256, 2048, 1408, 64, 6, false,
                                  DispatchLayout::Padded, CapacityMode::Fixed);
  const Plan fused = swigluPlan(256, 2048, 1408, 64, 6, true,
                                DispatchLayout::Padded, CapacityMode::Fixed);
  auto [triple, one] = firstLayers(unfused, fused, GroupedGemmImpl::Auto);
  std::printf("decode fixed padded auto: grouped_gemm x2 + glu %.1f us, "
              "grouped_gemm_glu %.1f us\n",
              triple.us, one.us);
  EXPECT_THAT(triple.paths, ::testing::Each(GemmPath::Batched));
  EXPECT_THAT(one.paths, ::testing::ElementsAre(GemmPath::Device));
  auto [tripleCublas, oneCublas] =
      firstLayers(unfused, fused, GroupedGemmImpl::Cublas);
  EXPECT_THAT(oneCublas.paths, ::testing::ElementsAre(GemmPath::Batched));
  EXPECT_NEAR(oneCublas.us, tripleCublas.us, 1e-5 * tripleCublas.us);
}

// With the wgmma kernel the backend runs few-rows GEMMs on its 128-row
// tiles too (DeviceGroupedGemm.cu's deviceGroupedGemmAutoTiles), so the
// model pads each touched expert's rows to 128, not the mma.sync kernel's
// 32: at equal rates and FLOP-bound (rates of 1 GFLOP/s), 4x the time past
// the launch (the decode plan: 64 tokens x 4 choices over 16 experts).
TEST(CostModel, FewRowsGemmsTakeTheWgmmaTilesWithIt) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                               "/decode_ffn_bias_bf16_combine.json",
                           plan)
                  .isOk());
  DeviceProfile slow = defaultProfile("cuda", 1);
  ASSERT_TRUE(slow.deviceGemm.has_value());
  slow.deviceGemm->smallFlopsPerSecond = 1e9;
  slow.deviceGemm->wgmmaFlopsPerSecond = 1e9;
  const double launchUs = slow.deviceGemm->launchSeconds * 1e6;
  auto gemms = [&](bool wgmma) {
    CostModelOptions options;
    options.wgmmaGemm = wgmma;
    return stepsOf(CostModel(slow, options).predict(plan, 0, false, -1),
                   StepOp::GroupedGemm);
  };
  const std::vector<StepPrediction> small = gemms(false), wide = gemms(true);
  ASSERT_EQ(small.size(), 2u);
  ASSERT_EQ(wide.size(), small.size());
  for (size_t i = 0; i < small.size(); ++i) {
    EXPECT_EQ(small[i].gemmPath, GemmPath::Device);
    EXPECT_EQ(wide[i].gemmPath, GemmPath::Device);
    EXPECT_NEAR((wide[i].us - launchUs) / (small[i].us - launchUs), 4.0, 0.04);
  }
}

TEST(CostModel, DynamicGemmsArePricedOnTheRuntimesPath) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                               "/small_swiglu_bf16_train.json",
                           plan)
                  .isOk());
  auto model = [&](GroupedGemmImpl impl, const char *backend = "cuda") {
    CostModelOptions options;
    options.groupedGemm = impl;
    return CostModel(parsed(decodeProfile(backend)), options);
  };
  // 250 declared rows per expert, aligned bf16: the device kernel under
  // device; under auto the weight gradients only (<= 256), the forward and
  // input gradients (> 40) the host path.
  for (GroupedGemmImpl impl :
       {GroupedGemmImpl::Auto, GroupedGemmImpl::Device}) {
    Prediction p = model(impl).predict(plan, 0, false, 25);
    std::vector<StepPrediction> gemms = stepsOf(p, StepOp::GroupedGemm);
    ASSERT_EQ(gemms.size(), 3u);
    const bool device = impl == GroupedGemmImpl::Device;
    for (const StepPrediction &step : gemms) {
      EXPECT_EQ(step.rows, 200);
      EXPECT_EQ(step.gemmPath, device ? GemmPath::Device : GemmPath::PerExpert);
      EXPECT_NEAR(step.us, device ? 110.0 : 100.0, 1e-6);
    }
    Prediction back = model(impl).predict(plan, 0, true, 25);
    std::vector<StepPrediction> wgrads =
        stepsOf(back, StepOp::GroupedGemmWgrad);
    ASSERT_EQ(wgrads.size(), 3u);
    for (const StepPrediction &step : wgrads) {
      EXPECT_EQ(step.gemmPath, GemmPath::Device);
      EXPECT_NEAR(step.us, 60.0, 1e-6);
    }
  }
  // With the wgmma kernel (Hopper: CostModelOptions::wgmmaGemm) auto takes
  // the device kernel for the forward and input gradients up to 2048 rows
  // per expert (here 250), at the wgmma rate (here twice the large tile's: the
  // FLOPs' 100 us become 50, above the bytes' time); the weight gradient keeps
  // its path and price.
  {
    DeviceProfile hopper = parsed(decodeProfile());
    hopper.deviceGemm->wgmmaFlopsPerSecond =
        2 * hopper.deviceGemm->largeFlopsPerSecond;
    CostModelOptions options;
    options.wgmmaGemm = true;
    CostModel withWgmma(hopper, options);
    std::vector<StepPrediction> gemms =
        stepsOf(withWgmma.predict(plan, 0, false, 25), StepOp::GroupedGemm);
    ASSERT_EQ(gemms.size(), 3u);
    for (const StepPrediction &step : gemms) {
      EXPECT_EQ(step.gemmPath, GemmPath::Device);
      EXPECT_NEAR(step.us, 10.0 + 50.0, 1e-6);
    }
    for (const StepPrediction &step :
         stepsOf(withWgmma.predict(plan, 0, true, 25),
                 StepOp::GroupedGemmWgrad)) {
      EXPECT_EQ(step.gemmPath, GemmPath::Device);
      EXPECT_NEAR(step.us, 60.0, 1e-6);
    }
  }
  // The weight gradient's tiles (8 experts x 2 x 6 tiles of 128 x 128 over
  // [256, 704]) at 1 us each outlast its FLOPs and bytes (50 us): 96 us.
  DeviceProfile tileBound = parsed(decodeProfile());
  tileBound.deviceGemm->wgradTileSeconds = 1e-6;
  for (const StepPrediction &step :
       stepsOf(CostModel(tileBound).predict(plan, 0, true, 25),
               StepOp::GroupedGemmWgrad))
    EXPECT_NEAR(step.us, 10.0 + 96.0, 1e-6);
  // cublas: the counts read back and a GEMM per expert, no faster than the
  // table's 32 rows per group.
  Prediction cublas =
      model(GroupedGemmImpl::Cublas).predict(plan, 0, false, 25);
  for (const StepPrediction &step : stepsOf(cublas, StepOp::GroupedGemm)) {
    EXPECT_EQ(step.gemmPath, GemmPath::PerExpert);
    EXPECT_NEAR(step.us, 100.0, 1e-6);
  }
  // The other steps do not change with the path.
  Prediction device =
      model(GroupedGemmImpl::Device).predict(plan, 0, false, 25);
  EXPECT_NEAR(device.totalUs - cublas.totalUs, 3 * 10.0, 1e-6);
  // The CPU backend has no device kernel and launches nothing per expert:
  // the table's ragged rate for the FLOPs, 2 x 200 x 256 x 704 = 72.09e6
  // at 0.92274688e12 = 78.125 us.
  Prediction cpu =
      model(GroupedGemmImpl::Device, "cpu").predict(plan, 0, false, 25);
  for (const StepPrediction &step : stepsOf(cpu, StepOp::GroupedGemm)) {
    EXPECT_EQ(step.gemmPath, GemmPath::PerExpert);
    EXPECT_NEAR(step.us, 78.125, 1e-6);
  }
  // A device without the kernel: per expert whatever the option.
  DeviceProfile without = parsed(decodeProfile());
  without.deviceGemm->available = false;
  CostModelOptions always;
  always.groupedGemm = GroupedGemmImpl::Device;
  for (const StepPrediction &step :
       stepsOf(CostModel(without, always).predict(plan, 0, false, 25),
               StepOp::GroupedGemm))
    EXPECT_EQ(step.gemmPath, GemmPath::PerExpert);
  // A fitted grouped_gemm kind (its cuBLAS paths) does not touch the device
  // kernel's price.
  DeviceProfile fitted = parsed(decodeProfile());
  fitted.steps.push_back({"grouped_gemm", 5e-6, 0, 2.0, 10});
  CostModelOptions onDevice;
  onDevice.groupedGemm = GroupedGemmImpl::Device;
  Prediction f = CostModel(fitted, onDevice).predict(plan, 0, false, 25);
  for (const StepPrediction &step : stepsOf(f, StepOp::GroupedGemm))
    EXPECT_NEAR(step.us, 110.0, 1e-6);
  CostModelOptions viaCublas;
  viaCublas.groupedGemm = GroupedGemmImpl::Cublas;
  Prediction fc = CostModel(fitted, viaCublas).predict(plan, 0, false, 25);
  for (const StepPrediction &step : stepsOf(fc, StepOp::GroupedGemm))
    EXPECT_NEAR(step.us, 5.0 + 2.0 * 100.0, 1e-6);
}

TEST(CostModel, StaticCapacityGemmsStayOneBatchedCall) {
  // A fixed capacity known on the host: one strided-batched GEMM whatever
  // grouped_gemm says, priced as before from the table's padded points.
  Plan plan = loadPlan("ffn_fixed_train.json");
  const DeviceProfile profile = defaultProfile("cuda", 1);
  std::vector<double> totals;
  for (GroupedGemmImpl impl : {GroupedGemmImpl::Auto, GroupedGemmImpl::Device,
                               GroupedGemmImpl::Cublas}) {
    CostModelOptions options;
    options.groupedGemm = impl;
    Prediction p = CostModel(profile, options).predict(plan, 0, false, -1);
    for (const StepPrediction &step : stepsOf(p, StepOp::GroupedGemm))
      EXPECT_EQ(step.gemmPath, GemmPath::Batched);
    totals.push_back(p.totalUs);
  }
  EXPECT_EQ(totals[0], totals[1]);
  EXPECT_EQ(totals[0], totals[2]);
  // The hand-computed golden figures of the tests above are unchanged: a
  // GEMM of all 16 rows, 2 x 16 x 4 x 6 FLOPs on the built-in table.
  const Step &fc1 = plan.variants[0].forward[3];
  ASSERT_EQ(fc1.op, StepOp::GroupedGemm);
  CostModel model(profile);
  const StepBasis basis = model.stepBasis(plan, fc1, 16);
  EXPECT_EQ(basis.gemmPath, GemmPath::Batched);
  EXPECT_EQ(basis.gemmSeconds,
            basis.flops /
                profile.gemmFlopsPerSecond(4, 4, 6, 4, DType::F32, false));
}

TEST(GroupedGemmRule, DeviceKernelWhereTheRuntimeTakesIt) {
  // auto: up to 40 rows per expert for the forward and input gradient,
  // 256 for the weight gradient, or while a graph records.
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 40 * 64, 64, false));
  EXPECT_FALSE(
      prefersDeviceGemm(GroupedGemmImpl::Auto, 40 * 64 + 1, 64, false));
  EXPECT_TRUE(
      prefersDeviceGemm(GroupedGemmImpl::Auto, 256 * 64, 64, false, true));
  EXPECT_FALSE(
      prefersDeviceGemm(GroupedGemmImpl::Auto, 256 * 64 + 1, 64, false, true));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 98304, 64, true, true));
  // With the wgmma kernel: the forward and input gradient up to 2048 rows
  // per expert, the weight gradient as before; cublas still never.
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 2048 * 64, 64, false,
                                false, true));
  EXPECT_FALSE(prefersDeviceGemm(GroupedGemmImpl::Auto, 2048 * 64 + 1, 64,
                                 false, false, true));
  // A gathered A up to 512 (its rows are copied first above it), or while
  // a graph records.
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 512 * 64, 64, false,
                                false, true, true));
  EXPECT_FALSE(prefersDeviceGemm(GroupedGemmImpl::Auto, 512 * 64 + 1, 64, false,
                                 false, true, true));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 1536 * 64, 64, true,
                                false, true, true));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Device, 1536 * 64, 64, false,
                                false, true, true));
  EXPECT_FALSE(prefersDeviceGemm(GroupedGemmImpl::Auto, 256 * 64 + 1, 64,
                                 false, true, true));
  EXPECT_FALSE(
      prefersDeviceGemm(GroupedGemmImpl::Cublas, 192, 64, false, false, true));
  // The host path's grouped call: no expert above 1024 rows.
  EXPECT_TRUE(groupedCublasTakes(1024));
  EXPECT_FALSE(groupedCublasTakes(1025));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 98304, 64, true));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Device, 98304, 64, false));
  EXPECT_FALSE(prefersDeviceGemm(GroupedGemmImpl::Cublas, 192, 64, true));
  EXPECT_TRUE(deviceGemmShapeFits(DType::BF16, 2048, 1408));
  EXPECT_TRUE(deviceGemmShapeFits(DType::F16, 8, 8));
  EXPECT_FALSE(deviceGemmShapeFits(DType::F32, 2048, 1408));
  EXPECT_FALSE(deviceGemmShapeFits(DType::BF16, 12, 8));
  // The small tile up to 32 rows per expert (Run 20: 149 vs 233 us at 24,
  // 266 vs 241 at 48).
  EXPECT_EQ(deviceGemmTile(32 * 64, 64), DeviceGemmTile::Small);
  EXPECT_EQ(deviceGemmTile(48 * 64, 64), DeviceGemmTile::Large);
  EXPECT_EQ(deviceGemmTileRows(DeviceGemmTile::Small), 32);
  EXPECT_EQ(deviceGemmTileRows(DeviceGemmTile::Large), 128);
}

TEST(GroupedGemmRule, FusedBackwardsInTheStoreUpTo512RowsPerExpert) {
  // The rows weighed: E x C where the capacity is known on the host (a
  // fixed capacity, a pipelined chunk's n), else the declared rows.
  EXPECT_EQ(fusedBackwardRows(300, 4, 99999), 1200);
  EXPECT_EQ(fusedBackwardRows(0, 4, 99999), 0);
  EXPECT_EQ(fusedBackwardRows(-1, 4, 2400), 2400);
  // Up to 512 per expert eagerly; any while a dynamic space records.
  EXPECT_TRUE(autoFusesBackwardInStore(512 * 64, 64, false));
  EXPECT_FALSE(autoFusesBackwardInStore(512 * 64 + 1, 64, false));
  EXPECT_TRUE(autoFusesBackwardInStore(98304, 64, true));
  // Below the wgmma kernel's forward bound: a fused step off the store
  // between the two runs its GEMM on the device kernel, and the pass.
  EXPECT_FALSE(autoFusesBackwardInStore(600 * 64, 64, false));
  EXPECT_TRUE(prefersDeviceGemm(GroupedGemmImpl::Auto, 600 * 64, 64, false,
                                false, true));
  EXPECT_LE(kWgmmaFusedBackwardRowsPerExpert, kWgmmaForwardRowsPerExpert);
}

TEST(GroupedGemmRule, UniformBlocksBatchWhenTheyHoldTheirRows) {
  // At most 1.5 rows computed per row held.
  EXPECT_TRUE(batchesUniformBlocks(4, 64, 243));    // 256 for 243
  EXPECT_TRUE(batchesUniformBlocks(64, 150, 6400)); // 9600 for 6400
  EXPECT_FALSE(batchesUniformBlocks(3, 256, 406));  // 768 for 406
  EXPECT_FALSE(batchesUniformBlocks(4, 32, 48));
  EXPECT_FALSE(batchesUniformBlocks(4, 64, 0)); // nothing held
  EXPECT_FALSE(batchesUniformBlocks(0, 64, 10));
  EXPECT_FALSE(batchesUniformBlocks(4, 0, 10));
}

/// A dynamic padded layout's forward GEMMs on CUDA: one batched GEMM over
/// the E * C block rows where the blocks hold enough rows, a GEMM per expert
/// otherwise; the CPU backend always per expert (gated_bounded_infer: T 12,
/// E 3, top-1, f32, so not the device kernel).
TEST(CostModel, BalancedPaddedBlocksArePricedAsOneBatchedGemm) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_PLANS_DIR) +
                               "/gated_bounded_infer.json",
                           plan)
                  .isOk());
  CostModel cuda(parsed(decodeProfile()));
  // C 4: 12 block rows for the 12 kept rows.
  std::vector<StepPrediction> balanced =
      stepsOf(cuda.predict(plan, 0, false, 4), StepOp::GroupedGemm);
  ASSERT_EQ(balanced.size(), 3u);
  for (const StepPrediction &step : balanced) {
    EXPECT_TRUE(step.batchedBlocks);
    EXPECT_EQ(step.gemmPath, GemmPath::Batched);
    EXPECT_EQ(step.rows, 12);
  }
  // C 9: 27 block rows for at most 12 kept rows.
  for (const StepPrediction &step :
       stepsOf(cuda.predict(plan, 0, false, 9), StepOp::GroupedGemm)) {
    EXPECT_FALSE(step.batchedBlocks);
    EXPECT_EQ(step.gemmPath, GemmPath::PerExpert);
    EXPECT_EQ(step.rows, 12);
  }
  CostModel cpu(parsed(decodeProfile("cpu")));
  for (const StepPrediction &step :
       stepsOf(cpu.predict(plan, 0, false, 4), StepOp::GroupedGemm))
    EXPECT_FALSE(step.batchedBlocks);
  // In bf16 (k = n = 8) the 18 rows go to the device-sized kernel, which
  // the backend takes before reading the counts: priced on the 12 kept
  // rows, not C 5's 15 block rows; under cublas they batch.
  Plan bf16 = plan;
  bf16.layer.dtype = DType::BF16;
  for (WorkspaceBuffer &buffer : bf16.workspace.buffers)
    if (buffer.dtype == DType::F32)
      buffer.dtype = DType::BF16;
  for (const StepPrediction &step :
       stepsOf(cuda.predict(bf16, 0, false, 5), StepOp::GroupedGemm)) {
    EXPECT_FALSE(step.batchedBlocks);
    EXPECT_EQ(step.gemmPath, GemmPath::Device);
    EXPECT_EQ(step.rows, 12);
  }
  CostModelOptions viaCublas;
  viaCublas.groupedGemm = GroupedGemmImpl::Cublas;
  for (const StepPrediction &step :
       stepsOf(CostModel(parsed(decodeProfile()), viaCublas)
                   .predict(bf16, 0, false, 5),
               StepOp::GroupedGemm)) {
    EXPECT_TRUE(step.batchedBlocks);
    EXPECT_EQ(step.gemmPath, GemmPath::Batched);
    EXPECT_EQ(step.rows, 15);
  }
}

/// A pipelined chunk's dynamic segments (uniform_segments: every row of
/// each block held, from the chunk's first row) batch on CUDA whatever the
/// capacity, at the chunk's own rows; the data-parallel variant's gate
/// routing on several ranks stays per expert in the model.
TEST(CostModel, ChunkSegmentsArePricedAsOneBatchedGemm) {
  Plan plan;
  ASSERT_TRUE(loadPlanFile(std::string(FLEX_TEST_PLANS_DIR) +
                               "/mr_ffn_dropless_w4_train.json",
                           plan)
                  .isOk());
  CostModel cuda(defaultProfile("cuda", 4)), cpu(defaultProfile("cpu", 4));
  for (int64_t variant = 0; variant < 2; ++variant) { // ep1, ep2
    SCOPED_TRACE(plan.variants[variant].name);
    std::vector<StepPrediction> gemms =
        stepsOf(cuda.predict(plan, variant, false, 40), StepOp::GroupedGemm);
    std::vector<StepPrediction> perGroup =
        stepsOf(cpu.predict(plan, variant, false, 40), StepOp::GroupedGemm);
    ASSERT_FALSE(gemms.empty());
    ASSERT_EQ(gemms.size(), perGroup.size());
    for (size_t i = 0; i < gemms.size(); ++i) {
      EXPECT_TRUE(gemms[i].batchedBlocks);
      EXPECT_EQ(gemms[i].gemmPath, GemmPath::Batched);
      // The chunk's own rows, as without batching (the CPU's per group).
      EXPECT_FALSE(perGroup[i].batchedBlocks);
      EXPECT_EQ(gemms[i].rows, perGroup[i].rows);
      EXPECT_GT(gemms[i].rows, 0);
    }
  }
  // dp: the gate's own padded routing on 4 ranks is left per expert.
  for (const StepPrediction &step :
       stepsOf(cuda.predict(plan, 2, false, 40), StepOp::GroupedGemm))
    EXPECT_FALSE(step.batchedBlocks);
}

TEST(DeviceProfile, DeviceGemmFiguresRoundTripAndDefault) {
  // Written and read back; a profile without the object (every older file)
  // gets the H100 defaults; keys are checked.
  DeviceProfile profile = parsed(decodeProfile());
  ASSERT_TRUE(profile.deviceGemm.has_value());
  EXPECT_EQ(profile.deviceGemm->largeFlopsPerSecond, 3.69098752e12);
  DeviceProfile back = parsed(writeProfile(profile));
  EXPECT_EQ(writeProfile(back), writeProfile(profile));
  ASSERT_TRUE(back.deviceGemm.has_value());
  EXPECT_EQ(back.deviceGemm->launchSeconds, 1e-5);
  EXPECT_EQ(back.deviceGemm->wgradTileSeconds, 20e-9); // absent: the default
  std::string tiles = decodeProfile();
  tiles.replace(tiles.find("\"launch_s\": 1e-5"), 16,
                "\"launch_s\": 1e-5, \"wgrad_tile_s\": 2.5e-7");
  EXPECT_EQ(parsed(tiles).deviceGemm->wgradTileSeconds, 2.5e-7);
  EXPECT_EQ(back.deviceGemm->storeCombineSlowdown, 4.8); // absent: default
  std::string store = decodeProfile();
  store.replace(store.find("\"launch_s\": 1e-5"), 16,
                "\"launch_s\": 1e-5, \"store_combine_slowdown\": 2.5");
  EXPECT_EQ(parsed(store).deviceGemm->storeCombineSlowdown, 2.5);
  store.replace(store.find("2.5"), 3, "0");
  EXPECT_THAT(parseProfile(store, profile).message(),
              HasSubstr("'device_gemm.store_combine_slowdown'"));
  DeviceProfile old = parsed(goldenProfile());
  EXPECT_FALSE(old.deviceGemm.has_value());
  EXPECT_EQ(old.deviceGemmFigures().largeFlopsPerSecond, 220e12);
  EXPECT_EQ(old.deviceGemmFigures().smallFlopsPerSecond, 98e12);
  EXPECT_EQ(writeProfile(old).find("device_gemm"), std::string::npos);
  EXPECT_TRUE(defaultProfile("cuda", 1).deviceGemm.has_value());
  EXPECT_FALSE(defaultProfile("cpu", 1).deviceGemm.has_value());
  std::string bad = decodeProfile();
  bad.replace(bad.find("\"launch_s\": 1e-5"), 16, "\"launch\": 1e-5");
  EXPECT_THAT(parseProfile(bad, profile).message(),
              HasSubstr("'device_gemm.launch'"));
  bad = decodeProfile();
  bad.replace(bad.find("\"weight_read_efficiency\": 1.0"), 29,
              "\"weight_read_efficiency\": 0");
  EXPECT_THAT(parseProfile(bad, profile).message(),
              HasSubstr("'device_gemm.weight_read_efficiency'"));
}

TEST(DeviceProfile, JsonRoundTrip) {
  DeviceProfile profile = defaultProfile("cuda", 4);
  profile.builtin = false;
  profile.deviceName = "NVIDIA H100 80GB HBM3";
  profile.driverVersion = "550.54";
  profile.cudaVersion = "12.4";
  profile.ncclVersion = "2.21.5";
  profile.created = "2026-12-06T00:00:00Z";
  profile.collectives[0].transport = "copy_engine";
  DeviceProfile back = parsed(writeProfile(profile));
  EXPECT_EQ(writeProfile(back), writeProfile(profile));
  EXPECT_EQ(back.deviceName, profile.deviceName);
  EXPECT_EQ(back.ncclVersion, "2.21.5");
  EXPECT_EQ(back.worldSize, 4);
  EXPECT_FALSE(back.builtin);
  ASSERT_EQ(back.gemm.size(), profile.gemm.size());
  EXPECT_EQ(back.gemm[1].flopsPerSecond, profile.gemm[1].flopsPerSecond);
  EXPECT_EQ(back.collectives[0].transport, "copy_engine");
}

TEST(DeviceProfile, GemmTableInterpolatesInLogSpace) {
  DeviceProfile profile;
  profile.gemm = {{10, 10, 10, DType::BF16, false, 1e9, 1},
                  {100, 100, 100, DType::BF16, false, 1e12, 1},
                  {10, 10, 10, DType::BF16, false, 5e9, 64}};
  // A measured shape is its point, the group count included.
  EXPECT_EQ(profile.gemmFlopsPerSecond(1, 10, 10, 10, DType::BF16, false), 1e9);
  EXPECT_EQ(profile.gemmFlopsPerSecond(64, 10, 10, 10, DType::BF16, false),
            5e9);
  // Elsewhere: inverse squared distances in log2 space weigh log(rate).
  // (m, n, k, groups) = (10, 100, 100, 1) is 2 l^2 from the first point,
  // l^2 from the second and 2 l^2 + 6^2 from the third (l = log2 10).
  const double l = std::log2(10.0);
  const double w1 = 1 / (2 * l * l), w2 = 1 / (l * l),
               w3 = 1 / (2 * l * l + 36.0);
  const double expected =
      std::exp((w1 * std::log(1e9) + w2 * std::log(1e12) + w3 * std::log(5e9)) /
               (w1 + w2 + w3));
  EXPECT_NEAR(profile.gemmFlopsPerSecond(1, 10, 100, 100, DType::BF16, false) /
                  expected,
              1.0, 1e-9);
  // f16 reads the bf16 points; no f32 point: any dtype still answers.
  EXPECT_EQ(profile.gemmFlopsPerSecond(1, 10, 10, 10, DType::F16, false), 1e9);
  EXPECT_GT(profile.gemmFlopsPerSecond(1, 100, 100, 100, DType::F32, false), 0);
}

TEST(CostModel, FittedStepKindsPriceTheirSteps) {
  // Samples drawn from known figures: a memory kind at 7 us + bytes / 2e11,
  // a GEMM kind at 3 us + 1.5x the table; the fit recovers them and the
  // model then prices a step of that kind with them.
  DeviceProfile profile = parsed(goldenProfile());
  std::vector<StepSample> samples;
  for (double bytes : {1e6, 4e6, 16e6, 64e6}) {
    StepBasis basis;
    basis.cost = StepCost::Memory;
    basis.bytes = bytes;
    samples.push_back({StepOp::Dispatch, basis, 7e-6 + bytes / 2e11});
  }
  for (double gemm : {1e-5, 1e-4, 1e-3}) {
    StepBasis basis;
    basis.cost = StepCost::ExpertGemm;
    basis.gemmSeconds = gemm;
    samples.push_back({StepOp::GroupedGemm, basis, 3e-6 + 1.5 * gemm});
  }
  fitStepCosts(samples, profile);
  const StepCostPoint *dispatch = profile.findStep("dispatch");
  const StepCostPoint *gemm = profile.findStep("grouped_gemm");
  ASSERT_NE(dispatch, nullptr);
  ASSERT_NE(gemm, nullptr);
  EXPECT_NEAR(dispatch->alphaSeconds, 7e-6, 1e-12);
  EXPECT_NEAR(dispatch->bytesPerSecond / 2e11, 1.0, 1e-9);
  EXPECT_EQ(dispatch->samples, 4);
  EXPECT_NEAR(gemm->alphaSeconds, 3e-6, 1e-12);
  EXPECT_NEAR(gemm->gemmScale, 1.5, 1e-9);
  EXPECT_EQ(profile.findStep("combine"), nullptr);

  Plan plan = loadPlan("ffn_fixed_train.json");
  const Step *step = nullptr;
  for (const Step &s : plan.variants[0].forward)
    if (s.op == StepOp::Dispatch)
      step = &s;
  ASSERT_NE(step, nullptr);
  CostModel model(profile);
  const StepBasis basis = model.stepBasis(plan, *step, -1);
  EXPECT_GT(basis.bytes, 0);
  EXPECT_NEAR(model.stepSeconds(plan, *step, -1), 7e-6 + basis.bytes / 2e11,
              1e-15);
  // The figures survive the JSON round trip.
  DeviceProfile back = parsed(writeProfile(profile));
  ASSERT_NE(back.findStep("grouped_gemm"), nullptr);
  EXPECT_EQ(back.findStep("grouped_gemm")->gemmScale, gemm->gemmScale);
  // An unknown step op in a profile is refused, naming the field.
  std::string text = writeProfile(profile);
  text.replace(text.find("\"grouped_gemm\""), 14, "\"no_such_step\"");
  DeviceProfile bad;
  Status status = parseProfile(text, bad);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("steps["));
  EXPECT_THAT(status.message(), HasSubstr("unknown step op 'no_such_step'"));
}

// grouped_gemm_combine's samples on the device kernel set the store's
// slowdown: time past the launch and the predicted GEMM over the combine
// step's price, the median of the samples (an outlier does not move it);
// samples off the device kernel do not.
TEST(CostModel, StoreCombineSlowdownIsFittedFromTheFusedSteps) {
  DeviceProfile profile = defaultProfile("cuda", 1);
  const double launch = profile.deviceGemmFigures().launchSeconds;
  std::vector<StepSample> samples;
  for (auto [gemm, combine, ratio] :
       {std::tuple{150e-6, 10e-6, 5.0}, std::tuple{300e-6, 12e-6, 4.0},
        std::tuple{40e-6, 3e-6, 30.0}}) {
    StepBasis basis;
    basis.cost = StepCost::ExpertGemm;
    basis.gemmPath = GemmPath::Device;
    basis.gemmSeconds = gemm;
    basis.combineSeconds = combine;
    samples.push_back(
        {StepOp::GroupedGemmCombine, basis, launch + gemm + ratio * combine});
  }
  StepBasis cublas;
  cublas.cost = StepCost::ExpertGemm;
  cublas.gemmPath = GemmPath::PerExpert;
  cublas.gemmSeconds = 1e-3;
  cublas.combineSeconds = 1e-5;
  samples.push_back({StepOp::GroupedGemmCombine, cublas, 5e-3});
  fitStepCosts(samples, profile);
  ASSERT_TRUE(profile.deviceGemm.has_value());
  EXPECT_NEAR(profile.deviceGemm->storeCombineSlowdown, 5.0, 1e-9);
  // The figure is written with the profile and read back.
  EXPECT_EQ(parsed(writeProfile(profile)).deviceGemm->storeCombineSlowdown,
            profile.deviceGemm->storeCombineSlowdown);
  // A GEMM predicted slower than it ran: the floor, not a negative cost.
  StepSample fast = samples[0];
  fast.seconds = launch;
  fitStepCosts({fast}, profile);
  EXPECT_EQ(profile.deviceGemm->storeCombineSlowdown, 0.1);
}

TEST(DeviceProfile, MalformedProfilesNameTheField) {
  DeviceProfile profile;
  Status status = parseProfile("{", profile);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("not valid JSON"));
  std::string text = goldenProfile();
  std::string bad = text;
  bad.replace(bad.find("2304e6"), 6, "-1");
  status = parseProfile(bad, profile);
  EXPECT_THAT(status.message(), HasSubstr("'gemm[0].flops_per_s'"));
  bad = text;
  bad.replace(bad.find("\"cuda\""), 6, "\"tpu\"");
  EXPECT_THAT(parseProfile(bad, profile).message(),
              HasSubstr("'device.backend'"));
  bad = text;
  bad.replace(bad.find("all_gather"), 10, "broadcast");
  EXPECT_THAT(parseProfile(bad, profile).message(),
              HasSubstr("'collectives[1].kind'"));
  bad = text;
  bad.replace(bad.find("\"exchange_slowdown\": 1"), 22,
              "\"exchange_slowdown\": 0.5");
  EXPECT_THAT(parseProfile(bad, profile).message(),
              HasSubstr("'overlap.exchange_slowdown'"));
  // Absent (older files): exchanges are not slowed.
  bad = text;
  bad.replace(bad.find(", \"exchange_slowdown\": 1"), 24, "");
  ASSERT_TRUE(parseProfile(bad, profile).isOk()) << bad;
  EXPECT_EQ(profile.exchangeSlowdown, 1.0);
  bad = text;
  bad.replace(bad.find("\"version\": 1"), 12, "\"version\": 9");
  EXPECT_THAT(parseProfile(bad, profile).message(), HasSubstr("'version'"));
}

TEST(DeviceProfile, MissingCorruptOrStaleFallsBackToTheBuiltin) {
  Status why;
  ProfileExpectation cpu{"cpu", "", 2};
  DeviceProfile profile =
      loadProfileOrDefault("/nonexistent/profile.json", cpu, why);
  EXPECT_EQ(why.code(), StatusCode::IOError);
  EXPECT_THAT(why.message(), HasSubstr("cannot read"));
  EXPECT_THAT(why.message(), HasSubstr("using the built-in cpu profile"));
  EXPECT_TRUE(profile.builtin);
  EXPECT_EQ(profile.backend, "cpu");
  EXPECT_EQ(profile.worldSize, 2);

  const std::string path = ::testing::TempDir() + "/flex_golden_profile.json";
  std::ofstream(path) << goldenProfile();
  // Measured on cuda, asked for cpu: stale.
  profile = loadProfileOrDefault(path, cpu, why);
  EXPECT_EQ(why.code(), StatusCode::FailedPrecondition);
  EXPECT_THAT(why.message(), HasSubstr("stale"));
  EXPECT_THAT(why.message(), HasSubstr("backend 'cuda'"));
  EXPECT_TRUE(profile.builtin);
  // Another world size: stale too.
  profile = loadProfileOrDefault(path, {"cuda", "", 4}, why);
  EXPECT_THAT(why.message(), HasSubstr("with 2 rank(s), this run has 4"));
  EXPECT_EQ(profile.backend, "cuda");
  // Another device.
  profile = loadProfileOrDefault(path, {"cuda", "NVIDIA H200", 2}, why);
  EXPECT_THAT(why.message(), HasSubstr("device 'golden'"));
  // The right one is used as it is.
  profile = loadProfileOrDefault(path, {"cuda", "golden", 2}, why);
  EXPECT_TRUE(why.isOk()) << why.message();
  EXPECT_FALSE(profile.builtin);
  EXPECT_EQ(profile.deviceName, "golden");

  std::ofstream(path) << "{\"format\": \"flex-device-profile\"";
  profile = loadProfileOrDefault(path, {"cuda", "", 2}, why);
  EXPECT_EQ(why.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(why.message(), HasSubstr(path));
  EXPECT_THAT(why.message(), HasSubstr("built-in cuda profile"));
  EXPECT_TRUE(profile.builtin);
  std::remove(path.c_str());
  // The built-in profile predicts every variant (and the choice is stable).
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  Choice choice = CostModel(profile).choose(plan, true, -1);
  EXPECT_GE(choice.variant, 0);
  for (double us : choice.totalUs)
    EXPECT_GT(us, 0);
  EXPECT_THAT(choice.reason, HasSubstr("built-in"));
}

TEST(Calibration, CpuQuickIsSaneAndFast) {
  auto begin = std::chrono::steady_clock::now();
  CalibrationOptions options;
  options.quick = true;
  DeviceProfile profile;
  Status status = calibrateCpu(options, nullptr, profile);
  ASSERT_TRUE(status.isOk()) << status.message();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
          .count();
  EXPECT_LT(seconds, 10.0);
  EXPECT_EQ(profile.backend, "cpu");
  EXPECT_FALSE(profile.builtin);
  EXPECT_FALSE(profile.deviceName.empty());
  EXPECT_EQ(profile.worldSize, 1);
  ASSERT_GE(profile.gemm.size(), 2u);
  for (const GemmPoint &point : profile.gemm) {
    EXPECT_GT(point.flopsPerSecond, 1e6);
    EXPECT_LT(point.flopsPerSecond, 1e14);
  }
  EXPECT_GT(profile.memoryBandwidth, 1e7);
  EXPECT_GT(profile.launchSeconds, 0);
  EXPECT_LT(profile.launchSeconds, 1e-2);
  EXPECT_TRUE(profile.collectives.empty());
  // What it wrote reads back, and predicts the plans.
  DeviceProfile back = parsed(writeProfile(profile));
  EXPECT_EQ(writeProfile(back), writeProfile(profile));
  Plan plan = loadPlan("ffn_fixed_train.json");
  EXPECT_GT(CostModel(back).predict(plan, 0, true, -1).totalUs, 0);
}

TEST(Calibration, CpuRanksAgreeOnOneProfile) {
  std::vector<std::shared_ptr<Communicator>> comms;
  ASSERT_TRUE(createLocalCommunicators(2, comms).isOk());
  std::vector<DeviceProfile> profiles(2);
  std::vector<Status> statuses(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      CalibrationOptions options;
      options.quick = true;
      options.deviceName = "test-cpu";
      statuses[r] = calibrateCpu(options, comms[r].get(), profiles[r]);
    });
  for (std::thread &thread : threads)
    thread.join();
  for (int r = 0; r < 2; ++r)
    ASSERT_TRUE(statuses[r].isOk()) << statuses[r].message();
  // Each figure is the slowest rank's: the same profile on both ranks.
  profiles[1].created = profiles[0].created;
  EXPECT_EQ(writeProfile(profiles[0]), writeProfile(profiles[1]));
  EXPECT_EQ(profiles[0].worldSize, 2);
  ASSERT_EQ(profiles[0].collectives.size(), 4u);
  for (const CollectivePoint &point : profiles[0].collectives) {
    EXPECT_EQ(point.transport, "local");
    EXPECT_GE(point.alphaSeconds, 0);
    EXPECT_GT(point.betaBytesPerSecond, 0);
  }
  Plan plan = loadPlan("mr_ffn_fixed_w2_train.json");
  Choice a = CostModel(profiles[0]).choose(plan, true, -1);
  Choice b = CostModel(profiles[1]).choose(plan, true, -1);
  EXPECT_EQ(a.variant, b.variant);
}

} // namespace
