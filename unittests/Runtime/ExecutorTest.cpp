//===- ExecutorTest.cpp - End-to-end tests of the executor ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs the hand-written plans through the executor and the CPU
// backend on fresh random inputs, with outputs poisoned first, and compares
// every output and gradient with the fp64 reference ([num-1]). It also tests
// the executor's rules: bindings, workspace, variants, backward after forward,
// inputs never written, the NaN check.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <set>

using namespace flex;
using flex::test::loadValue;
using flex::test::readTestPlan;
using flex::test::storeValue;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::shared_ptr<const Plan> loadPlan(const std::string &text) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(text, *plan);
  EXPECT_TRUE(status.isOk()) << status.message();
  return plan;
}

std::unique_ptr<Executor> makeExecutor(std::shared_ptr<const Plan> plan) {
  std::unique_ptr<Executor> executor;
  Status status = Executor::create(std::move(plan), createCpuBackend(),
                                   executor);
  EXPECT_TRUE(status.isOk()) << status.message();
  return executor;
}

/// Caller buffers for every argument of a plan.
struct Buffers {
  const Plan &plan;
  std::map<std::string, std::vector<uint8_t>> data;

  explicit Buffers(const Plan &plan) : plan(plan) {
    for (const Argument &arg : plan.arguments)
      data[arg.name].assign(arg.numBytes(), 0);
  }
  const Argument &arg(const std::string &name) const {
    return plan.arguments[plan.findArgument(name)];
  }
  void set(const std::string &name, const std::vector<double> &values) {
    if (plan.findArgument(name) < 0)
      return;
    ASSERT_EQ(static_cast<int64_t>(values.size()), arg(name).numElements())
        << name;
    for (size_t i = 0; i < values.size(); ++i)
      storeValue(data[name], arg(name).dtype, i, values[i]);
  }
  std::vector<double> get(const std::string &name) const {
    const Argument &a = arg(name);
    std::vector<double> values(a.numElements());
    for (int64_t i = 0; i < a.numElements(); ++i)
      values[i] = loadValue(data.at(name), a.dtype, i);
    return values;
  }
  /// The layer's inputs and parameters the plan has (x, wg, w1, b1, w2, b2,
  /// w3).
  void setInputs(const reference::LayerInputs &inputs) {
    set("x", inputs.x);
    set("wg", inputs.wg);
    set("w1", inputs.w1);
    set("b1", inputs.b1);
    set("w2", inputs.w2);
    set("b2", inputs.b2);
    set("w3", inputs.w3);
  }
  /// NaN in every output, so an element no step writes cannot pass.
  void poison(ArgumentRole role) {
    for (const Argument &a : plan.arguments)
      if (a.role == role)
        set(a.name, std::vector<double>(
                        a.numElements(),
                        std::numeric_limits<double>::quiet_NaN()));
  }
  std::vector<Binding> bindings() {
    std::vector<Binding> result;
    for (auto &[name, bytes] : data)
      result.push_back({arg(name).name, bytes.data(),
                        static_cast<int64_t>(bytes.size())});
    return result;
  }
};

/// Random inputs whose routing is not within fp32 rounding of a tie.
reference::LayerInputs makeInputs(const LayerConfig &config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (;;) {
    reference::LayerInputs inputs = reference::makeRandomInputs(config, rng);
    reference::LayerForward forward =
        reference::referenceForward(config, inputs);
    reference::RoutingMargins margins =
        reference::routingMargins(config, forward.routing);
    if (margins.logitGap > 1e-4 &&
        (!config.batchPrioritized || margins.priorityGap > 1e-4))
      return inputs;
  }
}

struct Tolerance {
  double value;
};

