//===- CompilerCAPI.cpp - Register the compiler with the C API ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements flexCompilerRegister(): it gives the runtime's C API
// (which has no MLIR in it) the compile hooks of this library.
//
//===----------------------------------------------------------------------===//

#include "flex-c/Flex.h"
#include "flex/Compiler/Compiler.h"

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {
char *copyString(const std::string &text) {
  char *copy = static_cast<char *>(std::malloc(text.size() + 1));
  if (copy)
    std::memcpy(copy, text.c_str(), text.size() + 1);
  return copy;
}

flex::CompileOptions readOptions(const FlexCompileOptions *options) {
  flex::CompileOptions compile;
  if (options && options->struct_size >= sizeof(FlexCompileOptions))
    compile.training = options->training != 0;
  return compile;
}

/// Runs the compiler; no C++ exception crosses the C boundary.
FlexStatus compile(std::string_view text, const FlexCompileOptions *options,
                   char **planJson, char **error) {
  if (options && options->struct_size >= sizeof(FlexCompileOptions) &&
      options->world_size > 1) {
    *error = copyString("[plan-3] compiling for " +
                        std::to_string(options->world_size) +
                        " ranks is not supported yet: the parallelizing "
                        "passes come with multi-rank support");
    return FLEX_STATUS_UNAVAILABLE;
  }
  std::string plan, message;
  try {
    if (!flex::compileLayerToPlan(text, readOptions(options), plan, message)) {
      *error = copyString(message.empty() ? "compilation failed" : message);
      return FLEX_STATUS_INVALID_ARGUMENT;
    }
  } catch (const std::exception &e) {
    *error = copyString(std::string("internal compiler error: ") + e.what());
    return FLEX_STATUS_INTERNAL;
  }
  *planJson = copyString(plan);
  return *planJson ? FLEX_STATUS_OK : FLEX_STATUS_INTERNAL;
}

FlexStatus compileMlir(void *, const char *mlirText, size_t length,
                       const FlexCompileOptions *options, char **planJson,
                       char **error) {
  return compile(std::string_view(mlirText, length), options, planJson, error);
}

FlexStatus compileConfig(void *, const FlexLayerConfig *c,
                         const FlexCompileOptions *options, char **planJson,
                         char **error) {
  flex::LayerConfig config;
  config.tokens = c->tokens;
  config.modelDim = c->model_dim;
  config.hiddenDim = c->hidden_dim;
  config.experts = c->experts;
  config.topK = c->top_k;
  config.capacityMode = static_cast<flex::CapacityMode>(c->capacity_mode);
  config.capacityFactor = c->capacity_factor;
  config.expertKind = static_cast<flex::ExpertKind>(c->expert_kind);
  config.activation = static_cast<flex::Activation>(c->activation);
  config.bias = c->bias != 0;
  config.dtype = static_cast<flex::DType>(c->dtype);
  config.routerFp32 = c->router_fp32 != 0;
  config.batchPrioritized = c->batch_prioritized != 0;
  config.normalizeGate = c->normalize_gate != 0;
  config.gateNoise = c->gate_noise;
  config.seed = c->seed;
  return compile(flex::layerConfigToMlir(config), options, planJson, error);
}
} // namespace

extern "C" FlexStatus flexCompilerRegister(void) {
  FlexCompilerHooks hooks{};
  hooks.struct_size = sizeof(FlexCompilerHooks);
  hooks.compile_mlir = compileMlir;
  hooks.compile_config = compileConfig;
  return flexSetCompiler(&hooks);
}
