//===- CAPIPerCallStateTest.cpp - Per-call workspaces and seeds -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests FlexRunOptions' per-call state through the C functions
// only (docs/CAPI.md, "Per-call workspaces and seeds"): several forwards in
// flight on their own workspaces, each backward computing the gradients of
// its own forward (fixed and dropless capacity, several variants), compared
// with the fp64 reference on fresh random inputs with outputs poisoned; the
// per-call seed of the gate noise; and the refusals (backward without a
// forward on its workspace, a small or misaligned workspace, struct sizes of
// older headers, unknown flags, the bound on pending forwards).
//
//===----------------------------------------------------------------------===//

#include "CAPITestSupport.h"
#include "flex-c/Flex.h"

#include "flex/Reference/ReferenceMoE.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::string readPlan(const std::string &name) {
  return flex::test::readTextFile(std::string(FLEX_TEST_PLANS_DIR) + "/" +
                                  name);
}

std::string withNoise(const std::string &name, double noise) {
  return flex::test::withGateNoise(readPlan(name), noise);
}

/// A caller workspace: `bytes` from an address aligned to `alignment`, plus
/// `shift` bytes (to misalign it).
struct Workspace {
  std::vector<uint8_t> storage;
  void *data = nullptr;
  int64_t bytes = 0;

  Workspace(int64_t bytes, int64_t alignment, int64_t shift = 0)
      : storage(bytes + 2 * alignment), bytes(bytes) {
    auto address = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + (alignment - address % alignment) + shift;
    // NaN bytes: a step reading what no step of its pass wrote shows.
    std::memset(storage.data(), 0xff, storage.size());
  }
};

/// The buffers of one forward and its backward, with what the reference
/// computes for them.
struct Call {
  flex::LayerConfig config;
  flex::reference::LayerInputs inputs;
  std::vector<double> gradOut;
  double gradLAux = 0.5;
  std::map<std::string, std::vector<float>> buffers;
  std::vector<FlexBinding> bindings;
};

