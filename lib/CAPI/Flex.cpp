//===- Flex.cpp - The C API of the Flex runtime ---------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements include/flex-c/Flex.h over the C++ runtime: versions
// and errors, contexts, executables and compiling (Options.cpp has the
// runtime options, Communicators.cpp the communicators). No C++ exception
// crosses it: each entry point catches at the boundary and turns what it
// caught into FLEX_STATUS_INTERNAL with the message.
//
//===----------------------------------------------------------------------===//

#include "flex-c/Flex.h"

#include "CAPISupport.h"

#include "flex/Runtime/Cuda/CudaBackend.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

using namespace flex;
using namespace flex::capi;

static_assert(static_cast<int>(StatusCode::CommunicationError) ==
                  FLEX_STATUS_COMMUNICATION_ERROR,
              "FlexStatus and flex::StatusCode must agree");
static_assert(static_cast<int>(StatusCode::Internal) == FLEX_STATUS_INTERNAL &&
                  static_cast<int>(StatusCode::InvalidPlan) ==
                      FLEX_STATUS_INVALID_PLAN,
              "FlexStatus and flex::StatusCode must agree");
static_assert(static_cast<int>(DType::I32) == FLEX_DTYPE_I32 &&
                  static_cast<int>(DType::BF16) == FLEX_DTYPE_BF16,
              "FlexDType and flex::DType must agree");
static_assert(static_cast<int>(ArgumentRole::GradOutput) ==
                  FLEX_ROLE_GRAD_OUTPUT,
              "FlexArgumentRole and flex::ArgumentRole must agree");

namespace {

thread_local std::string threadLastError;

} // namespace

namespace flex::capi {

HandleRegistry &registry() {
  static HandleRegistry instance;
  return instance;
}

FlexStatus fail(FlexStatus status, std::string message, FlexExecutable exe) {
  threadLastError = std::move(message);
  if (exe)
    exe->lastError = threadLastError;
  return status;
}

FlexStatus report(const Status &status, FlexExecutable exe) {
  if (status)
    return FLEX_STATUS_OK;
  return fail(static_cast<FlexStatus>(status.code()), status.message(), exe);
}

/// INVALID_ARGUMENT naming `function` unless `handle` (a `what`) is live.
FlexStatus checkHandle(const void *handle, const char *function,
                       const char *what) {
  if (!handle)
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": the " + what + " is null");
  if (!registry().contains(handle))
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": the " + what +
                    " is not a live handle (destroyed already, or not "
                    "created by flex)");
  return FLEX_STATUS_OK;
}

FlexStatus checkOut(const void *pointer, const char *function,
                    const char *what) {
  if (!pointer)
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": " + what + " is null");
  return FLEX_STATUS_OK;
}

} // namespace flex::capi