/// Runs variant `variant` of `plan` (forward, and backward when training)
/// and compares with the reference: on `reused` when given (its own
/// workspace as it stands), else on a new executor, whose own workspace
/// then holds exactly the variant's bytes.
void runAndCompare(std::shared_ptr<const Plan> plan, int64_t variant,
                   uint64_t seed, double tolerance,
                   Executor *reused = nullptr) {
  SCOPED_TRACE("variant " + plan->variants[variant].name + " seed " +
               std::to_string(seed));
  const LayerConfig &config = plan->layer;
  reference::LayerInputs inputs = makeInputs(config, seed);
  std::mt19937_64 rng(seed + 1000);
  std::normal_distribution<double> normal;
  std::vector<double> gradOut(config.tokens * config.modelDim);
  for (double &value : gradOut)
    value = normal(rng);
  gradOut = reference::roundTo(gradOut, config.dtype);
  double gradLAux = 0.5;

  Buffers buffers(*plan);
  buffers.setInputs(inputs);
  buffers.set("grad_out", gradOut);
  buffers.set("grad_l_aux", {gradLAux});
  buffers.poison(ArgumentRole::Output);
  buffers.poison(ArgumentRole::GradOutput);
  auto inputsBefore = buffers.data;

  std::unique_ptr<Executor> made = reused ? nullptr : makeExecutor(plan);
  Executor *executor = reused ? reused : made.get();
  ASSERT_TRUE(executor->selectVariant(variant).isOk());
  std::vector<Binding> bindings = buffers.bindings();
  Status status = executor->forward(bindings.data(), bindings.size());
  ASSERT_TRUE(status.isOk()) << status.message();
  EXPECT_EQ(executor->lastRunStats().steps.size(),
            plan->variants[variant].forward.size());
  if (!reused) {
    EXPECT_EQ(executor->ownedWorkspaceBytes(),
              plan->variantWorkspaceBytes(variant));
  }
  if (plan->training) {
    status = executor->backward(bindings.data(), bindings.size());
    ASSERT_TRUE(status.isOk()) << status.message();
  }

  // Inputs are never written.
  for (const Argument &arg : plan->arguments) {
    if (arg.role == ArgumentRole::Input || arg.role == ArgumentRole::GradInput) {
      EXPECT_EQ(buffers.data[arg.name], inputsBefore[arg.name]) << arg.name;
    }
  }

  reference::LayerForward forward;
  reference::LayerGradients grads;
  if (plan->training)
    grads = reference::referenceBackward(config, inputs, gradOut, gradLAux, {},
                                         &forward);
  else
    forward = reference::referenceForward(config, inputs);
  EXPECT_LE(reference::relativeL2(buffers.get("out"), forward.out), tolerance);
  EXPECT_LE(reference::relativeL2(buffers.get("l_aux"), {forward.lAux}),
            tolerance);
  if (!plan->training)
    return;
  std::pair<const char *, const std::vector<double> *> gradients[] = {
      {"grad_x", &grads.x},   {"grad_wg", &grads.wg}, {"grad_w1", &grads.w1},
      {"grad_b1", &grads.b1}, {"grad_w2", &grads.w2}, {"grad_b2", &grads.b2},
      {"grad_w3", &grads.w3}};
  for (auto [name, want] : gradients)
    if (plan->findArgument(name) >= 0) {
      EXPECT_LE(reference::relativeL2(buffers.get(name), *want), tolerance)
          << name;
    }
}

/// The dropless plan with bf16 tokens and weights (router in fp32):
/// arguments and the float intermediates of the experts become bf16.
std::string makeBf16Plan() {
  Json doc = Json::parse(readTestPlan("ffn_dropless_ragged_train.json"));
  doc["layer"]["dtype"] = "bf16";
  for (Json &arg : doc["arguments"]) {
    std::string name = arg["name"];
    if (name != "wg" && name != "grad_wg" && name != "l_aux" &&
        name != "grad_l_aux")
      arg["dtype"] = "bf16";
  }
  for (Json &buffer : doc["workspace"]["buffers"]) {
    std::string name = buffer["name"];
    for (const char *expertBuffer :
         {"disp", "hid_pre", "hid", "y", "grad_y", "grad_hid", "grad_hid_pre",
          "grad_disp"})
      if (name == expertBuffer)
        buffer["dtype"] = "bf16"; // reserved bytes stay (bytes >= needed)
  }
  return doc.dump();
}

} // namespace

TEST(Executor, HandWrittenPlansMatchTheReference) {
  for (const char *name : {"ffn_fixed_train.json",
                           "ffn_dropless_ragged_train.json",
                           "gated_bounded_infer.json",
                           "gated_fixed_train.json"}) {
    SCOPED_TRACE(name);
    std::shared_ptr<const Plan> plan = loadPlan(readTestPlan(name));
    for (size_t variant = 0; variant < plan->variants.size(); ++variant)
      for (uint64_t seed : {1, 2, 3})
        runAndCompare(plan, variant, seed, 1e-5);
  }
}

