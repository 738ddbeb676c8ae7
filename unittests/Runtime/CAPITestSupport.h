//===- CAPITestSupport.h - Helpers of the C API tests -----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// What the C API tests (CPU and CUDA) share: a plan file's text, a plan
// with gate noise, and the C++ layer configuration of a C API one (for the
// fp64 reference).
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_UNITTESTS_RUNTIME_CAPITESTSUPPORT_H
#define FLEX_UNITTESTS_RUNTIME_CAPITESTSUPPORT_H

#include "flex-c/Flex.h"
#include "flex/Runtime/Core/LayerConfig.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <string>

namespace flex::test {

/// The whole text of the file at `path` ("" when it cannot be read).
inline std::string readTextFile(const std::string &path) {
  std::ifstream file(path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

/// The plan `planText` with gate noise `noise` (the layer and every gate
/// step agree, as the loader requires).
inline std::string withGateNoise(const std::string &planText, double noise) {
  auto doc = nlohmann::ordered_json::parse(planText);
  doc["layer"]["gate_noise"] = noise;
  for (auto &variant : doc["variants"])
    for (auto &step : variant["forward"])
      if (step["op"] == "gate")
        step["attrs"]["noise"] = noise;
  return doc.dump();
}

/// The C++ configuration of a C API layer configuration.
inline LayerConfig toLayerConfig(const FlexLayerConfig &layer) {
  LayerConfig config;
  config.tokens = layer.tokens;
  config.modelDim = layer.model_dim;
  config.hiddenDim = layer.hidden_dim;
  config.experts = layer.experts;
  config.topK = layer.top_k;
  config.capacityMode = static_cast<CapacityMode>(layer.capacity_mode);
  config.capacityFactor = layer.capacity_factor;
  config.expertKind = static_cast<ExpertKind>(layer.expert_kind);
  config.activation = static_cast<Activation>(layer.activation);
  config.bias = layer.bias;
  config.dtype = static_cast<DType>(layer.dtype);
  config.routerFp32 = layer.router_fp32;
  config.batchPrioritized = layer.batch_prioritized;
  config.normalizeGate = layer.normalize_gate;
  config.gateNoise = layer.gate_noise;
  config.seed = layer.seed;
  return config;
}

} // namespace flex::test

#endif // FLEX_UNITTESTS_RUNTIME_CAPITESTSUPPORT_H