namespace {

std::mutex compilerMutex;
FlexCompilerHooks compilerHooks{};
bool haveCompiler = false;

std::string hexString(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%x", value);
  return text;
}

FlexStatus checkContext(FlexContext context, const char *function) {
  return checkHandle(context, function, "context");
}

/// Each executable gets its own backend: on CUDA its own stream state,
/// cuBLAS handle, scratch and graphs (executables may run concurrently).
Status createBackend(const FlexContextImpl &context,
                     const RuntimeOptions &options,
                     std::unique_ptr<Backend> &backend) {
  if (context.backend == "cuda")
    return createCudaBackend(backend, options);
  backend = createCpuBackend();
  return Status::ok();
}

FlexStatus createExecutable(FlexContext context, Plan plan,
                            FlexExecutable *executable, const char *function) {
  auto shared = std::make_shared<const Plan>(std::move(plan));
  RuntimeOptions options;
  if (Status status =
          RuntimeOptions::fromEnvironment(context->options, options);
      !status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  std::unique_ptr<Backend> backend;
  if (Status status = createBackend(*context, options, backend); !status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  std::unique_ptr<Executor> executor;
  Status status =
      Executor::create(shared, std::move(backend), options, executor);
  if (!status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  auto *exe = new FlexExecutableImpl;
  exe->plan = std::move(shared);
  exe->executor = std::move(executor);
  registry().add(exe);
  *executable = exe;
  return FLEX_STATUS_OK;
}

LayerConfig fromC(const FlexLayerConfig &c) {
  LayerConfig config;
  config.tokens = c.tokens;
  config.modelDim = c.model_dim;
  config.hiddenDim = c.hidden_dim;
  config.experts = c.experts;
  config.topK = c.top_k;
  config.capacityMode = static_cast<CapacityMode>(c.capacity_mode);
  config.capacityFactor = c.capacity_factor;
  config.expertKind = static_cast<ExpertKind>(c.expert_kind);
  config.activation = static_cast<Activation>(c.activation);
  config.bias = c.bias != 0;
  config.dtype = static_cast<DType>(c.dtype);
  config.routerFp32 = c.router_fp32 != 0;
  config.batchPrioritized = c.batch_prioritized != 0;
  config.normalizeGate = c.normalize_gate != 0;
  config.gateNoise = c.gate_noise;
  config.seed = c.seed;
  return config;
}

FlexLayerConfig toC(const LayerConfig &config) {
  FlexLayerConfig c{};
  c.tokens = config.tokens;
  c.model_dim = config.modelDim;
  c.hidden_dim = config.hiddenDim;
  c.experts = config.experts;
  c.top_k = config.topK;
  c.capacity_mode = static_cast<int32_t>(config.capacityMode);
  c.capacity_factor = config.capacityFactor;
  c.expert_kind = static_cast<int32_t>(config.expertKind);
  c.activation = static_cast<int32_t>(config.activation);
  c.bias = config.bias;
  c.dtype = static_cast<int32_t>(config.dtype);
  c.router_fp32 = config.routerFp32;
  c.batch_prioritized = config.batchPrioritized;
  c.normalize_gate = config.normalizeGate;
  c.gate_noise = config.gateNoise;
  c.seed = config.seed;
  return c;
}

/// The run options of `options` (NULL: the defaults), reading only the
/// fields below its struct_size, so a caller built with an older header
/// gets that header's behaviour; sets the backend's stream.
FlexStatus toRunOptions(FlexExecutable exe, const FlexRunOptions *options,
                        const char *function, RunOptions &runOptions) {
  void *stream = nullptr;
  if (options) {
    const uint32_t size = options->struct_size;
    auto has = [size](size_t offset, size_t bytes) {
      return size >= offset + bytes;
    };
    if (!has(offsetof(FlexRunOptions, flags), sizeof(uint32_t)))
      return fail(FLEX_STATUS_INVALID_ARGUMENT,
                  std::string(function) + ": options->struct_size " +
                      std::to_string(size) +
                      " is too small; set it to sizeof(FlexRunOptions)",
                  exe);
    const uint32_t flags = options->flags;
    constexpr uint32_t known = FLEX_RUN_CHECK_NONFINITE | FLEX_RUN_NO_TIMING |
                               FLEX_RUN_CUDA_GRAPH | FLEX_RUN_SEED;
    // Refused rather than ignored: a flag this library does not know asks
    // for something it would silently not do.
    if (flags & ~known)
      return fail(FLEX_STATUS_INVALID_ARGUMENT,
                  std::string(function) + ": options->flags has unknown bits " +
                      hexString(flags & ~known) +
                      " (known: FLEX_RUN_* = " + hexString(known) + ")",
                  exe);
    runOptions.checkNonFinite = flags & FLEX_RUN_CHECK_NONFINITE;
    runOptions.timeSteps = !(flags & FLEX_RUN_NO_TIMING);
    runOptions.useGraph = flags & FLEX_RUN_CUDA_GRAPH;
    if (has(offsetof(FlexRunOptions, stream), sizeof(void *)))
      stream = options->stream;
    if (has(offsetof(FlexRunOptions, workspace_bytes), sizeof(int64_t)) &&
        options->workspace) {
      if (options->workspace_bytes < 0)
        return fail(FLEX_STATUS_INVALID_ARGUMENT,
                    std::string(function) + ": options->workspace_bytes " +
                        std::to_string(options->workspace_bytes) +
                        " is negative",
                    exe);
      runOptions.workspace = options->workspace;
      runOptions.workspaceBytes = options->workspace_bytes;
    }
    if (flags & FLEX_RUN_SEED) {
      if (!has(offsetof(FlexRunOptions, seed), sizeof(uint64_t)))
        return fail(FLEX_STATUS_INVALID_ARGUMENT,
                    std::string(function) +
                        ": FLEX_RUN_SEED needs the seed field, but "
                        "options->struct_size " +
                        std::to_string(size) +
                        " ends before it; set it to sizeof(FlexRunOptions)",
                    exe);
      runOptions.seed = options->seed;
    }
  }
  // No options or no stream field: the backend's own stream (CUDA).
  if (Status status = exe->executor->backend().setStream(stream); !status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message(), exe);
  return FLEX_STATUS_OK;
}

FlexStatus run(FlexExecutable exe, bool backward, const FlexBinding *bindings,
               int64_t count, const FlexRunOptions *options,
               const char *function) {
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (count < 0)
      return fail(FLEX_STATUS_INVALID_ARGUMENT,
                  std::string(function) + ": binding count " +
                      std::to_string(count) + " is negative",
                  exe);
    if (count > 0 && !bindings)
      return fail(FLEX_STATUS_INVALID_ARGUMENT,
                  std::string(function) + ": bindings is null but count is " +
                      std::to_string(count),
                  exe);
    RunOptions runOptions;
    if (FlexStatus s = toRunOptions(exe, options, function, runOptions))
      return s;
    exe->bindings.clear();
    for (int64_t i = 0; i < count; ++i) {
      if (!bindings[i].name)
        return fail(FLEX_STATUS_INVALID_ARGUMENT,
                    std::string(function) + ": binding " + std::to_string(i) +
                        " has a null name",
                    exe);
      exe->bindings.push_back(
          {bindings[i].name, bindings[i].data, bindings[i].bytes});
    }
    Status status =
        backward ? exe->executor->backward(exe->bindings.data(),
                                           exe->bindings.size(), runOptions)
                 : exe->executor->forward(exe->bindings.data(),
                                          exe->bindings.size(), runOptions);
    if (!status)
      return fail(static_cast<FlexStatus>(status.code()),
                  std::string(function) + ": " + status.message(), exe);
    return FLEX_STATUS_OK;
  });
}

FlexStatus takeCompilerResult(FlexStatus status, char *planJson, char *error,
                              std::string &plan, const char *function) {
  std::string message = error ? error : "";
  plan = planJson ? planJson : "";
  std::free(planJson);
  std::free(error);
  if (status != FLEX_STATUS_OK)
    return fail(status, std::string(function) + ": compiler: " +
                            (message.empty() ? "failed without a message"
                                             : message));
  if (plan.empty())
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": compiler returned no plan");
  return FLEX_STATUS_OK;
}

FlexStatus noCompiler(const char *function) {
  return fail(FLEX_STATUS_UNAVAILABLE,
              std::string(function) +
                  ": no compiler is linked in: this runtime was built "
                  "without the MLIR compiler (FlexCompilerCAPI), or it was "
                  "not registered (flexCompilerRegister / flexSetCompiler). "
                  "Compile the layer to a plan file with `moe-opt "
                  "--moe-lower-to-plan layer.mlir | moe-translate "
                  "--moert-to-plan` and load the plan instead");
}

FlexStatus createContext(const char *backend, FlexOptions options,
                         FlexContext *context, const char *function) {
  if (FlexStatus s = checkOut(context, function, "context"))
    return s;
  *context = nullptr;
  if (options)
    if (FlexStatus s = checkHandle(options, function, "options"))
      return s;
  std::string name = backend ? backend : "cpu";
  if (name != "cpu" && name != "cuda")
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": unknown backend '" + name +
                    "'; the backends are: cpu, cuda");
  std::string reason;
  if (name == "cuda" && !isCudaBackendUsable(&reason))
    return fail(FLEX_STATUS_UNAVAILABLE,
                std::string(function) +
                    ": backend 'cuda' is not available: " + reason);
  auto *impl = new (std::nothrow)
      FlexContextImpl{name, options ? options->options : RuntimeOptions()};
  if (!impl)
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": out of memory");
  registry().add(impl);
  *context = impl;
  return FLEX_STATUS_OK;
}

} // namespace