TEST(Executor, Bf16PlanMatchesTheReference) {
  std::shared_ptr<const Plan> plan = loadPlan(makeBf16Plan());
  for (uint64_t seed : {4, 5})
    runAndCompare(plan, 0, seed, 2e-2);
}

TEST(Executor, RejectsBadBindings) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  Buffers buffers(*plan);
  std::vector<Binding> good = buffers.bindings();
  auto expectError = [&](std::vector<Binding> bindings, StatusCode code,
                         std::initializer_list<const char *> parts) {
    Status status = executor->forward(bindings.data(), bindings.size());
    EXPECT_EQ(status.code(), code) << status.message();
    for (const char *part : parts)
      EXPECT_THAT(status.message(), HasSubstr(part));
  };
  auto withChange = [&](const char *name, auto change) {
    std::vector<Binding> bindings = good;
    for (Binding &binding : bindings)
      if (binding.name == name)
        change(binding);
    return bindings;
  };
  expectError(withChange("x", [](Binding &b) { b.bytes -= 4; }),
              StatusCode::InvalidArgument,
              {"argument 'x' is [8, 4] f32 = 128 bytes; got 124 bytes"});
  expectError(withChange("w1", [](Binding &b) { b.data = nullptr; }),
              StatusCode::InvalidArgument, {"'w1' has a null pointer"});
  expectError(withChange("x", [](Binding &b) { b.name = "tokens"; }),
              StatusCode::NotFound,
              {"'tokens' is not an argument of the plan"});
  std::vector<Binding> twice = good;
  twice.push_back(good[0]);
  expectError(twice, StatusCode::InvalidArgument, {"is bound twice"});
  std::vector<Binding> missing;
  for (const Binding &binding : good)
    if (binding.name != "b2")
      missing.push_back(binding);
  expectError(missing, StatusCode::InvalidArgument,
              {"argument 'b2' (role input", "is not bound"});
  // An output sharing memory with an input would write the input.
  expectError(withChange("out",
                         [&](Binding &b) { b.data = buffers.data["x"].data(); }),
              StatusCode::InvalidArgument,
              {"'out' (written) overlaps the memory of argument 'x'"});
  Status status = executor->forward(nullptr, 3);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  // Forward needs no grad arguments.
  std::vector<Binding> forwardOnly;
  for (const Binding &binding : good)
    if (plan->arguments[plan->findArgument(binding.name)].role ==
            ArgumentRole::Input ||
        plan->arguments[plan->findArgument(binding.name)].role ==
            ArgumentRole::Output)
      forwardOnly.push_back(binding);
  EXPECT_TRUE(
      executor->forward(forwardOnly.data(), forwardOnly.size()).isOk());
  // ... but backward does.
  status = executor->backward(forwardOnly.data(), forwardOnly.size());
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("grad_out"));
}

TEST(Executor, BackwardNeedsAForwardFirst) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  Buffers buffers(*plan);
  std::vector<Binding> bindings = buffers.bindings();
  Status status = executor->backward(bindings.data(), bindings.size());
  EXPECT_EQ(status.code(), StatusCode::FailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("backward needs a forward first"));
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  EXPECT_TRUE(executor->backward(bindings.data(), bindings.size()).isOk());
  // One backward per forward.
  EXPECT_EQ(executor->backward(bindings.data(), bindings.size()).code(),
            StatusCode::FailedPrecondition);
  // A new workspace loses the forward's state.
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  ASSERT_TRUE(executor->setWorkspace(nullptr, 0).isOk());
  EXPECT_EQ(executor->backward(bindings.data(), bindings.size()).code(),
            StatusCode::FailedPrecondition);

  std::shared_ptr<const Plan> inference =
      loadPlan(readTestPlan("gated_bounded_infer.json"));
  std::unique_ptr<Executor> inferenceExecutor = makeExecutor(inference);
  Buffers inferenceBuffers(*inference);
  std::vector<Binding> inferenceBindings = inferenceBuffers.bindings();
  ASSERT_TRUE(inferenceExecutor
                  ->forward(inferenceBindings.data(), inferenceBindings.size())
                  .isOk());
  status = inferenceExecutor->backward(inferenceBindings.data(),
                                       inferenceBindings.size());
  EXPECT_EQ(status.code(), StatusCode::FailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("inference"));
}

