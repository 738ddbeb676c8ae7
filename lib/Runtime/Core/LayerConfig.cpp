//===- LayerConfig.cpp - The configuration of one MoE layer ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the checks and the spellings of flex::LayerConfig
// (the static capacity bound is in Core/Capacity.h).
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Core/Capacity.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace flex {

std::optional<std::string> verifyLayerConfig(const LayerConfig &config) {
  std::ostringstream message;
  auto positive = [&](const char *field, int64_t value) {
    if (value > 0)
      return true;
    message << "[layer] " << field << " must be positive, got " << value;
    return false;
  };
  if (!positive("tokens", config.tokens) ||
      !positive("model_dim", config.modelDim) ||
      !positive("hidden_dim", config.hiddenDim) ||
      !positive("experts", config.experts))
    return message.str();
  if (config.topK < 1 || config.topK > config.experts) {
    message << "[gate-2] top_k must be in 1..experts (" << config.experts
            << "), got " << config.topK;
    return message.str();
  }
  if (config.capacityMode != CapacityMode::Dropless &&
      !(config.capacityFactor > 0.0 && std::isfinite(config.capacityFactor))) {
    message << "[cap-1] capacity_factor must be a finite number > 0 for "
               "capacity_mode '"
            << toString(config.capacityMode) << "', got "
            << config.capacityFactor;
    return message.str();
  }
  if (config.expertKind == ExpertKind::Gated && config.bias) {
    message << "[expert-1] a gated (SwiGLU) expert has no bias; set bias to "
               "false";
    return message.str();
  }
  if (config.dtype == DType::I32) {
    message << "[layer] dtype must be f32, bf16 or f16, got i32";
    return message.str();
  }
  if (!(config.gateNoise >= 0.0 && std::isfinite(config.gateNoise))) {
    message << "[gate-1] gate_noise must be a finite number >= 0, got "
            << config.gateNoise;
    return message.str();
  }
  // As the compiler's verifier: C = 0 would drop every token and the layer
  // would output zeros. (The kernels still handle C = 0: all slots dropped.)
  if (config.capacityMode != CapacityMode::Dropless &&
      staticCapacityBound(config) == 0) {
    message << "[cap-1] capacity factor " << config.capacityFactor
            << " gives capacity 0 (k * int(f * ceil(T/E)) with T = "
            << config.tokens << ", E = " << config.experts
            << ", k = " << config.topK
            << "): every token would be dropped; raise the factor";
    return message.str();
  }
  // Routing buffers are i32: capacity, locations and the rows of both
  // layouts (padded E * C, ragged T * k) must fit.
  constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
  int64_t bound = staticCapacityBound(config);
  if (bound > kI32Max || bound > kI32Max / config.experts) {
    message << "[cap-1] the capacity bound " << bound << " times experts "
            << config.experts << " exceeds the i32 range of the routing "
            << "buffers; lower capacity_factor or tokens";
    return message.str();
  }
  if (config.tokens > kI32Max / config.topK) {
    message << "[cap-1] tokens * top_k = " << config.tokens << " * "
            << config.topK << " exceeds the i32 range of the routing buffers";
    return message.str();
  }
  return std::nullopt;
}

size_t dtypeSize(DType type) {
  switch (type) {
  case DType::F32:
  case DType::I32:
    return 4;
  case DType::BF16:
  case DType::F16:
    return 2;
  }
  return 0;
}

std::string_view toString(DType type) {
  switch (type) {
  case DType::F32:
    return "f32";
  case DType::BF16:
    return "bf16";
  case DType::F16:
    return "f16";
  case DType::I32:
    return "i32";
  }
  return "?";
}

std::string_view toString(CapacityMode mode) {
  switch (mode) {
  case CapacityMode::Fixed:
    return "fixed";
  case CapacityMode::Dropless:
    return "dropless";
  case CapacityMode::Bounded:
    return "bounded";
  }
  return "?";
}

std::string_view toString(ExpertKind kind) {
  switch (kind) {
  case ExpertKind::FFN:
    return "ffn";
  case ExpertKind::Gated:
    return "gated";
  }
  return "?";
}

std::string_view toString(Activation act) {
  switch (act) {
  case Activation::Relu:
    return "relu";
  case Activation::Gelu:
    return "gelu";
  case Activation::Silu:
    return "silu";
  }
  return "?";
}

std::optional<DType> parseDType(std::string_view text) {
  for (DType type : {DType::F32, DType::BF16, DType::F16, DType::I32})
    if (text == toString(type))
      return type;
  return std::nullopt;
}

std::optional<CapacityMode> parseCapacityMode(std::string_view text) {
  for (CapacityMode mode :
       {CapacityMode::Fixed, CapacityMode::Dropless, CapacityMode::Bounded})
    if (text == toString(mode))
      return mode;
  return std::nullopt;
}

std::optional<ExpertKind> parseExpertKind(std::string_view text) {
  for (ExpertKind kind : {ExpertKind::FFN, ExpertKind::Gated})
    if (text == toString(kind))
      return kind;
  return std::nullopt;
}

std::optional<Activation> parseActivation(std::string_view text) {
  for (Activation act : {Activation::Relu, Activation::Gelu, Activation::Silu})
    if (text == toString(act))
      return act;
  return std::nullopt;
}

} // namespace flex