extern "C" {

uint32_t flexGetVersion(void) { return FLEX_C_API_VERSION; }

uint32_t flexGetRunOptionsSize(void) { return sizeof(FlexRunOptions); }

const char *flexGetVersionString(void) {
  static const std::string text =
      "flex 0.1 (C API " + std::to_string(FLEX_C_API_VERSION) + ", plan format " +
      std::to_string(kPlanFormatVersion) + ")";
  return text.c_str();
}

const char *flexStatusName(FlexStatus status) {
  switch (status) {
  case FLEX_STATUS_OK: return "FLEX_STATUS_OK";
  case FLEX_STATUS_INVALID_ARGUMENT: return "FLEX_STATUS_INVALID_ARGUMENT";
  case FLEX_STATUS_NOT_FOUND: return "FLEX_STATUS_NOT_FOUND";
  case FLEX_STATUS_OUT_OF_RANGE: return "FLEX_STATUS_OUT_OF_RANGE";
  case FLEX_STATUS_FAILED_PRECONDITION:
    return "FLEX_STATUS_FAILED_PRECONDITION";
  case FLEX_STATUS_UNAVAILABLE: return "FLEX_STATUS_UNAVAILABLE";
  case FLEX_STATUS_NUMERIC_ERROR: return "FLEX_STATUS_NUMERIC_ERROR";
  case FLEX_STATUS_IO_ERROR: return "FLEX_STATUS_IO_ERROR";
  case FLEX_STATUS_INVALID_PLAN: return "FLEX_STATUS_INVALID_PLAN";
  case FLEX_STATUS_INTERNAL: return "FLEX_STATUS_INTERNAL";
  case FLEX_STATUS_COMMUNICATION_ERROR:
    return "FLEX_STATUS_COMMUNICATION_ERROR";
  }
  return "FLEX_STATUS_<unknown>";
}

const char *flexGetLastError(void) { return threadLastError.c_str(); }

FlexStatus flexContextCreateWithOptions(const char *backend,
                                        FlexOptions options,
                                        FlexContext *context) {
  return createContext(backend, options, context,
                       "flexContextCreateWithOptions");
}

FlexStatus flexContextCreate(const char *backend, FlexContext *context) {
  return createContext(backend, nullptr, context, "flexContextCreate");
}

FlexStatus flexContextDestroy(FlexContext context) {
  return destroyHandle(context, "flexContextDestroy", "context");
}

FlexStatus flexExecutableCreateFromPlan(FlexContext context, const char *text,
                                        size_t length,
                                        FlexExecutable *executable) {
  const char *function = "flexExecutableCreateFromPlan";
  if (FlexStatus s = checkOut(executable, function, "executable"))
    return s;
  *executable = nullptr;
  if (FlexStatus s = checkContext(context, function))
    return s;
  if (!text && length)
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": text is null");
  try {
    Plan plan;
    Status status =
        parsePlan(std::string_view(text ? text : "", text ? length : 0), plan);
    if (!status)
      return fail(static_cast<FlexStatus>(status.code()),
                  std::string(function) + ": " + status.message());
    return createExecutable(context, std::move(plan), executable, function);
  } catch (const std::exception &error) {
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": internal error: " + error.what());
  }
}