TEST(Executor, BackwardRunsTheVariantOfItsForward) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  Buffers buffers(*plan);
  reference::LayerInputs inputs = makeInputs(plan->layer, 9);
  buffers.setInputs(inputs);
  std::vector<Binding> bindings = buffers.bindings();
  ASSERT_TRUE(executor->selectVariant("ragged").isOk());
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  ASSERT_TRUE(executor->selectVariant("padded").isOk());
  ASSERT_TRUE(executor->backward(bindings.data(), bindings.size()).isOk());
  EXPECT_EQ(executor->lastRunStats().variant, 1);
  EXPECT_TRUE(executor->lastRunStats().backward);
  EXPECT_EQ(executor->measurements(1).forwardCalls, 1);
  EXPECT_EQ(executor->measurements(1).backwardCalls, 1);
  EXPECT_EQ(executor->measurements(0).forwardCalls, 0);
  // A variant's first pass is not a measurement (one-time costs).
  EXPECT_EQ(executor->measurements(1).forwardRuns, 0);
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  EXPECT_EQ(executor->measurements(1).forwardRuns, 0);
  EXPECT_EQ(executor->measurements(0).forwardRuns, 0);
  EXPECT_EQ(executor->measurements(0).forwardCalls, 1);
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  EXPECT_EQ(executor->measurements(0).forwardRuns, 1);
  EXPECT_GT(executor->measurements(0).forwardMeanMicros, 0);
}

TEST(Executor, SelectsVariants) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  EXPECT_EQ(executor->selectedVariant(), 0);
  EXPECT_TRUE(executor->selectVariant("ragged").isOk());
  EXPECT_EQ(executor->selectedVariant(), 1);
  Status status = executor->selectVariant("pipelined");
  EXPECT_EQ(status.code(), StatusCode::NotFound);
  EXPECT_THAT(status.message(), HasSubstr("padded, ragged"));
  status = executor->selectVariant(2);
  EXPECT_EQ(status.code(), StatusCode::OutOfRange);
  EXPECT_THAT(status.message(), HasSubstr("index 2 is out of range"));
  EXPECT_EQ(executor->selectedVariant(), 1);

  ::setenv("FLEX_VARIANT", "ragged", 1);
  EXPECT_EQ(makeExecutor(plan)->selectedVariant(), 1);
  ::setenv("FLEX_VARIANT", "1", 1);
  EXPECT_EQ(makeExecutor(plan)->selectedVariant(), 1);
  ::setenv("FLEX_VARIANT", "7", 1);
  std::unique_ptr<Executor> rejected;
  status = Executor::create(plan, createCpuBackend(), rejected);
  ::unsetenv("FLEX_VARIANT");
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("FLEX_VARIANT='7'"));
  EXPECT_FALSE(rejected);
}

TEST(Executor, UsesTheCallersWorkspace) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  int64_t bytes = executor->workspaceBytes();
  int64_t alignment = executor->workspaceAlignment();
  std::vector<uint8_t> storage(bytes + 2 * alignment);
  auto address = reinterpret_cast<uintptr_t>(storage.data());
  uint8_t *aligned = storage.data() + (alignment - address % alignment);
  Status status = executor->setWorkspace(aligned + 1, bytes);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("not aligned to 64"));
  status = executor->setWorkspace(aligned, bytes - 1);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("too small"));
  ASSERT_TRUE(executor->setWorkspace(aligned, bytes).isOk());

  Buffers buffers(*plan);
  reference::LayerInputs inputs = makeInputs(plan->layer, 11);
  buffers.setInputs(inputs);
  std::vector<Binding> bindings = buffers.bindings();
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  std::vector<double> withCallers = buffers.get("out");
  ASSERT_TRUE(executor->setWorkspace(nullptr, 0).isOk());
  buffers.poison(ArgumentRole::Output);
  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  EXPECT_EQ(buffers.get("out"), withCallers);
}

