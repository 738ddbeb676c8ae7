//===- PlanReader.cpp - Read a plan from JSON
//-------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the JSON reader of plans. Errors inside the reader are
// thrown as PlanError and turned into a Status at the boundary (parsePlan);
// nothing escapes it, not even nlohmann's own exceptions or bad_alloc from
// an absurd document.
//
//===----------------------------------------------------------------------===//

#include "PlanDetail.h"
#include "flex/Runtime/StepFacts.h"
#include "flex/Runtime/StepSchema.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace flex {
using namespace plan_detail;
namespace {

LayerConfig readLayer(const Json &json, const std::string &path) {
  expectObject(json, path);
  LayerConfig layer;
  auto intField = [&](const char *key) {
    return asInt(field(json, path, key), path + "." + key);
  };
  auto boolField = [&](const char *key) {
    return asBool(field(json, path, key), path + "." + key);
  };
  layer.tokens = intField("tokens");
  layer.modelDim = intField("model_dim");
  layer.hiddenDim = intField("hidden_dim");
  layer.experts = intField("experts");
  layer.topK = intField("top_k");
  layer.capacityMode = asEnum<CapacityMode>(
      field(json, path, "capacity_mode"), path + ".capacity_mode",
      parseCapacityMode, {"fixed", "dropless", "bounded"});
  // Unused by dropless; optional there.
  if (const Json *factor = optionalField(json, "capacity_factor"))
    layer.capacityFactor = asNumber(*factor, path + ".capacity_factor");
  else if (layer.capacityMode != CapacityMode::Dropless)
    fail(path + ".capacity_factor",
         "missing (required for capacity_mode '" +
             std::string(toString(layer.capacityMode)) + "')");
  layer.expertKind = asEnum<ExpertKind>(field(json, path, "expert_kind"),
                                        path + ".expert_kind", parseExpertKind,
                                        {"ffn", "gated"});
  // FFN only; a gated layer may leave them out.
  if (const Json *act = optionalField(json, "activation"))
    layer.activation = asEnum<Activation>(
        *act, path + ".activation", parseActivation, {"relu", "gelu", "silu"});
  else if (layer.expertKind == ExpertKind::FFN)
    fail(path + ".activation", "missing (required for expert_kind 'ffn')");
  if (const Json *bias = optionalField(json, "bias"))
    layer.bias = asBool(*bias, path + ".bias");
  else if (layer.expertKind == ExpertKind::FFN)
    fail(path + ".bias", "missing (required for expert_kind 'ffn')");
  layer.dtype = asDType(field(json, path, "dtype"), path + ".dtype");
  layer.routerFp32 = boolField("router_fp32");
  layer.batchPrioritized = boolField("batch_prioritized");
  layer.normalizeGate = boolField("normalize_gate");
  layer.gateNoise =
      asNumber(field(json, path, "gate_noise"), path + ".gate_noise");
  layer.seed = asUnsigned(field(json, path, "seed"), path + ".seed");
  return layer;
}

std::vector<int64_t> readShape(const Json &json, const std::string &path) {
  expectArray(json, path);
  if (json.empty() || json.size() > 8)
    fail(path, "rank " + std::to_string(json.size()) +
                   " is not supported; allowed: 1 to 8 dims");
  std::vector<int64_t> shape;
  for (size_t i = 0; i < json.size(); ++i) {
    std::string dimPath = path + "[" + std::to_string(i) + "]";
    int64_t dim = asInt(json[i], dimPath);
    if (dim < 0)
      fail(dimPath, "dim " + std::to_string(dim) + " is negative");
    shape.push_back(dim);
  }
  return shape;
}

void readBufferDesc(const Json &json, const std::string &path,
                    BufferDesc &desc) {
  expectObject(json, path);
  desc.name = asString(field(json, path, "name"), path + ".name");
  if (desc.name.empty())
    fail(path + ".name", "empty buffer name");
  desc.dtype = asDType(field(json, path, "dtype"), path + ".dtype");
  desc.shape = readShape(field(json, path, "shape"), path + ".shape");
}

// One reader per attribute type; StepKinds.def says which field an
// attribute fills, and the field's type picks the reader.
void readValue(const Json &v, const std::string &path, int64_t &field) {
  field = asInt(v, path);
}
void readValue(const Json &v, const std::string &path, uint64_t &field) {
  field = asUnsigned(v, path);
}
void readValue(const Json &v, const std::string &path, double &field) {
  field = asNumber(v, path);
}
void readValue(const Json &v, const std::string &path, bool &field) {
  field = asBool(v, path);
}
void readValue(const Json &v, const std::string &path, CapacityMode &field) {
  field = asEnum<CapacityMode>(v, path, parseCapacityMode,
                               {"fixed", "dropless", "bounded"});
}
void readValue(const Json &v, const std::string &path, DispatchLayout &field) {
  field = asEnum<DispatchLayout>(v, path, parseDispatchLayout,
                                 {"padded", "ragged", "aligned"});
}
void readValue(const Json &v, const std::string &path, Epilogue &field) {
  field = asEnum<Epilogue>(v, path, parseEpilogue,
                           {"none", "relu", "gelu", "silu"});
}
void readValue(const Json &v, const std::string &path, Activation &field) {
  field =
      asEnum<Activation>(v, path, parseActivation, {"relu", "gelu", "silu"});
}
void readValue(const Json &v, const std::string &path,
               AllToAllDirection &field) {
  field = asEnum<AllToAllDirection>(v, path, parseAllToAllDirection,
                                    {"dispatch", "combine"});
}

void readAttr(StepAttr attr, const Json &value, const std::string &path,
              StepAttrs &attrs) {
  switch (attr) {
#define FLEX_STEP_ATTR(Name, spelling, field)                                  \
  case StepAttr::Name:                                                         \
    readValue(value, path, attrs.field);                                       \
    break;
#include "flex/Runtime/StepKinds.def"
  }
}

/// The ranges an attribute has whatever the plan; the rules that relate it
/// to the layer and the world are the verifier's (StepShapeRules.cpp).
void checkAttrRange(StepAttr attr, const Json &value, const std::string &path,
                    const StepAttrs &attrs) {
  if (attr == StepAttr::CapacityAlignment &&
      (attrs.capacityAlignment < 1 || attrs.capacityAlignment > (1 << 20)))
    fail(path, "alignment " + std::to_string(attrs.capacityAlignment) +
                   " is out of range; allowed: 1 to 2^20");
  if (attr == StepAttr::BiasScale &&
      (!(attrs.biasScale > 0.0) || !std::isfinite(attrs.biasScale)))
    fail(path, "bias_scale " + brief(value) +
                   " is out of range; allowed: a finite number > 0");
}

/// The `attrs` object of a step: exactly the attributes its kind declares
/// (StepKinds.def), each one present.
StepAttrs readAttrs(const Json *json, const std::string &path, StepOp op) {
  const StepKindInfo &kind = getStepKind(op);
  StepAttrs attrs;
  static const Json empty = Json::object();
  if (json)
    expectObject(*json, path);
  const Json &object = json ? *json : empty;
  auto allowed = [&] {
    std::vector<std::string_view> names;
    for (StepAttr attr : kind.attrs)
      names.push_back(toString(attr));
    return names.empty() ? std::string("none") : joinNames(names);
  };
  for (auto it = object.begin(); it != object.end(); ++it) {
    std::optional<StepAttr> attr = parseStepAttr(it.key());
    if (!attr || !kind.takesAttr(*attr))
      fail(path + "." + it.key(), "op '" + std::string(kind.name) +
                                      "' takes no " + it.key() +
                                      " attribute; allowed: " + allowed());
  }
  for (StepAttr attr : kind.attrs) {
    std::string at = path + "." + std::string(toString(attr));
    const Json *value =
        optionalField(object, std::string(toString(attr)).c_str());
    if (!value)
      fail(at, "missing (required by op '" + std::string(kind.name) +
                   "'); format 2 requires every attribute a step kind "
                   "takes, and op '" +
                   std::string(kind.name) + "' takes " + allowed());
    readAttr(attr, *value, at, attrs);
    checkAttrRange(attr, *value, at, attrs);
  }
  return attrs;
}

struct NameTable {
  const Plan &plan;
  BufferRef resolve(const Json &json, const std::string &path) const {
    std::string name = asString(json, path);
    BufferRef ref = plan.findBuffer(name);
    if (!ref.isValid())
      fail(path, "buffer '" + name +
                     "' is defined by no argument and no workspace buffer");
    return ref;
  }
};

void readOperands(const Json *json, const std::string &path,
                  const NameTable &names, StepOp op, bool isInput,
                  std::array<BufferRef, kNumOperandRoles> &operands) {
  const StepSignature &sig = getStepSignature(op);
  const auto &required = isInput ? sig.requiredInputs : sig.requiredOutputs;
  const auto &optional = isInput ? sig.optionalInputs : sig.optionalOutputs;
  auto allowedNames = [&] {
    std::vector<std::string_view> all;
    for (OperandRole role : required)
      all.push_back(toString(role));
    for (OperandRole role : optional)
      all.push_back(toString(role));
    return joinNames(all);
  };
  if (json) {
    expectObject(*json, path);
    for (auto it = json->begin(); it != json->end(); ++it) {
      std::string rolePath = path + "." + it.key();
      std::optional<OperandRole> role = parseOperandRole(it.key());
      bool known = role && (std::find(required.begin(), required.end(),
                                      *role) != required.end() ||
                            std::find(optional.begin(), optional.end(),
                                      *role) != optional.end());
      if (!known)
        fail(rolePath, "op '" + std::string(toString(op)) + "' has no " +
                           (isInput ? "input" : "output") + " role '" +
                           it.key() + "'; allowed: " + allowedNames());
      operands[static_cast<int>(*role)] = names.resolve(it.value(), rolePath);
    }
  }
  for (OperandRole role : required)
    if (!operands[static_cast<int>(role)].isValid())
      fail(path + "." + std::string(toString(role)),
           "missing (required by op '" + std::string(toString(op)) + "')");
}

/// The op of a step, one of the kinds StepKinds.def declares.
StepOp readStepOp(const Json &json, const std::string &path) {
  std::string text = asString(json, path);
  if (std::optional<StepOp> op = parseStepOp(text))
    return *op;
  std::vector<std::string_view> names;
  for (int i = 0; i < kNumStepOps; ++i)
    names.push_back(toString(static_cast<StepOp>(i)));
  fail(path, "unknown value '" + text + "'; allowed: " + joinNames(names));
}

/// Reads one step; sets `sawFacts` when it records its facts.
Step readStep(const Json &json, const std::string &path, const NameTable &names,
              bool &sawFacts) {
  expectObject(json, path);
  Step step;
  step.op = readStepOp(field(json, path, "op"), path + ".op");
  readOperands(optionalField(json, "in"), path + ".in", names, step.op,
               /*isInput=*/true, step.inputs);
  readOperands(optionalField(json, "out"), path + ".out", names, step.op,
               /*isInput=*/false, step.outputs);
  step.attrs =
      readAttrs(optionalField(json, "attrs"), path + ".attrs", step.op);
  if (const Json *facts = optionalField(json, "facts")) {
    try {
      step.facts = readStepFacts(*facts, path + ".facts");
    } catch (const StepFactsError &error) {
      throw PlanError{error.what()};
    }
    sawFacts = true;
  }
  if (const Json *stream = optionalField(json, "stream")) {
    int64_t value = asInt(*stream, path + ".stream");
    if (value < 0 || value > std::numeric_limits<int32_t>::max())
      fail(path + ".stream", "stream " + std::to_string(value) +
                                 " is out of range; allowed: 0 to 2^31-1");
    step.stream = static_cast<int32_t>(value);
  }
  if (const Json *wait = optionalField(json, "wait")) {
    expectArray(*wait, path + ".wait");
    for (size_t i = 0; i < wait->size(); ++i) {
      std::string at = path + ".wait[" + std::to_string(i) + "]";
      int64_t value = asInt((*wait)[i], at);
      if (value < 0 || value > std::numeric_limits<int32_t>::max())
        fail(at, "step index " + std::to_string(value) + " is out of range");
      step.wait.push_back(static_cast<int32_t>(value));
    }
  }
  return step;
}

std::optional<double> readMicros(const Json &json, const char *key,
                                 const std::string &path) {
  if (const Json *value = optionalField(json, key))
    return asNumber(*value, path + "." + key);
  return std::nullopt;
}

} // namespace

