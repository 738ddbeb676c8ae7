//===- CAPITest.cpp - Tests of the C API ----------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests include/flex-c/Flex.h through the C functions only:
// version, handles, queries, status codes and last-error messages for bad
// calls, a forward and backward compared with the fp64 reference, and the
// compiler hook.
//
//===----------------------------------------------------------------------===//

#include "CAPITestSupport.h"
#include "flex-c/Flex.h"

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Core/Half.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

using ::testing::HasSubstr;

extern "C" int flexCHeaderCheck(void);

namespace {

std::string planPath(const std::string &name) {
  return std::string(FLEX_TEST_PLANS_DIR) + "/" + name;
}

std::string readText(const std::string &name) {
  std::ifstream file(planPath(name));
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

class CAPI : public ::testing::Test {
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
  void load(const std::string &name) {
    std::string text = readText(name);
    ASSERT_EQ(
        flexExecutableCreateFromPlan(context, text.data(), text.size(), &exe),
        FLEX_STATUS_OK)
        << flexGetLastError();
  }
  /// f32 buffers for every argument, zeroed.
  void makeBuffers() {
    int64_t count = 0;
    ASSERT_EQ(flexExecutableGetNumArguments(exe, &count), FLEX_STATUS_OK);
    for (int64_t i = 0; i < count; ++i) {
      FlexArgumentInfo info;
      ASSERT_EQ(flexExecutableGetArgument(exe, i, &info), FLEX_STATUS_OK);
      infos[info.name] = info;
      buffers[info.name].assign(info.bytes / 4, 0.0f);
    }
  }
  std::vector<FlexBinding> bindings() {
    std::vector<FlexBinding> result;
    for (auto &[name, data] : buffers)
      result.push_back({infos[name].name, data.data(),
                        static_cast<int64_t>(data.size() * 4)});
    return result;
  }

  FlexContext context = nullptr;
  FlexExecutable exe = nullptr;
  std::map<std::string, FlexArgumentInfo> infos;
  std::map<std::string, std::vector<float>> buffers;
};

} // namespace

TEST(CAPIVersion, ReportsTheVersion) {
  EXPECT_EQ(flexGetVersion(), static_cast<uint32_t>(FLEX_C_API_VERSION));
  EXPECT_THAT(flexGetVersionString(), HasSubstr("C API 1"));
  EXPECT_STREQ(flexStatusName(FLEX_STATUS_UNAVAILABLE),
               "FLEX_STATUS_UNAVAILABLE");
  EXPECT_STREQ(flexStatusName(static_cast<FlexStatus>(99)),
               "FLEX_STATUS_<unknown>");
  EXPECT_EQ(flexCHeaderCheck(), 0);
}

TEST(CAPIContext, RejectsUnknownBackendAndDoubleDestroy) {
  FlexContext context = nullptr;
  EXPECT_EQ(flexContextCreate("tpu", &context), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("unknown backend 'tpu'"));
  EXPECT_EQ(context, nullptr);
  // "cuda" is known; without a device (or a CUDA build) it is unavailable.
  FlexStatus cuda = flexContextCreate("cuda", &context);
  if (cuda == FLEX_STATUS_OK) {
    EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_OK);
  } else {
    EXPECT_EQ(cuda, FLEX_STATUS_UNAVAILABLE);
    EXPECT_THAT(flexGetLastError(), HasSubstr("backend 'cuda'"));
  }
  context = nullptr;
  EXPECT_EQ(flexContextCreate(nullptr, nullptr), FLEX_STATUS_INVALID_ARGUMENT);
  ASSERT_EQ(flexContextCreate(nullptr, &context), FLEX_STATUS_OK);
  EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_OK);
  EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("destroyed already"));
  EXPECT_EQ(flexContextDestroy(nullptr), FLEX_STATUS_INVALID_ARGUMENT);
}

TEST_F(CAPI, RejectsBadPlans) {
  FlexExecutable bad = nullptr;
  const char text[] = "{\"format\": \"flex-plan\", \"version\": 3}";
  EXPECT_EQ(flexExecutableCreateFromPlan(context, text, sizeof(text) - 1, &bad),
            FLEX_STATUS_INVALID_PLAN);
  EXPECT_THAT(flexGetLastError(), HasSubstr("version 3 is not supported"));
  EXPECT_EQ(bad, nullptr);
  EXPECT_EQ(flexExecutableCreateFromPlan(context, "{", 1, &bad),
            FLEX_STATUS_INVALID_PLAN);
  EXPECT_EQ(
      flexExecutableCreateFromPlanFile(context, "/no/such/plan.json", &bad),
      FLEX_STATUS_IO_ERROR);
  EXPECT_THAT(flexGetLastError(), HasSubstr("/no/such/plan.json"));
  EXPECT_EQ(flexExecutableCreateFromPlan(nullptr, text, 1, &bad),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexExecutableCreateFromPlan(context, nullptr, 5, &bad),
            FLEX_STATUS_INVALID_ARGUMENT);
}