// Each variant runs on its own part of the workspace (`workspace_bytes`):
// a plan carrying the padded layout beside the ragged one needs the padded
// one's bytes only where it runs.
TEST(Executor, RunsEachVariantOnItsOwnWorkspace) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_dropless_layouts_train.json"));
  const int64_t ragged = plan->findVariant("ragged"),
                padded = plan->findVariant("padded");
  ASSERT_GE(ragged, 0);
  ASSERT_GE(padded, 0);
  // Every buffer a variant's steps use lies within its bytes (read from
  // the steps here, apart from the loader's check).
  for (size_t v = 0; v < plan->variants.size(); ++v) {
    int64_t end = 0;
    for (const auto *steps :
         {&plan->variants[v].forward, &plan->variants[v].backward})
      for (const Step &step : *steps)
        for (const auto *refs : {&step.inputs, &step.outputs})
          for (const BufferRef &ref : *refs)
            if (ref.kind == BufferRef::Kind::Workspace) {
              const WorkspaceBuffer &b = plan->workspace.buffers[ref.index];
              end = std::max(end, b.offset + b.numBytes());
            }
    EXPECT_LE(end, plan->variantWorkspaceBytes(v)) << plan->variants[v].name;
    EXPECT_LE(plan->variantWorkspaceBytes(v), plan->workspace.bytes);
  }
  EXPECT_LT(3 * plan->variantWorkspaceBytes(ragged),
            plan->variantWorkspaceBytes(padded));
  EXPECT_EQ(plan->variantWorkspaceBytes(padded), plan->workspace.bytes);

  // A new executor's own workspace is the variant's (runAndCompare checks).
  for (size_t variant = 0; variant < plan->variants.size(); ++variant)
    runAndCompare(plan, variant, 21, 1e-5);
  // One executor: its workspace grows from ragged's to padded's, and the
  // variants still match the reference on it, before and after.
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  runAndCompare(plan, ragged, 22, 1e-5, executor.get());
  EXPECT_EQ(executor->ownedWorkspaceBytes(),
            plan->variantWorkspaceBytes(ragged));
  runAndCompare(plan, padded, 23, 1e-5, executor.get());
  EXPECT_EQ(executor->ownedWorkspaceBytes(), plan->workspace.bytes);
  runAndCompare(plan, ragged, 24, 1e-5, executor.get());
  EXPECT_EQ(executor->ownedWorkspaceBytes(), plan->workspace.bytes);
  // Under auto (no bound) the first forward allocates every variant's
  // bytes, so later choices never allocate (a caller's capture included).
  std::unique_ptr<Executor> automatic = makeExecutor(plan);
  ASSERT_TRUE(automatic->automaticVariant());
  EXPECT_EQ(automatic->runWorkspaceBytes(), plan->workspace.bytes);
  Buffers buffers(*plan);
  reference::LayerInputs inputs = makeInputs(plan->layer, 25);
  buffers.setInputs(inputs);
  std::vector<Binding> bindings = buffers.bindings();
  ASSERT_TRUE(automatic->forward(bindings.data(), bindings.size()).isOk());
  EXPECT_EQ(automatic->ownedWorkspaceBytes(), plan->workspace.bytes);
}