class PerCallState : public ::testing::Test {
protected:
  void SetUp() override {
    ASSERT_EQ(flexContextCreate("cpu", &context), FLEX_STATUS_OK);
  }
  void TearDown() override {
    if (exe) {
      EXPECT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
    }
    EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_OK);
  }
  void load(const std::string &text) {
    ASSERT_EQ(
        flexExecutableCreateFromPlan(context, text.data(), text.size(), &exe),
        FLEX_STATUS_OK)
        << flexGetLastError();
    FlexLayerConfig layer;
    ASSERT_EQ(flexExecutableGetLayerConfig(exe, &layer), FLEX_STATUS_OK);
    config = flex::test::toLayerConfig(layer);
    ASSERT_EQ(flexExecutableGetWorkspaceSize(exe, &workspaceBytes, &alignment),
              FLEX_STATUS_OK);
    int64_t count = 0;
    ASSERT_EQ(flexExecutableGetNumArguments(exe, &count), FLEX_STATUS_OK);
    for (int64_t i = 0; i < count; ++i) {
      FlexArgumentInfo info;
      ASSERT_EQ(flexExecutableGetArgument(exe, i, &info), FLEX_STATUS_OK);
      ASSERT_EQ(info.dtype, FLEX_DTYPE_F32) << "the tests bind f32 buffers";
      infos[info.name] = info;
    }
  }
  std::unique_ptr<Workspace> workspace(int64_t shift = 0) {
    return std::make_unique<Workspace>(workspaceBytes, alignment, shift);
  }

  /// Fresh random inputs (routing clear of ties under every seed of
  /// `seeds`, the plan's when empty) and grad_out; outputs poisoned.
  std::unique_ptr<Call> makeCall(uint64_t seed,
                                 std::vector<uint64_t> seeds = {}) {
    auto call = std::make_unique<Call>();
    call->config = config;
    if (seeds.empty())
      seeds.push_back(config.seed);
    std::mt19937_64 rng(seed);
    for (bool clear = false; !clear;) {
      call->inputs = flex::reference::makeRandomInputs(config, rng);
      clear = true;
      for (uint64_t noiseSeed : seeds) {
        flex::LayerConfig seeded = config;
        seeded.seed = noiseSeed;
        auto routing = flex::reference::referenceRouting(seeded, call->inputs);
        auto margins = flex::reference::routingMargins(seeded, routing);
        clear &= margins.logitGap > 1e-4 &&
                 (!config.batchPrioritized || margins.priorityGap > 1e-4);
      }
    }
    std::normal_distribution<double> normal;
    call->gradOut.resize(config.tokens * config.modelDim);
    for (double &value : call->gradOut)
      value = static_cast<float>(normal(rng));
    const std::pair<const char *, const std::vector<double> *> values[] = {
        {"x", &call->inputs.x},   {"wg", &call->inputs.wg},
        {"w1", &call->inputs.w1}, {"b1", &call->inputs.b1},
        {"w2", &call->inputs.w2}, {"b2", &call->inputs.b2},
        {"w3", &call->inputs.w3}, {"grad_out", &call->gradOut}};
    for (auto &[name, info] : infos) {
      std::vector<float> &buffer = call->buffers[name];
      buffer.assign(info.bytes / 4, NAN);
      for (auto [valueName, source] : values)
        if (name == valueName)
          buffer.assign(source->begin(), source->end());
      if (name == "grad_l_aux")
        buffer.assign(1, static_cast<float>(call->gradLAux));
    }
    for (auto &[name, buffer] : call->buffers)
      call->bindings.push_back({infos[name].name, buffer.data(),
                                static_cast<int64_t>(buffer.size() * 4)});
    return call;
  }

  FlexStatus forward(Call &call, const Workspace *ws, uint32_t flags = 0,
                     std::optional<uint64_t> seed = {}) {
    FlexRunOptions options{};
    options.struct_size = sizeof(FlexRunOptions);
    options.flags = flags | (seed ? FLEX_RUN_SEED : 0);
    options.workspace = ws ? ws->data : nullptr;
    options.workspace_bytes = ws ? ws->bytes : 0;
    options.seed = seed.value_or(0);
    if (seed)
      call.config.seed = *seed;
    return flexExecutableForward(exe, call.bindings.data(),
                                 call.bindings.size(), &options);
  }
  FlexStatus backward(Call &call, const Workspace *ws) {
    FlexRunOptions options{};
    options.struct_size = sizeof(FlexRunOptions);
    options.workspace = ws ? ws->data : nullptr;
    options.workspace_bytes = ws ? ws->bytes : 0;
    return flexExecutableBackward(exe, call.bindings.data(),
                                  call.bindings.size(), &options);
  }

  /// NaN in every output and gradient again.
  void poison(Call &call) {
    for (auto &[name, info] : infos)
      if (info.role == FLEX_ROLE_OUTPUT || info.role == FLEX_ROLE_GRAD_OUTPUT)
        std::fill(call.buffers[name].begin(), call.buffers[name].end(), NAN);
  }
  std::vector<double> get(const Call &call, const char *name) const {
    const std::vector<float> &buffer = call.buffers.at(name);
    return std::vector<double>(buffer.begin(), buffer.end());
  }
  void expectForwardMatches(const Call &call) const {
    auto forward = flex::reference::referenceForward(call.config, call.inputs);
    EXPECT_LE(flex::reference::relativeL2(get(call, "out"), forward.out), 1e-5);
    EXPECT_LE(flex::reference::relativeL2(get(call, "l_aux"), {forward.lAux}),
              1e-5);
  }
  void expectGradientsMatch(const Call &call) const {
    auto grads = flex::reference::referenceBackward(
        call.config, call.inputs, call.gradOut, call.gradLAux);
    const std::pair<const char *, const std::vector<double> *> want[] = {
        {"grad_x", &grads.x},   {"grad_wg", &grads.wg}, {"grad_w1", &grads.w1},
        {"grad_b1", &grads.b1}, {"grad_w2", &grads.w2}, {"grad_b2", &grads.b2},
        {"grad_w3", &grads.w3}};
    for (auto [name, values] : want)
      if (infos.count(name)) {
        EXPECT_LE(flex::reference::relativeL2(get(call, name), *values), 1e-5)
            << name;
      }
  }
  /// The backward passes per variant, from explain.
  std::map<std::string, int64_t> backwardRuns() {
    char *text = nullptr;
    EXPECT_EQ(flexExecutableExplain(exe, &text), FLEX_STATUS_OK);
    Json json = Json::parse(text ? text : "{}");
    flexFreeString(text);
    std::map<std::string, int64_t> runs;
    for (const Json &variant : json["variants"])
      runs[variant["name"]] = variant["backward_calls"];
    return runs;
  }

  FlexContext context = nullptr;
  FlexExecutable exe = nullptr;
  flex::LayerConfig config;
  int64_t workspaceBytes = 0, alignment = 0;
  std::map<std::string, FlexArgumentInfo> infos;
};

#define EXPECT_OK(call) EXPECT_EQ(call, FLEX_STATUS_OK) << flexGetLastError()
#define ASSERT_OK(call) ASSERT_EQ(call, FLEX_STATUS_OK) << flexGetLastError()

} // namespace