TEST_F(CAPI, QueriesLayerArgumentsWorkspaceAndVariants) {
  ASSERT_EQ(flexExecutableCreateFromPlanFile(
                context, planPath("ffn_fixed_train.json").c_str(), &exe),
            FLEX_STATUS_OK)
      << flexGetLastError();
  FlexLayerConfig layer;
  ASSERT_EQ(flexExecutableGetLayerConfig(exe, &layer), FLEX_STATUS_OK);
  EXPECT_EQ(layer.tokens, 8);
  EXPECT_EQ(layer.model_dim, 4);
  EXPECT_EQ(layer.hidden_dim, 6);
  EXPECT_EQ(layer.experts, 4);
  EXPECT_EQ(layer.top_k, 2);
  EXPECT_EQ(layer.capacity_mode, FLEX_CAPACITY_FIXED);
  EXPECT_EQ(layer.dtype, FLEX_DTYPE_F32);
  EXPECT_EQ(layer.bias, 1);
  int32_t training = 0;
  ASSERT_EQ(flexExecutableIsTraining(exe, &training), FLEX_STATUS_OK);
  EXPECT_EQ(training, 1);

  int64_t count = 0;
  ASSERT_EQ(flexExecutableGetNumArguments(exe, &count), FLEX_STATUS_OK);
  EXPECT_EQ(count, 16); // 6 inputs, 2 outputs, 2 grad inputs, 6 grads
  int64_t index = -1;
  ASSERT_EQ(flexExecutableFindArgument(exe, "w2", &index), FLEX_STATUS_OK);
  FlexArgumentInfo info;
  ASSERT_EQ(flexExecutableGetArgument(exe, index, &info), FLEX_STATUS_OK);
  EXPECT_STREQ(info.name, "w2");
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.shape[0], 4);
  EXPECT_EQ(info.shape[1], 6);
  EXPECT_EQ(info.shape[2], 4);
  EXPECT_EQ(info.shape[3], 0);
  EXPECT_EQ(info.bytes, 4 * 6 * 4 * 4);
  EXPECT_EQ(info.dtype, FLEX_DTYPE_F32);
  EXPECT_EQ(info.role, FLEX_ROLE_INPUT);
  EXPECT_EQ(flexExecutableFindArgument(exe, "w9", &index),
            FLEX_STATUS_NOT_FOUND);
  EXPECT_EQ(flexExecutableGetArgument(exe, count, &info),
            FLEX_STATUS_OUT_OF_RANGE);
  EXPECT_THAT(flexExecutableGetLastError(exe), HasSubstr("out of range"));

  int64_t bytes = 0, alignment = 0;
  ASSERT_EQ(flexExecutableGetWorkspaceSize(exe, &bytes, &alignment),
            FLEX_STATUS_OK);
  EXPECT_GT(bytes, 0);
  EXPECT_EQ(alignment, 64);
  // A plan from before per-variant workspaces: each variant the whole.
  int64_t variantBytes = 0;
  ASSERT_EQ(flexExecutableGetVariantWorkspaceSize(exe, 1, &variantBytes),
            FLEX_STATUS_OK);
  EXPECT_EQ(variantBytes, bytes);
  EXPECT_EQ(flexExecutableGetVariantWorkspaceSize(exe, 2, &variantBytes),
            FLEX_STATUS_OUT_OF_RANGE);
  EXPECT_THAT(flexExecutableGetLastError(exe), HasSubstr("variant index 2"));
  EXPECT_EQ(flexExecutableGetVariantWorkspaceSize(exe, 0, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  ASSERT_EQ(flexExecutableGetRunWorkspaceSize(exe, &variantBytes),
            FLEX_STATUS_OK);
  EXPECT_EQ(variantBytes, bytes);
  EXPECT_EQ(flexExecutableGetRunWorkspaceSize(exe, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);

  ASSERT_EQ(flexExecutableGetNumVariants(exe, &count), FLEX_STATUS_OK);
  EXPECT_EQ(count, 2);
  const char *name = nullptr;
  ASSERT_EQ(flexExecutableGetVariantName(exe, 1, &name), FLEX_STATUS_OK);
  EXPECT_STREQ(name, "ragged");
  EXPECT_EQ(flexExecutableSelectVariantByName(exe, "ragged"), FLEX_STATUS_OK);
  ASSERT_EQ(flexExecutableGetSelectedVariant(exe, &index), FLEX_STATUS_OK);
  EXPECT_EQ(index, 1);
  EXPECT_EQ(flexExecutableSelectVariant(exe, 5), FLEX_STATUS_OUT_OF_RANGE);
  EXPECT_THAT(flexGetLastError(), HasSubstr("variant index 5"));
  EXPECT_EQ(flexExecutableSelectVariantByName(exe, "fast"),
            FLEX_STATUS_NOT_FOUND);
  EXPECT_THAT(flexExecutableGetLastError(exe),
              HasSubstr("no variant named 'fast'"));
  EXPECT_EQ(flexExecutableSelectVariantByName(exe, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  ASSERT_EQ(flexExecutableGetSelectedVariant(exe, &index), FLEX_STATUS_OK);
  EXPECT_EQ(index, 1);
}

TEST_F(CAPI, RunsForwardAndBackwardLikeTheReference) {
  load("ffn_fixed_train.json");
  makeBuffers();
  FlexLayerConfig layer;
  ASSERT_EQ(flexExecutableGetLayerConfig(exe, &layer), FLEX_STATUS_OK);
  const flex::LayerConfig config = flex::test::toLayerConfig(layer);

  std::mt19937_64 rng(21);
  flex::reference::LayerInputs inputs;
  for (;;) {
    inputs = flex::reference::makeRandomInputs(config, rng);
    auto forward = flex::reference::referenceForward(config, inputs);
    if (flex::reference::routingMargins(config, forward.routing).logitGap >
        1e-4)
      break;
  }
  std::vector<double> gradOut(config.tokens * config.modelDim);
  std::normal_distribution<double> normal;
  for (double &value : gradOut)
    value = static_cast<float>(normal(rng));
  auto set = [&](const char *name, const std::vector<double> &values) {
    buffers[name].assign(values.begin(), values.end());
  };
  set("x", inputs.x);
  set("wg", inputs.wg);
  set("w1", inputs.w1);
  set("b1", inputs.b1);
  set("w2", inputs.w2);
  set("b2", inputs.b2);
  set("grad_out", gradOut);
  set("grad_l_aux", {0.25});
  for (auto &[name, info] : infos)
    if (info.role == FLEX_ROLE_OUTPUT || info.role == FLEX_ROLE_GRAD_OUTPUT)
      std::fill(buffers[name].begin(), buffers[name].end(), NAN);

  std::vector<FlexBinding> all = bindings();
  FlexRunOptions options{sizeof(FlexRunOptions), FLEX_RUN_CHECK_NONFINITE,
                         nullptr};
  ASSERT_EQ(flexExecutableForward(exe, all.data(), all.size(), &options),
            FLEX_STATUS_OK)
      << flexGetLastError();
  int64_t steps = 0;
  ASSERT_EQ(flexExecutableGetNumStepTimings(exe, &steps), FLEX_STATUS_OK);
  EXPECT_EQ(steps, 7);
  const char *op = nullptr;
  double micros = -1;
  ASSERT_EQ(flexExecutableGetStepTiming(exe, 1, &op, &micros), FLEX_STATUS_OK);
  EXPECT_STREQ(op, "gate");
  EXPECT_GE(micros, 0);
  // The CPU backend runs step by step: no graph was replayed.
  int replayed = -1;
  ASSERT_EQ(flexExecutableGetLastRunReplayedGraph(exe, &replayed),
            FLEX_STATUS_OK);
  EXPECT_EQ(replayed, 0);
  EXPECT_EQ(flexExecutableGetLastRunReplayedGraph(exe, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  ASSERT_EQ(flexExecutableBackward(exe, all.data(), all.size(), nullptr),
            FLEX_STATUS_OK)
      << flexGetLastError();

  flex::reference::LayerForward forward;
  auto grads = flex::reference::referenceBackward(config, inputs, gradOut, 0.25,
                                                  {}, &forward);
  auto get = [&](const char *name) {
    return std::vector<double>(buffers[name].begin(), buffers[name].end());
  };
  EXPECT_LE(flex::reference::relativeL2(get("out"), forward.out), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("l_aux"), {forward.lAux}), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_x"), grads.x), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_wg"), grads.wg), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_w1"), grads.w1), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_b1"), grads.b1), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_w2"), grads.w2), 1e-5);
  EXPECT_LE(flex::reference::relativeL2(get("grad_b2"), grads.b2), 1e-5);
}

TEST_F(CAPI, RejectsBadRuns) {
  load("ffn_fixed_train.json");
  makeBuffers();
  std::vector<FlexBinding> good = bindings();
  auto expectFailure = [&](std::vector<FlexBinding> list, FlexStatus code,
                           const char *part,
                           const FlexRunOptions *options = nullptr) {
    EXPECT_EQ(flexExecutableForward(exe, list.data(), list.size(), options),
              code);
    EXPECT_THAT(flexGetLastError(), HasSubstr(part));
    EXPECT_THAT(flexExecutableGetLastError(exe), HasSubstr(part));
  };
  auto changed = [&](const char *name, auto change) {
    std::vector<FlexBinding> list = good;
    for (FlexBinding &binding : list)
      if (std::strcmp(binding.name, name) == 0)
        change(binding);
    return list;
  };
  expectFailure(changed("w1", [](FlexBinding &b) { b.bytes = 12; }),
                FLEX_STATUS_INVALID_ARGUMENT,
                "argument 'w1' is [4, 4, 6] f32 = 384 bytes; got 12 bytes");
  expectFailure(changed("x", [](FlexBinding &b) { b.data = nullptr; }),
                FLEX_STATUS_INVALID_ARGUMENT, "'x' has a null pointer");
  expectFailure(changed("x", [](FlexBinding &b) { b.name = "X"; }),
                FLEX_STATUS_NOT_FOUND, "'X' is not an argument of the plan");
  expectFailure(changed("x", [](FlexBinding &b) { b.name = nullptr; }),
                FLEX_STATUS_INVALID_ARGUMENT, "has a null name");
  EXPECT_EQ(flexExecutableForward(exe, good.data(), -1, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexExecutableForward(exe, nullptr, 2, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  int stream = 0;
  FlexRunOptions withStream{sizeof(FlexRunOptions), 0, &stream};
  expectFailure(good, FLEX_STATUS_UNAVAILABLE, "takes no stream", &withStream);
  FlexRunOptions tooSmall{4, 0, nullptr};
  expectFailure(good, FLEX_STATUS_INVALID_ARGUMENT, "struct_size 4", &tooSmall);
  EXPECT_EQ(flexExecutableBackward(exe, good.data(), good.size(), nullptr),
            FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(), HasSubstr("needs a forward first"));
  EXPECT_EQ(flexExecutableForward(exe, good.data(), good.size(), nullptr),
            FLEX_STATUS_OK);
  // A later success does not clear the handle's last error text, but the
  // next failure replaces it.
  buffers["x"][0] = NAN;
  FlexRunOptions check{sizeof(FlexRunOptions), FLEX_RUN_CHECK_NONFINITE,
                       nullptr};
  expectFailure(good, FLEX_STATUS_NUMERIC_ERROR,
                "input argument 'x' has NaN or Inf at element 0", &check);
}

// Per-variant workspaces through the C API: each variant's size, the size
// a caller allocating per call needs, and a per-call workspace that holds
// only the ragged variant (auto runs it; padded, named, is refused).
TEST_F(CAPI, RunsVariantsOnTheirOwnWorkspaces) {
  load("ffn_dropless_layouts_train.json");
  makeBuffers();
  int64_t whole = 0, alignment = 0, count = 0;
  ASSERT_EQ(flexExecutableGetWorkspaceSize(exe, &whole, &alignment),
            FLEX_STATUS_OK);
  ASSERT_EQ(flexExecutableGetNumVariants(exe, &count), FLEX_STATUS_OK);
  std::map<std::string, int64_t> sizes;
  for (int64_t v = 0; v < count; ++v) {
    const char *name = nullptr;
    ASSERT_EQ(flexExecutableGetVariantName(exe, v, &name), FLEX_STATUS_OK);
    ASSERT_EQ(flexExecutableGetVariantWorkspaceSize(exe, v, &sizes[name]),
              FLEX_STATUS_OK);
    EXPECT_LE(sizes[name], whole) << name;
  }
  EXPECT_EQ(sizes["padded"], whole);
  EXPECT_LT(sizes["ragged"], sizes["padded"]);
  int64_t run = 0;
  ASSERT_EQ(flexExecutableGetRunWorkspaceSize(exe, &run), FLEX_STATUS_OK);
  EXPECT_EQ(run, whole) << "auto may pick any variant";
  ASSERT_EQ(flexExecutableSelectVariantByName(exe, "ragged"), FLEX_STATUS_OK);
  ASSERT_EQ(flexExecutableGetRunWorkspaceSize(exe, &run), FLEX_STATUS_OK);
  EXPECT_EQ(run, sizes["ragged"]);

  std::vector<uint8_t> storage(sizes["ragged"] + alignment);
  void *aligned =
      storage.data() +
      (alignment - reinterpret_cast<uintptr_t>(storage.data()) % alignment);
  FlexRunOptions options{};
  options.struct_size = sizeof(FlexRunOptions);
  options.workspace = aligned;
  options.workspace_bytes = sizes["ragged"];
  std::vector<FlexBinding> list = bindings();
  ASSERT_EQ(flexExecutableSelectVariantByName(exe, "auto"), FLEX_STATUS_OK);
  for (int call = 0; call < 6; ++call) {
    ASSERT_EQ(flexExecutableForward(exe, list.data(), list.size(), &options),
              FLEX_STATUS_OK)
        << flexGetLastError();
    int64_t selected = -1;
    ASSERT_EQ(flexExecutableGetSelectedVariant(exe, &selected), FLEX_STATUS_OK);
    const char *name = nullptr;
    ASSERT_EQ(flexExecutableGetVariantName(exe, selected, &name),
              FLEX_STATUS_OK);
    EXPECT_STREQ(name, "ragged");
    ASSERT_EQ(flexExecutableBackward(exe, list.data(), list.size(), &options),
              FLEX_STATUS_OK)
        << flexGetLastError();
  }
  ASSERT_EQ(flexExecutableSelectVariantByName(exe, "padded"), FLEX_STATUS_OK);
  EXPECT_EQ(flexExecutableForward(exe, list.data(), list.size(), &options),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("variant 'padded' needs"));
  options.workspace_bytes = sizes["ragged"] - alignment;
  ASSERT_EQ(flexExecutableSelectVariantByName(exe, "ragged"), FLEX_STATUS_OK);
  EXPECT_EQ(flexExecutableForward(exe, list.data(), list.size(), &options),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("too small"));
}

TEST_F(CAPI, DetectsDestroyedHandles) {
  load("gated_bounded_infer.json");
  FlexExecutable dead = exe;
  EXPECT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
  exe = nullptr;
  EXPECT_EQ(flexExecutableDestroy(dead), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("not a live handle"));
  int64_t count = 0;
  EXPECT_EQ(flexExecutableGetNumArguments(dead, &count),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexExecutableForward(dead, nullptr, 0, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexExecutableDestroy(nullptr), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_STREQ(flexExecutableGetLastError(dead),
               "the executable is not a live handle");
}

TEST_F(CAPI, LastErrorIsPerThread) {
  load("gated_bounded_infer.json");
  EXPECT_EQ(flexExecutableSelectVariant(exe, 9), FLEX_STATUS_OUT_OF_RANGE);
  std::string mine = flexGetLastError();
  std::string theirs;
  std::thread other([&] {
    EXPECT_EQ(flexExecutableSelectVariantByName(exe, "other"),
              FLEX_STATUS_NOT_FOUND);
    theirs = flexGetLastError();
  });
  other.join();
  EXPECT_EQ(flexGetLastError(), mine);
  EXPECT_THAT(theirs, HasSubstr("no variant named 'other'"));
}

namespace {
std::string fakeCompilerPlan;

FlexStatus fakeCompileMlir(void *userData, const char *text, size_t length,
                           const FlexCompileOptions *, char **planJson,
                           char **error) {
  ++*static_cast<int *>(userData);
  if (std::string_view(text, length).find("moe.layer") ==
      std::string_view::npos) {
    *error = strdup("expected a moe.layer op");
    return FLEX_STATUS_INVALID_ARGUMENT;
  }
  *planJson = strdup(fakeCompilerPlan.c_str());
  return FLEX_STATUS_OK;
}
} // namespace

TEST_F(CAPI, CompilesThroughTheRegisteredCompiler) {
  const char mlir[] = "moe.layer ...";
  FlexExecutable compiled = nullptr;
  ASSERT_EQ(flexHasCompiler(), 0);
  EXPECT_EQ(
      flexCompileLayer(context, mlir, sizeof(mlir) - 1, nullptr, &compiled),
      FLEX_STATUS_UNAVAILABLE);
  EXPECT_THAT(flexGetLastError(), HasSubstr("no compiler is linked in"));
  FlexLayerConfig config{};
  config.tokens = config.model_dim = config.hidden_dim = config.experts = 4;
  config.top_k = 1;
  config.capacity_factor = 1.0;
  EXPECT_EQ(flexCompileLayerConfig(context, &config, nullptr, &compiled),
            FLEX_STATUS_UNAVAILABLE);

  int calls = 0;
  fakeCompilerPlan = readText("gated_bounded_infer.json");
  FlexCompilerHooks hooks{sizeof(FlexCompilerHooks), fakeCompileMlir, nullptr,
                          &calls};
  ASSERT_EQ(flexSetCompiler(&hooks), FLEX_STATUS_OK);
  EXPECT_EQ(flexHasCompiler(), 1);
  ASSERT_EQ(
      flexCompileLayer(context, mlir, sizeof(mlir) - 1, nullptr, &compiled),
      FLEX_STATUS_OK)
      << flexGetLastError();
  int64_t count = 0;
  EXPECT_EQ(flexExecutableGetNumArguments(compiled, &count), FLEX_STATUS_OK);
  EXPECT_EQ(count, 7);
  EXPECT_EQ(flexExecutableDestroy(compiled), FLEX_STATUS_OK);
  EXPECT_EQ(flexCompileLayer(context, "func", 4, nullptr, &compiled),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("expected a moe.layer op"));
  // The config entry point is not provided by this compiler.
  EXPECT_EQ(flexCompileLayerConfig(context, &config, nullptr, &compiled),
            FLEX_STATUS_UNAVAILABLE);
  EXPECT_EQ(calls, 2);
  FlexCompilerHooks old{8, nullptr, nullptr, nullptr};
  EXPECT_EQ(flexSetCompiler(&old), FLEX_STATUS_INVALID_ARGUMENT);
  ASSERT_EQ(flexSetCompiler(nullptr), FLEX_STATUS_OK);
  EXPECT_EQ(flexHasCompiler(), 0);
}

// A multi-rank plan needs a communicator of its world size; without MPI
// running, the MPI communicator is refused with a reason.
TEST_F(CAPI, ManyRanksNeedACommunicator) {
  EXPECT_STREQ(flexStatusName(FLEX_STATUS_COMMUNICATION_ERROR),
               "FLEX_STATUS_COMMUNICATION_ERROR");
  load("mr_ffn_fixed_w2_train.json");
  int32_t world = 0;
  ASSERT_EQ(flexExecutableGetWorldSize(exe, &world), FLEX_STATUS_OK);
  EXPECT_EQ(world, 2);
  makeBuffers();
  std::vector<FlexBinding> args = bindings();
  EXPECT_EQ(flexExecutableForward(exe, args.data(), args.size(), nullptr),
            FLEX_STATUS_FAILED_PRECONDITION);
  EXPECT_THAT(flexGetLastError(), HasSubstr("no communicator is set"));
  EXPECT_EQ(flexExecutableSetCommunicator(exe, nullptr), FLEX_STATUS_OK);

  FlexCommunicator comm = nullptr;
  FlexStatus status = flexCommunicatorCreateMpi(nullptr, &comm);
  if (flexHasMpi()) {
    EXPECT_EQ(status, FLEX_STATUS_FAILED_PRECONDITION);
    EXPECT_THAT(flexGetLastError(), HasSubstr("initialized first"));
  } else {
    EXPECT_EQ(status, FLEX_STATUS_UNAVAILABLE);
  }
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(flexCommunicatorDestroy(nullptr), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexCommunicatorGetRank(nullptr, nullptr, nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  int fake = 0;
  EXPECT_EQ(flexExecutableSetCommunicator(
                exe, reinterpret_cast<FlexCommunicator>(&fake)),
            FLEX_STATUS_INVALID_ARGUMENT);
}

// Collectives from the caller's functions: the creation checks, a failing
// function's message through the C API, and destroy(user) once the last
// owner (the executable) lets go.
TEST_F(CAPI, CallbackCommunicatorCarriesTheCallersCollectives) {
  struct User {
    int calls = 0, destroyed = 0;
  };
  static User user;
  user = User{};
  FlexCollectiveCallbacks callbacks{};
  callbacks.struct_size = sizeof callbacks;
  callbacks.user = &user;
  callbacks.all_to_all = [](void *u, const void *, const int64_t *,
                            const int64_t *, void *, const int64_t *,
                            const int64_t *, char *message,
                            int64_t size) -> int32_t {
    ++static_cast<User *>(u)->calls;
    std::snprintf(message, size, "the transport is down");
    return 7;
  };
  callbacks.all_gather = [](void *, const void *, int64_t, void *, char *,
                            int64_t) -> int32_t { return 0; };
  callbacks.reduce_scatter_sum = [](void *, const void *, void *, int64_t,
                                    int32_t, char *,
                                    int64_t) -> int32_t { return 0; };
  callbacks.all_reduce_max_i32 = [](void *, int32_t *, int64_t, char *,
                                    int64_t) -> int32_t { return 0; };
  callbacks.barrier = [](void *, char *, int64_t) -> int32_t { return 0; };
  callbacks.destroy = [](void *u) { ++static_cast<User *>(u)->destroyed; };

  FlexCommunicator comm = nullptr;
  EXPECT_EQ(flexCommunicatorCreateCallbacks(nullptr, 0, 2, nullptr, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  FlexCollectiveCallbacks bad = callbacks;
  bad.struct_size = 8;
  EXPECT_EQ(flexCommunicatorCreateCallbacks(&bad, 0, 2, nullptr, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("struct_size is 8"));
  bad = callbacks;
  bad.barrier = nullptr;
  EXPECT_EQ(flexCommunicatorCreateCallbacks(&bad, 0, 2, nullptr, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("callbacks->barrier is null"));
  EXPECT_EQ(flexCommunicatorCreateCallbacks(&callbacks, 3, 2, nullptr, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(user.destroyed, 0); // refused creations own nothing

  ASSERT_EQ(
      flexCommunicatorCreateCallbacks(&callbacks, 0, 2, "gloo-test", &comm),
      FLEX_STATUS_OK)
      << flexGetLastError();
  int32_t rank = -1, size = -1;
  ASSERT_EQ(flexCommunicatorGetRank(comm, &rank, &size), FLEX_STATUS_OK);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 2);
  load("mr_ffn_fixed_w2_train.json");
  ASSERT_EQ(flexExecutableSelectVariantByName(exe, "ep1"), FLEX_STATUS_OK);
  ASSERT_EQ(flexExecutableSetCommunicator(exe, comm), FLEX_STATUS_OK);
  ASSERT_EQ(flexCommunicatorDestroy(comm), FLEX_STATUS_OK);
  EXPECT_EQ(user.destroyed, 0); // the executable still holds it
  makeBuffers();
  std::vector<FlexBinding> args = bindings();
  EXPECT_EQ(flexExecutableForward(exe, args.data(), args.size(), nullptr),
            FLEX_STATUS_COMMUNICATION_ERROR);
  EXPECT_THAT(flexGetLastError(), HasSubstr("the transport is down"));
  EXPECT_THAT(flexGetLastError(), HasSubstr("gloo-test"));
  EXPECT_EQ(user.calls, 1);
  ASSERT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
  exe = nullptr;
  EXPECT_EQ(user.destroyed, 1);
}

// Runtime options: set by name with their environment variable's text,
// copied into the context, and overridden by the environment when an
// executable is created.
TEST(CAPIOptions, SetGetAndRejectBadValues) {
  FlexOptions options = nullptr;
  ASSERT_EQ(flexOptionsCreate(&options), FLEX_STATUS_OK);
  const char *value = nullptr;
  ASSERT_EQ(flexOptionsGet(options, "variant", &value), FLEX_STATUS_OK);
  EXPECT_STREQ(value, "");
  ASSERT_EQ(flexOptionsGet(options, "cuda_overlap", &value), FLEX_STATUS_OK);
  EXPECT_STREQ(value, "1");
  ASSERT_EQ(flexOptionsGet(options, "collective_timeout_s", &value),
            FLEX_STATUS_OK);
  EXPECT_STREQ(value, "300");

  EXPECT_EQ(flexOptionsSet(options, "a2a_staging", "never"), FLEX_STATUS_OK);
  ASSERT_EQ(flexOptionsGet(options, "a2a_staging", &value), FLEX_STATUS_OK);
  EXPECT_STREQ(value, "never");
  EXPECT_EQ(flexOptionsSet(options, "a2a_transport", "ce"), FLEX_STATUS_OK);
  EXPECT_EQ(flexOptionsSet(options, "collective_timeout_s", "2.5"),
            FLEX_STATUS_OK);
  ASSERT_EQ(flexOptionsGet(options, "collective_timeout_s", &value),
            FLEX_STATUS_OK);
  EXPECT_STREQ(value, "2.5");

  EXPECT_EQ(flexOptionsSet(options, "cuda_overlap", "maybe"),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("flexOptionsSet: option cuda_overlap='maybe': "
                        "expected 1 or 0"));
  EXPECT_EQ(flexOptionsSet(options, "a2a_transport", "tcp"),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("'nccl'"));
  EXPECT_EQ(flexOptionsSet(options, "collective_timeout_s", "-1"),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("seconds > 0"));
  EXPECT_EQ(flexOptionsSet(options, "speed", "fast"), FLEX_STATUS_NOT_FOUND);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("unknown runtime option 'speed'; the options are: "
                        "variant, check_nonfinite"));
  EXPECT_EQ(flexOptionsSet(options, "variant", nullptr),
            FLEX_STATUS_INVALID_ARGUMENT);
  // A rejected value leaves the option as it was.
  ASSERT_EQ(flexOptionsGet(options, "collective_timeout_s", &value),
            FLEX_STATUS_OK);
  EXPECT_STREQ(value, "2.5");

  EXPECT_EQ(flexOptionsDestroy(options), FLEX_STATUS_OK);
  EXPECT_EQ(flexOptionsDestroy(options), FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(flexOptionsSet(nullptr, "variant", "0"),
            FLEX_STATUS_INVALID_ARGUMENT);
}

TEST(CAPIOptions, TheContextsOptionsTakeEffectUnderTheEnvironment) {
  ::unsetenv("FLEX_VARIANT");
  FlexOptions options = nullptr;
  ASSERT_EQ(flexOptionsCreate(&options), FLEX_STATUS_OK);
  ASSERT_EQ(flexOptionsSet(options, "variant", "ragged"), FLEX_STATUS_OK);
  FlexContext context = nullptr;
  ASSERT_EQ(flexContextCreateWithOptions("cpu", options, &context),
            FLEX_STATUS_OK);
  // The context keeps a copy: later changes do not reach it.
  ASSERT_EQ(flexOptionsSet(options, "variant", "padded"), FLEX_STATUS_OK);
  std::string path = planPath("ffn_fixed_train.json");
  auto selected = [&](FlexContext ctx) {
    FlexExecutable exe = nullptr;
    int64_t index = -1;
    EXPECT_EQ(flexExecutableCreateFromPlanFile(ctx, path.c_str(), &exe),
              FLEX_STATUS_OK)
        << flexGetLastError();
    if (exe) {
      EXPECT_EQ(flexExecutableGetSelectedVariant(exe, &index), FLEX_STATUS_OK);
      EXPECT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
    }
    return index;
  };
  EXPECT_EQ(selected(context), 1); // "ragged", from the options

  // The environment overrides the options.
  ::setenv("FLEX_VARIANT", "0", 1);
  EXPECT_EQ(selected(context), 0);
  ::unsetenv("FLEX_VARIANT");
  EXPECT_EQ(selected(context), 1);

  // A bad value, from the options or the environment, fails the creation
  // with the name of its source and the allowed values.
  FlexExecutable exe = nullptr;
  ::setenv("FLEX_CHECK_NAN", "sometimes", 1);
  EXPECT_EQ(flexExecutableCreateFromPlanFile(context, path.c_str(), &exe),
            FLEX_STATUS_INVALID_ARGUMENT);
  ::unsetenv("FLEX_CHECK_NAN");
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("FLEX_CHECK_NAN='sometimes': expected 1 or 0"));
  EXPECT_EQ(exe, nullptr);

  FlexContext other = nullptr;
  ASSERT_EQ(flexOptionsSet(options, "variant", "r9d9"), FLEX_STATUS_OK);
  ASSERT_EQ(flexContextCreateWithOptions("cpu", options, &other),
            FLEX_STATUS_OK);
  EXPECT_EQ(flexExecutableCreateFromPlanFile(other, path.c_str(), &exe),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("option variant='r9d9' names no variant of the plan; "
                        "allowed: padded, ragged"));

  // NULL options are the defaults, as flexContextCreate.
  FlexContext plain = nullptr;
  ASSERT_EQ(flexContextCreateWithOptions(nullptr, nullptr, &plain),
            FLEX_STATUS_OK);
  EXPECT_EQ(selected(plain), 0);
  int fake = 0;
  FlexContext rejected = nullptr;
  EXPECT_EQ(flexContextCreateWithOptions(
                "cpu", reinterpret_cast<FlexOptions>(&fake), &rejected),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("flexContextCreateWithOptions: the options"));

  EXPECT_EQ(flexContextDestroy(plain), FLEX_STATUS_OK);
  EXPECT_EQ(flexContextDestroy(other), FLEX_STATUS_OK);
  EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_OK);
  EXPECT_EQ(flexOptionsDestroy(options), FLEX_STATUS_OK);
}

// The communicator creations take the options too; a bad collective
// timeout in the environment is refused before anything starts.
TEST(CAPIOptions, CommunicatorsTakeTheOptions) {
  FlexOptions options = nullptr;
  ASSERT_EQ(flexOptionsCreate(&options), FLEX_STATUS_OK);
  FlexCommunicator comm = nullptr;
  ::setenv("FLEX_COLLECTIVE_TIMEOUT_S", "soon", 1);
  EXPECT_EQ(flexCommunicatorCreateMpiWithOptions(nullptr, options, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(),
              HasSubstr("flexCommunicatorCreateMpiWithOptions: "
                        "FLEX_COLLECTIVE_TIMEOUT_S='soon'"));
  char id[128] = {0};
  EXPECT_EQ(flexCommunicatorCreateNcclWithOptions(id, 0, 1, -1, nullptr, &comm),
            FLEX_STATUS_INVALID_ARGUMENT);
  EXPECT_THAT(flexGetLastError(), HasSubstr("FLEX_COLLECTIVE_TIMEOUT_S"));
  ::unsetenv("FLEX_COLLECTIVE_TIMEOUT_S");
  EXPECT_EQ(comm, nullptr);
  // Without MPI running (or built), the options are valid and the reason is
  // MPI's.
  FlexStatus status =
      flexCommunicatorCreateMpiWithOptions(nullptr, options, &comm);
  EXPECT_EQ(status, flexHasMpi() ? FLEX_STATUS_FAILED_PRECONDITION
                                 : FLEX_STATUS_UNAVAILABLE);
  EXPECT_EQ(comm, nullptr);
  EXPECT_EQ(flexOptionsDestroy(options), FLEX_STATUS_OK);
}