TEST(Executor, ChoosesAmongTheVariantsTheWorkspaceHolds) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_dropless_layouts_train.json"));
  const int64_t ragged = plan->findVariant("ragged"),
                padded = plan->findVariant("padded");
  const int64_t small = plan->variantWorkspaceBytes(ragged);
  const int64_t alignment = plan->workspace.alignment;
  std::vector<uint8_t> storage(plan->workspace.bytes + alignment);
  uint8_t *aligned =
      storage.data() +
      (alignment - reinterpret_cast<uintptr_t>(storage.data()) % alignment);
  Buffers buffers(*plan);
  reference::LayerInputs inputs = makeInputs(plan->layer, 31);
  buffers.setInputs(inputs);
  std::vector<Binding> bindings = buffers.bindings();

  // Auto on a per-call workspace of ragged's size: only ragged fits, so
  // every call (timed ones too, which would explore) runs it.
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  ASSERT_TRUE(executor->automaticVariant());
  RunOptions call;
  call.workspace = aligned;
  call.workspaceBytes = small;
  for (int i = 0; i < 8; ++i) {
    Status status = executor->forward(bindings.data(), bindings.size(), call);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_EQ(executor->lastRunStats().variant, ragged);
    ASSERT_TRUE(
        executor->backward(bindings.data(), bindings.size(), call).isOk());
  }
  EXPECT_EQ(executor->ownedWorkspaceBytes(), 0) << "never allocated";
  // The whole workspace: the other variants are explored too.
  call.workspaceBytes = plan->workspace.bytes;
  std::set<int64_t> ran;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(
        executor->forward(bindings.data(), bindings.size(), call).isOk());
    ran.insert(executor->lastRunStats().variant);
  }
  EXPECT_GT(ran.size(), 1u);

  // The caller's workspace set once bounds the choice the same way.
  ASSERT_TRUE(executor->setWorkspace(aligned, small).isOk());
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
    EXPECT_EQ(executor->lastRunStats().variant, ragged);
  }
  // Smaller than every variant: refused; a named variant that does not fit
  // fails before anything runs, naming what it needs.
  Status status = executor->setWorkspace(aligned, small - 1);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("too small"));
  EXPECT_THAT(status.message(), HasSubstr(std::to_string(small)));
  ASSERT_TRUE(executor->selectVariant(padded).isOk());
  EXPECT_EQ(executor->runWorkspaceBytes(), plan->workspace.bytes);
  buffers.poison(ArgumentRole::Output);
  status = executor->forward(bindings.data(), bindings.size());
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("variant 'padded' needs " +
                        std::to_string(plan->workspace.bytes)));
  EXPECT_TRUE(std::isnan(buffers.get("out")[0])) << "nothing ran";
  ASSERT_TRUE(executor->selectVariant(ragged).isOk());
  EXPECT_EQ(executor->runWorkspaceBytes(), small);

  // max_workspace_mib bounds the executor's own workspace: auto leaves
  // the variants above it out, a named one fails.
  RuntimeOptions options;
  const int64_t limitMib = (small >> 20) + 1;
  ASSERT_LT(limitMib << 20, plan->workspace.bytes);
  ASSERT_TRUE(
      options.set("max_workspace_mib", std::to_string(limitMib)).isOk());
  std::unique_ptr<Executor> bounded;
  ASSERT_TRUE(
      Executor::create(plan, createCpuBackend(), options, bounded).isOk());
  int64_t largestFitting = 0;
  for (size_t v = 0; v < plan->variants.size(); ++v)
    if (plan->variantWorkspaceBytes(v) <= (limitMib << 20))
      largestFitting = std::max(largestFitting, plan->variantWorkspaceBytes(v));
  EXPECT_EQ(bounded->runWorkspaceBytes(), largestFitting);
  // The choice made at creation already keeps to the bound.
  EXPECT_LE(bounded->workspaceBytes(bounded->selectedVariant()),
            limitMib << 20);
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(bounded->forward(bindings.data(), bindings.size()).isOk());
    ASSERT_TRUE(bounded->backward(bindings.data(), bindings.size()).isOk());
    EXPECT_NE(bounded->lastRunStats().variant, padded);
  }
  EXPECT_LE(bounded->ownedWorkspaceBytes(), limitMib << 20);
  ASSERT_TRUE(bounded->selectVariant(padded).isOk());
  status = bounded->forward(bindings.data(), bindings.size());
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("max_workspace_mib"));
}

// NaN behaviour: by default NaN propagates (never hidden); with the check,
// NaN in an input is reported before anything runs.
TEST(Executor, NonFiniteInputs) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("gated_bounded_infer.json"));
  std::unique_ptr<Executor> executor = makeExecutor(plan);
  Buffers buffers(*plan);
  reference::LayerInputs inputs = makeInputs(plan->layer, 12);
  inputs.x[5 * plan->layer.modelDim + 3] =
      std::numeric_limits<double>::quiet_NaN();
  buffers.setInputs(inputs);
  std::vector<Binding> bindings = buffers.bindings();

  ASSERT_TRUE(executor->forward(bindings.data(), bindings.size()).isOk());
  std::vector<double> out = buffers.get("out");
  EXPECT_TRUE(std::isnan(out[5 * plan->layer.modelDim])) << "NaN was hidden";

  buffers.poison(ArgumentRole::Output);
  RunOptions options;
  options.checkNonFinite = true;
  Status status = executor->forward(bindings.data(), bindings.size(), options);
  EXPECT_EQ(status.code(), StatusCode::NumericError);
  EXPECT_THAT(status.message(),
              HasSubstr("input argument 'x' has NaN or Inf at element 43 "
                        "(index [5, 3])"));

  ::setenv("FLEX_CHECK_NAN", "1", 1);
  std::unique_ptr<Executor> checking = makeExecutor(plan);
  ::unsetenv("FLEX_CHECK_NAN");
  EXPECT_EQ(checking->forward(bindings.data(), bindings.size()).code(),
            StatusCode::NumericError);
}