FlexStatus flexExecutableCreateFromPlanFile(FlexContext context,
                                            const char *path,
                                            FlexExecutable *executable) {
  const char *function = "flexExecutableCreateFromPlanFile";
  if (FlexStatus s = checkOut(executable, function, "executable"))
    return s;
  *executable = nullptr;
  if (FlexStatus s = checkContext(context, function))
    return s;
  if (FlexStatus s = checkOut(path, function, "path"))
    return s;
  try {
    Plan plan;
    Status status = loadPlanFile(path, plan);
    if (!status)
      return fail(static_cast<FlexStatus>(status.code()),
                  std::string(function) + ": " + status.message());
    return createExecutable(context, std::move(plan), executable, function);
  } catch (const std::exception &error) {
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": internal error: " + error.what());
  }
}

FlexStatus flexExecutableDestroy(FlexExecutable executable) {
  return destroyHandle(executable, "flexExecutableDestroy", "executable");
}

const char *flexExecutableGetLastError(FlexExecutable executable) {
  if (!executable || !registry().contains(executable))
    return "the executable is not a live handle";
  return executable->lastError.c_str();
}

FlexStatus flexExecutableGetLayerConfig(FlexExecutable exe,
                                        FlexLayerConfig *config) {
  const char *function = "flexExecutableGetLayerConfig";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(config, function, "config"))
      return s;
    *config = toC(exe->plan->layer);
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableIsTraining(FlexExecutable exe, int32_t *training) {
  const char *function = "flexExecutableIsTraining";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(training, function, "training"))
      return s;
    *training = exe->plan->training ? 1 : 0;
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetNumArguments(FlexExecutable exe, int64_t *count) {
  const char *function = "flexExecutableGetNumArguments";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(count, function, "count"))
      return s;
    *count = static_cast<int64_t>(exe->plan->arguments.size());
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetArgument(FlexExecutable exe, int64_t index,
                                     FlexArgumentInfo *info) {
  const char *function = "flexExecutableGetArgument";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(info, function, "info"))
      return s;
    int64_t count = static_cast<int64_t>(exe->plan->arguments.size());
    if (index < 0 || index >= count)
      return fail(FLEX_STATUS_OUT_OF_RANGE,
                  std::string(function) + ": argument index " +
                      std::to_string(index) + " is out of range [0, " +
                      std::to_string(count) + ")",
                  exe);
    const Argument &arg = exe->plan->arguments[index];
    *info = FlexArgumentInfo{};
    info->name = arg.name.c_str();
    info->dtype = static_cast<int32_t>(arg.dtype);
    info->role = static_cast<int32_t>(arg.role);
    info->rank = static_cast<int32_t>(arg.shape.size());
    for (size_t i = 0; i < arg.shape.size() && i < FLEX_MAX_RANK; ++i)
      info->shape[i] = arg.shape[i];
    info->bytes = arg.numBytes();
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableFindArgument(FlexExecutable exe, const char *name,
                                      int64_t *index) {
  const char *function = "flexExecutableFindArgument";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(name, function, "name"))
      return s;
    if (FlexStatus s = checkOut(index, function, "index"))
      return s;
    *index = exe->plan->findArgument(name);
    if (*index < 0)
      return fail(FLEX_STATUS_NOT_FOUND,
                  std::string(function) + ": no argument named '" + name +
                      "'",
                  exe);
    return FLEX_STATUS_OK;
  });
}

