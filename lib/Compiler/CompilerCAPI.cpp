//===- CompilerCAPI.cpp - Register the compiler with the C API ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the compile hooks the runtime's C API calls
// (flexCompilerGetHooks, include/flex-c/FlexCompiler.h). It uses no function
// of the C API, so the shared compiler library needs no libflex.so;
// flexCompilerRegister lives in CompilerRegister.cpp (linked with the C API)
// and CompilerRegisterDynamic.cpp (libflex_compiler.so).
//
//===----------------------------------------------------------------------===//

#include "flex-c/FlexCompiler.h"
#include "flex/Compiler/Compiler.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string_view>

namespace {
char *copyString(const std::string &text) {
  char *copy = static_cast<char *>(std::malloc(text.size() + 1));
  if (copy)
    std::memcpy(copy, text.c_str(), text.size() + 1);
  return copy;
}

/// The compile options of the C API: `world_size` ranks, and in `pipeline`
/// space-separated options: `variants=r1d1,r1d2,...`,
/// `layouts=padded,ragged,aligned`, `ranks_per_node=N` (the 2DH exchange),
/// `fuse_dispatch=true|false` (the gather-fused variants),
/// `fuse_glu=true|false` (the glu-fused variants) and `source=NAME`, the name
/// diagnostics give the text (docs/CAPI.md). `source=` takes the rest of the
/// text, as a file name may hold spaces, so it comes last.
bool readOptions(const FlexCompileOptions *options, flex::CompileOptions &out,
                 std::string &error) {
  if (!options || options->struct_size < sizeof(FlexCompileOptions))
    return true;
  out.training = options->training != 0;
  out.ranks = std::max<int64_t>(1, options->world_size);
  if (!options->pipeline)
    return true;
  std::string_view text(options->pipeline);
  constexpr std::string_view variantsKey = "variants=", layoutsKey = "layouts=",
                             nodeKey = "ranks_per_node=", sourceKey = "source=",
                             fuseKey = "fuse_dispatch=",
                             fuseGluKey = "fuse_glu=",
                             fuseCombineKey = "fuse_combine=",
                             fuseBackwardKey = "fuse_activation_backward=";
  auto list = [](std::string_view option, std::vector<std::string> &out) {
    while (!option.empty()) {
      size_t comma = option.find(',');
      out.emplace_back(option.substr(0, comma));
      if (comma == std::string_view::npos)
        break;
      option.remove_prefix(comma + 1);
    }
  };
  auto starts = [](std::string_view text, std::string_view key) {
    return text.substr(0, key.size()) == key;
  };
  // `key` true|false into `flag`; false with `error` set on another value.
  auto readFlag = [&](std::string_view option, std::string_view key,
                      std::optional<bool> &flag) {
    std::string_view value = option.substr(key.size());
    if (value != "true" && value != "false") {
      error = "compile option '" + std::string(key.substr(0, key.size() - 1)) +
              "' needs true or false, got '" + std::string(value) + "'";
      return false;
    }
    flag = value == "true";
    return true;
  };
  while (!text.empty()) {
    if (starts(text, sourceKey)) {
      out.sourceName = std::string(text.substr(sourceKey.size()));
      return true;
    }
    std::string_view option = text.substr(0, text.find(' '));
    text.remove_prefix(std::min(text.size(), option.size() + 1));
    if (starts(option, variantsKey)) {
      list(option.substr(variantsKey.size()), out.variants);
    } else if (starts(option, layoutsKey)) {
      list(option.substr(layoutsKey.size()), out.layouts);
    } else if (starts(option, nodeKey)) {
      std::string number(option.substr(nodeKey.size()));
      char *end = nullptr;
      long long value = std::strtoll(number.c_str(), &end, 10);
      if (number.empty() || *end || value < 1) {
        error = "compile option 'ranks_per_node' needs an integer >= 1, got '" +
                number + "'";
        return false;
      }
      out.ranksPerNode = value;
    } else if (starts(option, fuseKey)) {
      if (!readFlag(option, fuseKey, out.fuseDispatch))
        return false;
    } else if (starts(option, fuseGluKey)) {
      if (!readFlag(option, fuseGluKey, out.fuseGlu))
        return false;
    } else if (starts(option, fuseCombineKey)) {
      if (!readFlag(option, fuseCombineKey, out.fuseCombine))
        return false;
    } else if (starts(option, fuseBackwardKey)) {
      if (!readFlag(option, fuseBackwardKey, out.fuseActivationBackward))
        return false;
    } else {
      error = "unknown compile option '" + std::string(option) +
              "'; the options are variants=r<R>d<D>,..., "
              "layouts=padded,ragged,aligned, ranks_per_node=N, "
              "fuse_dispatch=true|false, fuse_glu=true|false, "
              "fuse_combine=true|false, "
              "fuse_activation_backward=true|false and source=NAME";
      return false;
    }
  }
  return true;
}

/// Runs the compiler; no C++ exception crosses the C boundary.
FlexStatus compile(std::string_view text, const FlexCompileOptions *options,
                   char **planJson, char **error) {
  std::string plan, message;
  flex::CompileOptions compile;
  if (!readOptions(options, compile, message)) {
    *error = copyString(message);
    return FLEX_STATUS_INVALID_ARGUMENT;
  }
  try {
    if (!flex::compileLayerToPlan(text, compile, plan, message)) {
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

extern "C" uint32_t flexCompilerGetVersion(void) { return FLEX_C_API_VERSION; }

extern "C" FlexStatus flexCompilerGetHooks(FlexCompilerHooks *hooks) {
  if (!hooks || hooks->struct_size < sizeof(FlexCompilerHooks))
    return FLEX_STATUS_INVALID_ARGUMENT;
  *hooks = FlexCompilerHooks{};
  hooks->struct_size = sizeof(FlexCompilerHooks);
  hooks->compile_mlir = compileMlir;
  hooks->compile_config = compileConfig;
  return FLEX_STATUS_OK;
}