void plan_detail::readPlan(const Json &root, Plan &plan) {
  expectObject(root, "<document>");
  std::string format = asString(field(root, "", "format"), "format");
  if (format != kPlanFormatName)
    fail("format", "'" + format + "' is not a Flex plan; expected '" +
                       std::string(kPlanFormatName) + "'");
  int64_t version = asInt(field(root, "", "version"), "version");
  if (version != kPlanFormatVersion)
    fail("version",
         "plan format version " + std::to_string(version) +
             " is not supported; this runtime reads version " +
             std::to_string(kPlanFormatVersion) +
             (version < kPlanFormatVersion
                  ? " (compile the layer again with this moe-opt: version 2 "
                    "requires every step attribute and records each step's "
                    "compiled facts)"
                  : ""));
  plan.version = static_cast<int>(version);
  if (const Json *producer = optionalField(root, "producer"))
    plan.producer = asString(*producer, "producer");
  plan.layer = readLayer(field(root, "", "layer"), "layer");
  plan.training = asBool(field(root, "", "training"), "training");
  // Absent = one rank (PlanFormat.md, "Many ranks").
  if (const Json *world = optionalField(root, "world")) {
    expectObject(*world, "world");
    plan.worldSize = asInt(field(*world, "world", "size"), "world.size");
  }

  const Json &arguments = field(root, "", "arguments");
  expectArray(arguments, "arguments");
  for (size_t i = 0; i < arguments.size(); ++i) {
    std::string path = "arguments[" + std::to_string(i) + "]";
    Argument arg;
    readBufferDesc(arguments[i], path, arg);
    arg.role = asEnum<ArgumentRole>(
        field(arguments[i], path, "role"), path + ".role", parseArgumentRole,
        {"input", "output", "grad_input", "grad_output"});
    plan.arguments.push_back(std::move(arg));
  }

  const Json &workspace = field(root, "", "workspace");
  expectObject(workspace, "workspace");
  plan.workspace.bytes =
      asInt(field(workspace, "workspace", "bytes"), "workspace.bytes");
  if (const Json *alignment = optionalField(workspace, "alignment"))
    plan.workspace.alignment = asInt(*alignment, "workspace.alignment");
  if (const Json *buffers = optionalField(workspace, "buffers")) {
    expectArray(*buffers, "workspace.buffers");
    for (size_t i = 0; i < buffers->size(); ++i) {
      std::string path = "workspace.buffers[" + std::to_string(i) + "]";
      WorkspaceBuffer buffer;
      readBufferDesc((*buffers)[i], path, buffer);
      buffer.offset =
          asInt(field((*buffers)[i], path, "offset"), path + ".offset");
      buffer.bytes =
          asInt(field((*buffers)[i], path, "bytes"), path + ".bytes");
      plan.workspace.buffers.push_back(std::move(buffer));
    }
  }

  // Names must be unique before steps can be resolved by name.
  std::set<std::string> seen;
  for (size_t i = 0; i < plan.arguments.size(); ++i)
    if (!seen.insert(plan.arguments[i].name).second)
      fail("arguments[" + std::to_string(i) + "].name",
           "buffer name '" + plan.arguments[i].name + "' is defined twice");
  for (size_t i = 0; i < plan.workspace.buffers.size(); ++i)
    if (!seen.insert(plan.workspace.buffers[i].name).second)
      fail("workspace.buffers[" + std::to_string(i) + "].name",
           "buffer name '" + plan.workspace.buffers[i].name +
               "' is defined twice");

  verifyHeader(plan);
  NameTable names{plan};
  bool sawFacts = false;
  const Json &variants = field(root, "", "variants");
  expectArray(variants, "variants");
  for (size_t i = 0; i < variants.size(); ++i) {
    std::string path = "variants[" + std::to_string(i) + "]";
    const Json &json = variants[i];
    expectObject(json, path);
    Variant variant;
    variant.name = asString(field(json, path, "name"), path + ".name");
    for (const char *list : {"forward", "backward"}) {
      std::string listPath = path + "." + list;
      const Json *steps = optionalField(json, list);
      // An inference plan may leave backward out.
      if (!steps && (std::string_view(list) == "forward" || plan.training))
        fail(listPath, "missing (required)");
      if (!steps)
        continue;
      expectArray(*steps, listPath);
      auto &target = std::string_view(list) == "forward" ? variant.forward
                                                         : variant.backward;
      for (size_t s = 0; s < steps->size(); ++s)
        target.push_back(readStep((*steps)[s],
                                  listPath + "[" + std::to_string(s) + "]",
                                  names, sawFacts));
    }
    variant.predictedUs = readMicros(json, "predicted_us", path);
    variant.measuredUs = readMicros(json, "measured_us", path);
    // Absent in plans from before per-variant workspaces: the whole one.
    if (const Json *bytes = optionalField(json, "workspace_bytes"))
      variant.workspaceBytes = asInt(*bytes, path + ".workspace_bytes");
    if (const Json *parallel = optionalField(json, "parallel")) {
      expectObject(*parallel, path + ".parallel");
      variant.parallelJson = parallel->dump();
    }
    plan.variants.push_back(std::move(variant));
  }
  if (const Json *defaultVariant = optionalField(root, "default_variant"))
    plan.defaultVariant = asInt(*defaultVariant, "default_variant");
  // A plan that records no facts (written by hand, or upgraded from format
  // 1) gets them derived here; recorded ones are checked by the verifier.
  if (!sawFacts)
    computeStepFacts(plan);
}