// The options given to Executor::create are taken as given: the
// environment counts only through RuntimeOptions::fromEnvironment (or the
// create without options).
TEST(Executor, TakesRuntimeOptions) {
  std::shared_ptr<const Plan> plan =
      loadPlan(readTestPlan("ffn_fixed_train.json"));
  RuntimeOptions options;
  ASSERT_TRUE(options.set("variant", "ragged").isOk());
  ::setenv("FLEX_VARIANT", "padded", 1);
  std::unique_ptr<Executor> executor;
  ASSERT_TRUE(
      Executor::create(plan, createCpuBackend(), options, executor).isOk());
  EXPECT_EQ(executor->selectedVariant(), 1);

  RuntimeOptions withEnvironment;
  ASSERT_TRUE(RuntimeOptions::fromEnvironment(options, withEnvironment).isOk());
  ::unsetenv("FLEX_VARIANT");
  EXPECT_EQ(withEnvironment.variant, "padded");
  EXPECT_EQ(withEnvironment.environmentOverrides,
            std::vector<std::string>{"FLEX_VARIANT"});
  ASSERT_TRUE(
      Executor::create(plan, createCpuBackend(), withEnvironment, executor)
          .isOk());
  EXPECT_EQ(executor->selectedVariant(), 0);

  options.variant = "5";
  Status status = Executor::create(plan, createCpuBackend(), options, executor);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("option variant='5' names no variant of the plan"));
  EXPECT_FALSE(executor);
}