// Forwards on three caller workspaces and the executable's own (the plan's
// two variants, chosen by the cost model), their backwards in another order,
// each against its own reference.
TEST_F(PerCallState, InterleavedBackwardsMatchTheirForwards) {
  load(readPlan("ffn_fixed_train.json"));
  auto ws1 = workspace(), ws2 = workspace(), ws3 = workspace();
  auto a = makeCall(1), b = makeCall(2), c = makeCall(3), d = makeCall(4),
       e = makeCall(5);
  ASSERT_OK(forward(*a, ws1.get()));
  ASSERT_OK(forward(*b, ws2.get()));
  ASSERT_OK(forward(*e, nullptr)); // the executable's own workspace
  ASSERT_OK(forward(*c, ws3.get()));
  for (Call *call : {a.get(), b.get(), c.get(), e.get()})
    expectForwardMatches(*call);
  ASSERT_OK(backward(*b, ws2.get()));
  ASSERT_OK(backward(*a, ws1.get()));
  // ws2 is free again: a new forward there, then the older c's backward.
  ASSERT_OK(forward(*d, ws2.get()));
  ASSERT_OK(backward(*c, ws3.get()));
  ASSERT_OK(backward(*e, nullptr));
  ASSERT_OK(backward(*d, ws2.get()));
  for (Call *call : {a.get(), b.get(), c.get(), d.get(), e.get()}) {
    SCOPED_TRACE(call == a.get() ? "a" : call == b.get() ? "b" : "other");
    expectGradientsMatch(*call);
  }
}

TEST_F(PerCallState, DroplessCapacityIsPerWorkspace) {
  load(readPlan("ffn_dropless_ragged_train.json"));
  // Three calls whose capacities C (read at run time) all differ.
  std::vector<std::unique_ptr<Call>> calls;
  std::vector<int64_t> capacities;
  for (uint64_t seed = 10; calls.size() < 3; ++seed) {
    auto call = makeCall(seed);
    int64_t capacity =
        flex::reference::referenceRouting(config, call->inputs).capacity;
    if (std::find(capacities.begin(), capacities.end(), capacity) !=
        capacities.end())
      continue;
    capacities.push_back(capacity);
    calls.push_back(std::move(call));
  }
  auto ws1 = workspace(), ws2 = workspace(), ws3 = workspace();
  ASSERT_OK(forward(*calls[0], ws1.get()));
  ASSERT_OK(forward(*calls[1], ws2.get()));
  ASSERT_OK(forward(*calls[2], ws3.get()));
  ASSERT_OK(backward(*calls[0], ws1.get()));
  ASSERT_OK(backward(*calls[2], ws3.get()));
  ASSERT_OK(backward(*calls[1], ws2.get()));
  for (size_t i = 0; i < calls.size(); ++i) {
    SCOPED_TRACE("call " + std::to_string(i) + " C " +
                 std::to_string(capacities[i]));
    expectForwardMatches(*calls[i]);
    expectGradientsMatch(*calls[i]);
  }
}

TEST_F(PerCallState, BackwardRunsTheVariantOfItsForward) {
  load(readPlan("ffn_fixed_train.json"));
  auto ws1 = workspace(), ws2 = workspace();
  auto a = makeCall(21), b = makeCall(22);
  ASSERT_OK(flexExecutableSelectVariantByName(exe, "padded"));
  ASSERT_OK(forward(*a, ws1.get()));
  ASSERT_OK(flexExecutableSelectVariantByName(exe, "ragged"));
  ASSERT_OK(forward(*b, ws2.get()));
  ASSERT_OK(flexExecutableSelectVariantByName(exe, "padded"));
  ASSERT_OK(backward(*b, ws2.get()));
  EXPECT_EQ(backwardRuns(),
            (std::map<std::string, int64_t>{{"padded", 0}, {"ragged", 1}}));
  ASSERT_OK(flexExecutableSelectVariantByName(exe, "ragged"));
  ASSERT_OK(backward(*a, ws1.get()));
  EXPECT_EQ(backwardRuns(),
            (std::map<std::string, int64_t>{{"padded", 1}, {"ragged", 1}}));
  for (Call *call : {a.get(), b.get()}) {
    expectForwardMatches(*call);
    expectGradientsMatch(*call);
  }
}