namespace {

/// OUT_OF_RANGE naming `function` unless `index` is a variant of `exe`.
FlexStatus checkVariantIndex(FlexExecutable exe, int64_t index,
                             const char *function) {
  int64_t count = static_cast<int64_t>(exe->plan->variants.size());
  if (index >= 0 && index < count)
    return FLEX_STATUS_OK;
  return fail(FLEX_STATUS_OUT_OF_RANGE,
              std::string(function) + ": variant index " +
                  std::to_string(index) + " is out of range [0, " +
                  std::to_string(count) + ")",
              exe);
}

} // namespace

FlexStatus flexExecutableGetWorkspaceSize(FlexExecutable exe, int64_t *bytes,
                                          int64_t *alignment) {
  const char *function = "flexExecutableGetWorkspaceSize";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (bytes)
      *bytes = exe->executor->workspaceBytes();
    if (alignment)
      *alignment = exe->executor->workspaceAlignment();
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetVariantWorkspaceSize(FlexExecutable exe,
                                                 int64_t index,
                                                 int64_t *bytes) {
  const char *function = "flexExecutableGetVariantWorkspaceSize";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(bytes, function, "bytes"))
      return s;
    if (FlexStatus s = checkVariantIndex(exe, index, function))
      return s;
    *bytes = exe->executor->workspaceBytes(index);
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetRunWorkspaceSize(FlexExecutable exe,
                                             int64_t *bytes) {
  const char *function = "flexExecutableGetRunWorkspaceSize";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(bytes, function, "bytes"))
      return s;
    *bytes = exe->executor->runWorkspaceBytes();
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableSetWorkspace(FlexExecutable exe, void *data,
                                      int64_t bytes) {
  return withExecutable(exe, "flexExecutableSetWorkspace", [&] {
    return report(exe->executor->setWorkspace(data, bytes), exe);
  });
}

FlexStatus flexExecutableGetNumVariants(FlexExecutable exe, int64_t *count) {
  const char *function = "flexExecutableGetNumVariants";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(count, function, "count"))
      return s;
    *count = static_cast<int64_t>(exe->plan->variants.size());
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetVariantName(FlexExecutable exe, int64_t index,
                                        const char **name) {
  const char *function = "flexExecutableGetVariantName";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(name, function, "name"))
      return s;
    if (FlexStatus s = checkVariantIndex(exe, index, function))
      return s;
    *name = exe->plan->variants[index].name.c_str();
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableSelectVariant(FlexExecutable exe, int64_t index) {
  return withExecutable(exe, "flexExecutableSelectVariant", [&] {
    return report(exe->executor->selectVariant(index), exe);
  });
}

FlexStatus flexExecutableSelectVariantByName(FlexExecutable exe,
                                             const char *name) {
  const char *function = "flexExecutableSelectVariantByName";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(name, function, "name"))
      return s;
    return report(exe->executor->selectVariant(std::string_view(name)), exe);
  });
}