TEST(RuntimeOptions, ParsesValidatesAndReadsTheEnvironment) {
  RuntimeOptions options;
  EXPECT_TRUE(options.cudaOverlap);
  EXPECT_EQ(options.a2aStaging, ExchangeStaging::Auto);
  EXPECT_EQ(options.collectiveTimeoutSeconds, kDefaultCollectiveTimeoutSeconds);
  EXPECT_TRUE(options.set("cuda_overlap", "off").isOk());
  EXPECT_FALSE(options.cudaOverlap);
  EXPECT_TRUE(options.set("a2a_staging", "1").isOk());
  EXPECT_EQ(options.a2aStaging, ExchangeStaging::Always);
  EXPECT_TRUE(options.set("a2a_transport", "ce").isOk());
  EXPECT_EQ(options.a2aTransport, AllToAllTransport::CopyEngine);
  std::string text;
  EXPECT_TRUE(options.get("a2a_staging", text).isOk());
  EXPECT_EQ(text, "always");
  Status status = options.set("a2a_staging", "sometimes");
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("option a2a_staging='sometimes': expected auto, "
                        "always (or 1) or never (or 0)"));
  EXPECT_EQ(options.set("nope", "1").code(), StatusCode::NotFound);
  EXPECT_EQ(options.get("nope", text).code(), StatusCode::NotFound);
  EXPECT_EQ(options.groupedGemm, GroupedGemmImpl::Auto);
  for (const char *impl : {"device", "cublas", "auto"}) {
    EXPECT_TRUE(options.set("grouped_gemm", impl).isOk()) << impl;
    EXPECT_TRUE(options.get("grouped_gemm", text).isOk());
    EXPECT_EQ(text, impl);
  }
  status = options.set("grouped_gemm", "cutlass");
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("option grouped_gemm='cutlass': expected auto, device"));
  // The ReLU in cuBLASLt's epilogue is on by default and can be turned off.
  EXPECT_TRUE(options.reluInGemm);
  EXPECT_TRUE(options.set("relu_in_gemm", "off").isOk());
  EXPECT_FALSE(options.reluInGemm);
  EXPECT_TRUE(options.get("relu_in_gemm", text).isOk());
  EXPECT_EQ(text, "0");
  EXPECT_EQ(options.set("relu_in_gemm", "maybe").code(),
            StatusCode::InvalidArgument);
  EXPECT_TRUE(options.set("relu_in_gemm", "1").isOk());
  // The wgmma grouped kernel: on by default (Hopper only).
  EXPECT_TRUE(options.wgmma);
  EXPECT_TRUE(options.set("wgmma", "0").isOk());
  EXPECT_FALSE(options.wgmma);
  EXPECT_TRUE(options.set("wgmma", "1").isOk());
  EXPECT_TRUE(options.wgmma);
  EXPECT_TRUE(options.get("wgmma", text).isOk());
  EXPECT_EQ(text, "1");
  EXPECT_EQ(options.set("wgmma", "sometimes").code(),
            StatusCode::InvalidArgument);
  EXPECT_TRUE(options.set("wgmma", "off").isOk());
  // Its tile: each name round-trips; anything else names the values.
  EXPECT_EQ(options.wgmmaTile, WgmmaTile::Auto);
  for (auto [name, tile] :
       {std::pair{"wide", WgmmaTile::Wide}, std::pair{"pair", WgmmaTile::Pair},
        std::pair{"cooperative", WgmmaTile::Cooperative},
        std::pair{"ping-pong", WgmmaTile::PingPong},
        std::pair{"auto", WgmmaTile::Auto}}) {
    EXPECT_TRUE(options.set("wgmma_tile", name).isOk()) << name;
    EXPECT_EQ(options.wgmmaTile, tile) << name;
    EXPECT_TRUE(options.get("wgmma_tile", text).isOk());
    EXPECT_EQ(text, name);
  }
  status = options.set("wgmma_tile", "huge");
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("option wgmma_tile='huge': expected auto, wide"));
  EXPECT_EQ(options.wgmmaTile, WgmmaTile::Auto);
  // The per-expert GEMMs' streams: 1..8; anything else names the range and
  // leaves the value.
  EXPECT_EQ(options.gemmStreams, 2);
  EXPECT_TRUE(options.set("gemm_streams", "4").isOk());
  EXPECT_EQ(options.gemmStreams, 4);
  EXPECT_TRUE(options.get("gemm_streams", text).isOk());
  EXPECT_EQ(text, "4");
  for (const char *bad : {"0", "9", "-1", "2x", ""}) {
    status = options.set("gemm_streams", bad);
    EXPECT_EQ(status.code(), StatusCode::InvalidArgument) << bad;
    EXPECT_THAT(status.message(), HasSubstr("a whole number from 1 to 8"))
        << bad;
    EXPECT_EQ(options.gemmStreams, 4) << bad;
  }
  // The executor's own workspace bound, in MiB: 0 (none) by default.
  EXPECT_EQ(options.maxWorkspaceBytes(), std::numeric_limits<int64_t>::max());
  EXPECT_TRUE(options.set("max_workspace_mib", "3").isOk());
  EXPECT_EQ(options.maxWorkspaceBytes(), int64_t(3) << 20);
  EXPECT_TRUE(options.get("max_workspace_mib", text).isOk());
  EXPECT_EQ(text, "3");
  for (const char *bad :
       {"-1", "1.5", "2G", "", "99999999999999999999", "1099511627777"}) {
    status = options.set("max_workspace_mib", bad);
    EXPECT_EQ(status.code(), StatusCode::InvalidArgument) << bad;
    EXPECT_THAT(status.message(), HasSubstr("a whole number of MiB")) << bad;
    EXPECT_EQ(options.maxWorkspaceMib, 3) << bad;
  }

  // Every variable of the table overrides its option; an empty one is
  // unset; a bad one names itself and leaves the result at the base.
  for (const RuntimeOptions::Entry &entry : RuntimeOptions::entries())
    ::unsetenv(entry.environment);
  ::setenv("FLEX_CUDA_OVERLAP", "1", 1);
  ::setenv("FLEX_A2A_STAGING", "never", 1);
  ::setenv("FLEX_COLLECTIVE_TIMEOUT_S", "7", 1);
  ::setenv("FLEX_VARIANT", "", 1);
  ::setenv("FLEX_GROUPED_GEMM", "device", 1);
  ::setenv("FLEX_WGMMA_TILE", "pair", 1);
  RuntimeOptions result;
  ASSERT_TRUE(RuntimeOptions::fromEnvironment(options, result).isOk());
  EXPECT_EQ(result.groupedGemm, GroupedGemmImpl::Device);
  EXPECT_EQ(result.wgmmaTile, WgmmaTile::Pair);
  EXPECT_TRUE(result.cudaOverlap);
  EXPECT_EQ(result.a2aStaging, ExchangeStaging::Never);
  EXPECT_EQ(result.collectiveTimeoutSeconds, 7);
  EXPECT_EQ(result.a2aTransport, AllToAllTransport::CopyEngine); // the base's
  EXPECT_EQ(result.variant, "");

  ::setenv("FLEX_A2A_TRANSPORT", "infiniband", 1);
  status = RuntimeOptions::fromEnvironment(options, result);
  for (const RuntimeOptions::Entry &entry : RuntimeOptions::entries())
    ::unsetenv(entry.environment);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("FLEX_A2A_TRANSPORT='infiniband': expected 'nccl'"));
  EXPECT_FALSE(result.cudaOverlap); // the base
}