TEST_F(PerCallState, GatedExpertsInterleave) {
  load(readPlan("gated_fixed_train.json"));
  auto ws1 = workspace(), ws2 = workspace();
  auto a = makeCall(31), b = makeCall(32);
  ASSERT_OK(forward(*a, ws1.get()));
  ASSERT_OK(forward(*b, ws2.get()));
  ASSERT_OK(backward(*a, ws1.get()));
  ASSERT_OK(backward(*b, ws2.get()));
  for (Call *call : {a.get(), b.get()}) {
    expectForwardMatches(*call);
    expectGradientsMatch(*call);
  }
}

TEST_F(PerCallState, PerCallSeedChangesTheNoiseAndItsBackwardFollows) {
  load(withNoise("ffn_fixed_train.json", 2.0));
  const uint64_t planSeed = config.seed;
  // Two seeds whose noise routes the same tokens differently.
  uint64_t s1 = 100, s2 = 101;
  auto a = makeCall(41, {planSeed, s1, s2});
  auto routingOf = [&](uint64_t seed) {
    flex::LayerConfig seeded = config;
    seeded.seed = seed;
    return flex::reference::referenceRouting(seeded, a->inputs).indices;
  };
  while (routingOf(s1) == routingOf(s2)) {
    ++s2;
    a = makeCall(41, {planSeed, s1, s2});
  }
  auto b = makeCall(41, {planSeed, s1, s2}); // the same inputs as a
  auto c = makeCall(41, {planSeed, s1, s2});
  auto plain = makeCall(41, {planSeed, s1, s2});
  auto ws1 = workspace(), ws2 = workspace(), ws3 = workspace();
  ASSERT_OK(forward(*a, ws1.get(), 0, s1));
  ASSERT_OK(forward(*b, ws2.get(), 0, s2));
  EXPECT_NE(a->buffers["out"], b->buffers["out"]);
  expectForwardMatches(*a);
  expectForwardMatches(*b);
  // The same seed: the same bits, on another workspace.
  ASSERT_OK(forward(*c, ws3.get(), 0, s1));
  EXPECT_EQ(std::memcmp(c->buffers["out"].data(), a->buffers["out"].data(),
                        a->buffers["out"].size() * 4),
            0);
  // Without the flag: the plan's seed, as before.
  ASSERT_OK(forward(*plain, nullptr));
  auto planSeeded = makeCall(41, {planSeed, s1, s2});
  auto ws4 = workspace();
  ASSERT_OK(forward(*planSeeded, ws4.get(), 0, planSeed));
  EXPECT_EQ(plain->buffers["out"], planSeeded->buffers["out"]);
  expectForwardMatches(*plain);
  // Each backward uses its forward's noise.
  ASSERT_OK(backward(*b, ws2.get()));
  ASSERT_OK(backward(*a, ws1.get()));
  ASSERT_OK(backward(*plain, nullptr));
  for (Call *call : {a.get(), b.get(), plain.get()})
    expectGradientsMatch(*call);
  EXPECT_NE(a->buffers["grad_wg"], b->buffers["grad_wg"]);
}

TEST_F(PerCallState, BackwardWithoutAForwardOnItsWorkspaceFails) {
  load(readPlan("ffn_fixed_train.json"));
  auto ws1 = workspace(), ws2 = workspace();
  auto a = makeCall(51);
  EXPECT_EQ(backward(*a, ws1.get()), FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("needs a forward first on the same workspace"));
  ASSERT_OK(forward(*a, ws1.get()));
  // Not on another workspace, nor on the executable's own.
  EXPECT_EQ(backward(*a, ws2.get()), FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("none is pending on the call's workspace at 0x"));
  EXPECT_EQ(backward(*a, nullptr), FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(), HasSubstr("the default workspace"));
  // Once per forward.
  ASSERT_OK(backward(*a, ws1.get()));
  EXPECT_EQ(backward(*a, ws1.get()), FLEX_STATUS_FAILED_PRECONDITION);
  // A failed forward leaves nothing, not even the state of an older one.
  ASSERT_OK(forward(*a, ws1.get()));
  a->buffers["x"][0] = NAN;
  EXPECT_EQ(forward(*a, ws1.get(), FLEX_RUN_CHECK_NONFINITE),
            FLEX_STATUS_NUMERIC_ERROR);
  EXPECT_EQ(backward(*a, ws1.get()), FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexExecutableGetLastError(exe), HasSubstr("failed forward"));
}