FlexStatus flexExecutableGetSelectedVariant(FlexExecutable exe,
                                            int64_t *index) {
  const char *function = "flexExecutableGetSelectedVariant";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(index, function, "index"))
      return s;
    *index = exe->executor->selectedVariant();
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableExplain(FlexExecutable exe, char **json) {
  const char *function = "flexExecutableExplain";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(json, function, "json"))
      return s;
    std::string text = toJson(exe->executor->explain());
    *json = static_cast<char *>(std::malloc(text.size() + 1));
    if (!*json)
      return fail(FLEX_STATUS_INTERNAL, std::string(function) +
                                            ": out of memory",
                  exe);
    std::memcpy(*json, text.c_str(), text.size() + 1);
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableForward(FlexExecutable exe,
                                 const FlexBinding *bindings, int64_t count,
                                 const FlexRunOptions *options) {
  return run(exe, /*backward=*/false, bindings, count, options,
             "flexExecutableForward");
}

FlexStatus flexExecutableBackward(FlexExecutable exe,
                                  const FlexBinding *bindings, int64_t count,
                                  const FlexRunOptions *options) {
  return run(exe, /*backward=*/true, bindings, count, options,
             "flexExecutableBackward");
}

FlexStatus flexExecutableGetNumStepTimings(FlexExecutable exe,
                                           int64_t *count) {
  const char *function = "flexExecutableGetNumStepTimings";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(count, function, "count"))
      return s;
    *count = static_cast<int64_t>(exe->executor->lastRunStats().steps.size());
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetStepTiming(FlexExecutable exe, int64_t index,
                                       const char **op, double *micros) {
  const char *function = "flexExecutableGetStepTiming";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    const auto &steps = exe->executor->lastRunStats().steps;
    int64_t count = static_cast<int64_t>(steps.size());
    if (index < 0 || index >= count)
      return fail(FLEX_STATUS_OUT_OF_RANGE,
                  std::string(function) + ": step index " +
                      std::to_string(index) + " is out of range [0, " +
                      std::to_string(count) + ")",
                  exe);
    // Names are static strings of the op table, NUL-terminated.
    if (op)
      *op = toString(steps[index].op).data();
    if (micros)
      *micros = steps[index].micros;
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetLastRunMicros(FlexExecutable exe,
                                          double *micros) {
  const char *function = "flexExecutableGetLastRunMicros";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(micros, function, "micros"))
      return s;
    *micros = exe->executor->lastRunStats().totalMicros;
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexExecutableGetLastRunReplayedGraph(FlexExecutable exe,
                                                 int *replayed) {
  const char *function = "flexExecutableGetLastRunReplayedGraph";
  return withExecutable(exe, function, [&]() -> FlexStatus {
    if (FlexStatus s = checkOut(replayed, function, "replayed"))
      return s;
    *replayed = exe->executor->lastRunStats().replayedGraph ? 1 : 0;
    return FLEX_STATUS_OK;
  });
}

FlexStatus flexSetCompiler(const FlexCompilerHooks *hooks) {
  std::lock_guard<std::mutex> lock(compilerMutex);
  if (!hooks) {
    compilerHooks = {};
    haveCompiler = false;
    return FLEX_STATUS_OK;
  }
  if (hooks->struct_size < sizeof(FlexCompilerHooks))
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                "flexSetCompiler: hooks->struct_size " +
                    std::to_string(hooks->struct_size) +
                    " is smaller than this runtime's FlexCompilerHooks (" +
                    std::to_string(sizeof(FlexCompilerHooks)) + ")");
  compilerHooks = *hooks;
  haveCompiler = true;
  return FLEX_STATUS_OK;
}