Status parsePlan(std::string_view text, Plan &plan,
                 const PlanCheckOptions &options) {
  plan = Plan();
  Json root;
  try {
    root = Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error &error) {
    // nlohmann's message has the byte position; a truncated document ends
    // in "unexpected end of input".
    return Status(StatusCode::InvalidPlan,
                  std::string("plan is not valid JSON: ") + error.what());
  } catch (const std::exception &error) {
    return Status(StatusCode::InvalidPlan,
                  std::string("plan could not be parsed: ") + error.what());
  }
  try {
    readPlan(root, plan);
    verify(plan, options);
  } catch (const PlanError &error) {
    plan = Plan();
    return Status(StatusCode::InvalidPlan, error.message);
  } catch (const std::exception &error) {
    plan = Plan();
    return Status(StatusCode::InvalidPlan,
                  std::string("plan rejected: ") + error.what());
  }
  return Status::ok();
}

Status loadPlanFile(const std::string &path, Plan &plan,
                    const PlanCheckOptions &options) {
  std::ifstream file(path, std::ios::binary);
  if (!file)
    return Status(StatusCode::IOError, "cannot open plan file '" + path + "'");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad())
    return Status(StatusCode::IOError, "cannot read plan file '" + path + "'");
  Status status = parsePlan(text.str(), plan, options);
  if (!status)
    return Status(status.code(), path + ": " + status.message());
  return status;
}

} // namespace flex