TEST_F(PerCallState, SetWorkspaceDropsOnlyTheExecutablesOwnForward) {
  load(readPlan("ffn_fixed_train.json"));
  auto ws1 = workspace(), own = workspace();
  auto a = makeCall(61), b = makeCall(62);
  ASSERT_OK(forward(*a, ws1.get()));
  ASSERT_OK(forward(*b, nullptr));
  ASSERT_OK(flexExecutableSetWorkspace(exe, own->data, own->bytes));
  EXPECT_EQ(backward(*b, nullptr), FLEX_STATUS_FAILED_PRECONDITION);
  ASSERT_OK(backward(*a, ws1.get()));
  expectGradientsMatch(*a);
  // The caller's workspace given both ways is one workspace.
  ASSERT_OK(forward(*b, nullptr));
  ASSERT_OK(backward(*b, own.get()));
  expectGradientsMatch(*b);
}

TEST_F(PerCallState, RejectsSmallOrMisalignedWorkspaces) {
  load(readPlan("ffn_fixed_train.json"));
  auto a = makeCall(71);
  Workspace small(workspaceBytes - 1, alignment);
  EXPECT_EQ(forward(*a, &small), FLEX_STATUS_INVALID_ARGUMENT);
  const std::string needs = "the plan needs " + std::to_string(workspaceBytes) +
                            " bytes for every variant, aligned to " +
                            std::to_string(alignment);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("workspace of " + std::to_string(workspaceBytes - 1) +
                        " bytes is too small"));
  EXPECT_THAT(flexGetLastError(), HasSubstr(needs));
  auto shifted = workspace(/*shift=*/8);
  EXPECT_EQ(forward(*a, shifted.get()), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("is not aligned to 64 bytes"));
  EXPECT_THAT(flexGetLastError(), HasSubstr(needs));
  EXPECT_EQ(backward(*a, shifted.get()), FLEX_STATUS_INVALID_ARGUMENT);
  Workspace negative(workspaceBytes, alignment);
  negative.bytes = -1;
  EXPECT_EQ(forward(*a, &negative), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("workspace_bytes -1 is negative"));
}

TEST_F(PerCallState, OlderStructSizesKeepTheOldBehaviour) {
  load(readPlan("ffn_fixed_train.json"));
  EXPECT_EQ(flexGetRunOptionsSize(), sizeof(FlexRunOptions));
  EXPECT_EQ(sizeof(FlexRunOptions), 40u);
  auto a = makeCall(81);
  auto bad = workspace(/*shift=*/8);
  // A caller of the first header: struct_size ends at `stream` (or before);
  // what lies past it is not read (here a workspace that would be refused).
  for (uint32_t size : {uint32_t(offsetof(FlexRunOptions, workspace)),
                        uint32_t(offsetof(FlexRunOptions, stream))}) {
    SCOPED_TRACE(size);
    poison(*a);
    FlexRunOptions old{};
    old.struct_size = size;
    old.flags = FLEX_RUN_CHECK_NONFINITE;
    old.workspace = bad->data;
    old.workspace_bytes = 1;
    ASSERT_OK(flexExecutableForward(exe, a->bindings.data(), a->bindings.size(),
                                    &old));
    expectForwardMatches(*a);
    ASSERT_OK(flexExecutableBackward(exe, a->bindings.data(),
                                     a->bindings.size(), &old));
    expectGradientsMatch(*a);
  }
  // The seed flag needs the seed field.
  FlexRunOptions seeded{};
  seeded.struct_size = offsetof(FlexRunOptions, seed);
  seeded.flags = FLEX_RUN_SEED;
  EXPECT_EQ(flexExecutableForward(exe, a->bindings.data(), a->bindings.size(),
                                  &seeded),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("FLEX_RUN_SEED needs the seed"));
  // A flag this library does not know is refused, not ignored.
  FlexRunOptions unknown{};
  unknown.struct_size = sizeof(FlexRunOptions);
  unknown.flags = 0x100;
  EXPECT_EQ(flexExecutableForward(exe, a->bindings.data(), a->bindings.size(),
                                  &unknown),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("unknown bits 0x100"));
}

TEST_F(PerCallState, TheOldestOfTooManyPendingForwardsIsDropped) {
  load(readPlan("ffn_fixed_train.json"));
  auto a = makeCall(91);
  constexpr int kPending = 1024; // Executor::kMaxPendingForwards
  std::vector<std::unique_ptr<Workspace>> spaces;
  for (int i = 0; i <= kPending; ++i) {
    spaces.push_back(workspace());
    ASSERT_OK(forward(*a, spaces.back().get(), FLEX_RUN_NO_TIMING));
  }
  EXPECT_EQ(backward(*a, spaces.front().get()),
            FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(), HasSubstr("at most 1024 forwards"));
  ASSERT_OK(backward(*a, spaces[1].get()));
  ASSERT_OK(backward(*a, spaces.back().get()));
  expectGradientsMatch(*a);
}