int32_t flexHasCompiler(void) {
  std::lock_guard<std::mutex> lock(compilerMutex);
  return haveCompiler ? 1 : 0;
}

FlexStatus flexCompileLayerToPlan(const char *mlirText, size_t length,
                                  const FlexCompileOptions *options,
                                  char **planJson) {
  const char *function = "flexCompileLayerToPlan";
  if (FlexStatus s = checkOut(planJson, function, "plan_json"))
    return s;
  *planJson = nullptr;
  if (FlexStatus s = checkOut(mlirText, function, "mlir_text"))
    return s;
  FlexCompilerHooks hooks;
  {
    std::lock_guard<std::mutex> lock(compilerMutex);
    if (!haveCompiler || !compilerHooks.compile_mlir)
      return noCompiler(function);
    hooks = compilerHooks;
  }
  char *json = nullptr, *error = nullptr;
  FlexStatus status = hooks.compile_mlir(hooks.user_data, mlirText, length,
                                         options, &json, &error);
  std::string plan;
  if (FlexStatus s = takeCompilerResult(status, json, error, plan, function))
    return s;
  *planJson = static_cast<char *>(std::malloc(plan.size() + 1));
  if (!*planJson)
    return fail(FLEX_STATUS_INTERNAL, std::string(function) + ": out of memory");
  std::memcpy(*planJson, plan.c_str(), plan.size() + 1);
  return FLEX_STATUS_OK;
}

FlexStatus flexCompileLayer(FlexContext context, const char *mlirText,
                            size_t length, const FlexCompileOptions *options,
                            FlexExecutable *executable) {
  const char *function = "flexCompileLayer";
  if (FlexStatus s = checkOut(executable, function, "executable"))
    return s;
  *executable = nullptr;
  if (FlexStatus s = checkContext(context, function))
    return s;
  char *plan = nullptr;
  if (FlexStatus s = flexCompileLayerToPlan(mlirText, length, options, &plan))
    return fail(s, std::string(threadLastError));
  FlexStatus status =
      flexExecutableCreateFromPlan(context, plan, std::strlen(plan), executable);
  std::free(plan);
  return status;
}

FlexStatus flexCompileLayerConfig(FlexContext context,
                                  const FlexLayerConfig *config,
                                  const FlexCompileOptions *options,
                                  FlexExecutable *executable) {
  const char *function = "flexCompileLayerConfig";
  if (FlexStatus s = checkOut(executable, function, "executable"))
    return s;
  *executable = nullptr;
  if (FlexStatus s = checkContext(context, function))
    return s;
  if (FlexStatus s = checkOut(config, function, "config"))
    return s;
  if (std::optional<std::string> error = verifyLayerConfig(fromC(*config)))
    return fail(FLEX_STATUS_INVALID_ARGUMENT,
                std::string(function) + ": " + *error);
  FlexCompilerHooks hooks;
  {
    std::lock_guard<std::mutex> lock(compilerMutex);
    if (!haveCompiler || !compilerHooks.compile_config)
      return noCompiler(function);
    hooks = compilerHooks;
  }
  char *json = nullptr, *error = nullptr;
  FlexStatus status =
      hooks.compile_config(hooks.user_data, config, options, &json, &error);
  std::string plan;
  if (FlexStatus s = takeCompilerResult(status, json, error, plan, function))
    return s;
  return flexExecutableCreateFromPlan(context, plan.data(), plan.size(),
                                      executable);
}

void flexFreeString(char *text) { std::free(text); }

} // extern "C"
