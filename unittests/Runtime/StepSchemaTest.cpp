//===- StepSchemaTest.cpp - The step schema and backends' kernels ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// StepKinds.def is the one declaration of the steps: its names parse back,
// the loader's signatures come from it, the CPU backend has a kernel for
// every kind it declares, a kind a backend has no kernel for is refused by
// name, and the work figures a cost model reads follow the shapes.
//
//===----------------------------------------------------------------------===//

#include "MultiRankTestSupport.h"

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"
#include "flex/Runtime/StepSchema.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>

using namespace flex;
using flex::test::readTestPlan;
using ::testing::HasSubstr;

namespace {

TEST(StepSchema, NamesRoundTripAndKindsLineUpWithTheEnum) {
  std::set<std::string_view> names;
  for (int i = 0; i < kNumStepOps; ++i) {
    auto op = static_cast<StepOp>(i);
    const StepKindInfo &kind = getStepKind(op);
    EXPECT_EQ(kind.op, op);
    EXPECT_EQ(kind.name, toString(op));
    EXPECT_EQ(parseStepOp(kind.name), op);
    EXPECT_TRUE(names.insert(kind.name).second) << kind.name;
    EXPECT_EQ(isCollective(op), kind.has(kStepCollective)) << kind.name;
  }
  for (int i = 0; i < kNumOperandRoles; ++i) {
    auto role = static_cast<OperandRole>(i);
    EXPECT_EQ(parseOperandRole(toString(role)), role);
  }
  for (int i = 0; i < kNumStepAttrs; ++i) {
    auto attr = static_cast<StepAttr>(i);
    EXPECT_EQ(parseStepAttr(toString(attr)), attr);
  }
  EXPECT_FALSE(parseStepOp("scatter"));
  EXPECT_FALSE(parseStepAttr("epilog"));
}

TEST(StepSchema, SignaturesAreTheDeclaredOperands) {
  const StepSignature &gemm = getStepSignature(StepOp::GroupedGemm);
  const StepKindInfo &kind = getStepKind(StepOp::GroupedGemm);
  size_t required = 0, optional = 0;
  for (const OperandSpec &spec : kind.inputs)
    (spec.required ? required : optional) += 1;
  EXPECT_EQ(gemm.requiredInputs.size(), required);
  EXPECT_EQ(gemm.optionalInputs.size(), optional);
  EXPECT_THAT(gemm.optionalInputs, ::testing::Contains(OperandRole::Bias));
  EXPECT_TRUE(kind.takesAttr(StepAttr::Epilogue));
  EXPECT_FALSE(kind.takesAttr(StepAttr::TopK));
  EXPECT_EQ(kind.cost, StepCost::ExpertGemm);
}

TEST(StepKernels, TheCpuBackendRunsEveryDeclaredKind) {
  std::unique_ptr<Backend> cpu = createCpuBackend();
  for (int i = 0; i < kNumStepOps; ++i)
    EXPECT_TRUE(cpu->implements(static_cast<StepOp>(i)))
        << toString(static_cast<StepOp>(i));
}

/// A backend that has kernels for some kinds only, as a new step kind
/// leaves every backend until its kernel is written.
class PartialBackend final : public Backend {
public:
  PartialBackend() {
    setKernel(StepOp::Router,
              [this](const Plan &, const Step &, const StepOperands &) {
                ++routerCalls;
                return Status::ok();
              });
  }
  std::string_view name() const override { return "partial"; }
  int routerCalls = 0;
};

TEST(StepKernels, ADeclaredKindWithoutAKernelIsRefusedByName) {
  Plan plan;
  ASSERT_TRUE(parsePlan(readTestPlan("ffn_fixed_train.json"), plan).isOk());
  PartialBackend backend;
  const std::vector<Step> &forward = plan.variants[0].forward;
  ASSERT_EQ(forward[0].op, StepOp::Router);
  ASSERT_EQ(forward[1].op, StepOp::Gate);
  StepOperands none;
  EXPECT_TRUE(backend.runStep(plan, forward[0], none).isOk());
  EXPECT_EQ(backend.routerCalls, 1);
  EXPECT_FALSE(backend.implements(StepOp::Gate));
  Status refused = backend.runStep(plan, forward[1], none);
  EXPECT_EQ(refused.code(), StatusCode::Unavailable);
  EXPECT_THAT(refused.message(), HasSubstr("step 'gate'"));
  EXPECT_THAT(refused.message(), HasSubstr("partial backend"));
}

TEST(StepKernels, AnExecutorRefusesAPlanItsBackendCannotRun) {
  auto plan = std::make_shared<Plan>();
  ASSERT_TRUE(parsePlan(readTestPlan("ffn_fixed_train.json"), *plan).isOk());
  std::unique_ptr<Executor> executor;
  Status refused =
      Executor::create(plan, std::make_unique<PartialBackend>(), executor);
  EXPECT_EQ(refused.code(), StatusCode::Unavailable);
  EXPECT_THAT(refused.message(), HasSubstr("step 'gate'"));
  EXPECT_THAT(refused.message(), HasSubstr("forward[1]"));
  EXPECT_FALSE(executor);
  EXPECT_TRUE(Executor::create(plan, createCpuBackend(), executor).isOk());
}

TEST(StepWork, GemmFlopsAndBytesFollowTheShapes) {
  Plan plan;
  ASSERT_TRUE(parsePlan(readTestPlan("ffn_fixed_train.json"), plan).isOk());
  const Step *gemm = nullptr, *router = nullptr;
  for (const Step &step : plan.variants[0].forward) {
    if (step.op == StepOp::GroupedGemm && !gemm)
      gemm = &step;
    if (step.op == StepOp::Router)
      router = &step;
  }
  ASSERT_TRUE(gemm && router);
  const BufferDesc &a = plan.getBuffer(gemm->in(OperandRole::A));
  const BufferDesc &c = plan.getBuffer(gemm->out(OperandRole::C));
  const double K = static_cast<double>(a.shape[1]),
               N = static_cast<double>(c.shape[1]);
  StepWork whole = getStepWork(plan, *gemm);
  EXPECT_DOUBLE_EQ(whole.flops, 2.0 * static_cast<double>(a.shape[0]) * K * N);
  // With fewer valid rows (C known after the gate) the work shrinks.
  StepWork part = getStepWork(plan, *gemm, 3);
  EXPECT_DOUBLE_EQ(part.flops, 2.0 * 3 * K * N);
  EXPECT_LT(part.bytesRead, whole.bytesRead);
  EXPECT_GT(part.bytesRead, 0);
  const LayerConfig &l = plan.layer;
  EXPECT_DOUBLE_EQ(getStepWork(plan, *router).flops,
                   2.0 * l.tokens * l.modelDim * l.experts);
  EXPECT_EQ(getStepWork(plan, *router).bytesExchanged, 0);
}

TEST(StepWork, CollectivesCountTheBytesThatLeaveTheRank) {
  Plan plan;
  ASSERT_TRUE(
      parsePlan(readTestPlan("mr_ffn_fixed_w2_train.json"), plan).isOk());
  bool sawExchange = false;
  for (const Variant &variant : plan.variants)
    for (const Step &step : variant.forward)
      if (step.op == StepOp::AllToAll) {
        const BufferDesc &input = plan.getBuffer(step.in(OperandRole::Input));
        // W = 2: half of each chunk's rows go to the other rank.
        EXPECT_DOUBLE_EQ(getStepWork(plan, step).bytesExchanged,
                         static_cast<double>(input.numBytes()) /
                             static_cast<double>(step.attrs.chunks) / 2.0);
        sawExchange = true;
      }
  EXPECT_TRUE(sawExchange);
}

} // namespace
