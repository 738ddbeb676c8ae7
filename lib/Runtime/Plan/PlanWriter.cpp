//===- PlanWriter.cpp - Write a plan as JSON
//--------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the JSON writer of plans: parsePlan(writePlan(p))
// gives back p.
//
//===----------------------------------------------------------------------===//

#include "PlanDetail.h"
#include "flex/Runtime/StepFacts.h"
#include "flex/Runtime/StepSchema.h"

#include <type_traits>

namespace flex {
using namespace plan_detail;
namespace {

Json writeBufferDesc(const BufferDesc &desc) {
  Json json;
  json["name"] = desc.name;
  json["dtype"] = std::string(toString(desc.dtype));
  json["shape"] = desc.shape;
  return json;
}

/// An attribute's value as the plan file spells it.
template <typename T> Json valueJson(const T &value) {
  if constexpr (std::is_enum_v<T>)
    return std::string(toString(value));
  else
    return value;
}

Json attrJson(StepAttr attr, const StepAttrs &attrs) {
  switch (attr) {
#define FLEX_STEP_ATTR(Name, spelling, field)                                  \
  case StepAttr::Name:                                                         \
    return valueJson(attrs.field);
#include "flex/Runtime/StepKinds.def"
  }
  return Json();
}

Json writeStep(const Plan &plan, const Step &step) {
  Json json;
  json["op"] = std::string(toString(step.op));
  Json in = Json::object(), out = Json::object();
  for (int r = 0; r < kNumOperandRoles; ++r) {
    std::string role(toString(static_cast<OperandRole>(r)));
    if (step.inputs[r].isValid())
      in[role] = plan.getBuffer(step.inputs[r]).name;
    if (step.outputs[r].isValid())
      out[role] = plan.getBuffer(step.outputs[r]).name;
  }
  json["in"] = std::move(in);
  json["out"] = std::move(out);
  Json attrs = Json::object();
  for (StepAttr attr : getStepKind(step.op).attrs)
    attrs[std::string(toString(attr))] = attrJson(attr, step.attrs);
  json["attrs"] = std::move(attrs);
  json["facts"] = writeStepFacts(step.facts);
  if (step.stream != 0)
    json["stream"] = step.stream;
  if (!step.wait.empty())
    json["wait"] = step.wait;
  return json;
}

} // namespace

std::string writePlan(const Plan &plan, int indent) {
  Json root;
  root["format"] = std::string(kPlanFormatName);
  root["version"] = plan.version;
  root["producer"] = plan.producer;
  const LayerConfig &l = plan.layer;
  Json layer;
  layer["tokens"] = l.tokens;
  layer["model_dim"] = l.modelDim;
  layer["hidden_dim"] = l.hiddenDim;
  layer["experts"] = l.experts;
  layer["top_k"] = l.topK;
  layer["capacity_mode"] = std::string(toString(l.capacityMode));
  layer["capacity_factor"] = l.capacityFactor;
  layer["expert_kind"] = std::string(toString(l.expertKind));
  layer["activation"] = std::string(toString(l.activation));
  layer["bias"] = l.bias;
  layer["dtype"] = std::string(toString(l.dtype));
  layer["router_fp32"] = l.routerFp32;
  layer["batch_prioritized"] = l.batchPrioritized;
  layer["normalize_gate"] = l.normalizeGate;
  layer["gate_noise"] = l.gateNoise;
  layer["seed"] = l.seed;
  root["layer"] = std::move(layer);
  if (plan.worldSize != 1)
    root["world"] = {{"size", plan.worldSize}};
  root["training"] = plan.training;
  Json arguments = Json::array();
  for (const Argument &arg : plan.arguments) {
    Json json = writeBufferDesc(arg);
    json["role"] = std::string(toString(arg.role));
    arguments.push_back(std::move(json));
  }
  root["arguments"] = std::move(arguments);
  Json workspace;
  workspace["bytes"] = plan.workspace.bytes;
  workspace["alignment"] = plan.workspace.alignment;
  Json buffers = Json::array();
  for (const WorkspaceBuffer &buffer : plan.workspace.buffers) {
    Json json = writeBufferDesc(buffer);
    json["offset"] = buffer.offset;
    json["bytes"] = buffer.bytes;
    buffers.push_back(std::move(json));
  }
  workspace["buffers"] = std::move(buffers);
  root["workspace"] = std::move(workspace);
  Json variants = Json::array();
  for (const Variant &variant : plan.variants) {
    Json json;
    json["name"] = variant.name;
    if (!variant.parallelJson.empty())
      json["parallel"] = Json::parse(variant.parallelJson, nullptr, false);
    json["predicted_us"] =
        variant.predictedUs ? Json(*variant.predictedUs) : Json(nullptr);
    json["measured_us"] =
        variant.measuredUs ? Json(*variant.measuredUs) : Json(nullptr);
    if (variant.workspaceBytes)
      json["workspace_bytes"] = *variant.workspaceBytes;
    Json forward = Json::array(), backward = Json::array();
    for (const Step &step : variant.forward)
      forward.push_back(writeStep(plan, step));
    for (const Step &step : variant.backward)
      backward.push_back(writeStep(plan, step));
    json["forward"] = std::move(forward);
    json["backward"] = std::move(backward);
    variants.push_back(std::move(json));
  }
  root["variants"] = std::move(variants);
  root["default_variant"] = plan.defaultVariant;
  return root.dump(indent);
}

} // namespace flex
