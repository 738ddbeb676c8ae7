//===- PlanLoader.cpp - Read, check and write plans (format v1) -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the JSON reader, the verifier and the writer of plans.
// Errors inside the reader are thrown as PlanError and turned into a Status
// at the boundary (parsePlan); nothing escapes it, not even nlohmann's own
// exceptions or bad_alloc from an absurd document.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

namespace flex {
namespace {

using Json = nlohmann::ordered_json;

struct PlanError {
  std::string message;
};

[[noreturn]] void fail(const std::string &path, const std::string &what) {
  throw PlanError{"plan field '" + path + "': " + what};
}

std::string typeName(const Json &value) {
  if (value.is_number_integer())
    return "integer";
  if (value.is_number_float())
    return "number";
  return value.type_name();
}

/// A short rendering of a value for messages; long values are cut.
std::string brief(const Json &value) {
  std::string text = value.dump();
  if (text.size() > 60)
    text = text.substr(0, 57) + "...";
  return text;
}

template <typename List> std::string joinNames(const List &names) {
  std::string text;
  for (const auto &name : names) {
    if (!text.empty())
      text += ", ";
    text += std::string(name);
  }
  return text;
}

std::string shapeString(const std::vector<int64_t> &shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

//===----------------------------------------------------------------------===//
// Typed field access with the JSON path in every message.
//===----------------------------------------------------------------------===//

const Json &field(const Json &object, const std::string &path,
                  const char *key) {
  auto it = object.find(key);
  if (it == object.end())
    fail(path.empty() ? std::string(key) : path + "." + key,
         "missing (required)");
  return *it;
}

const Json *optionalField(const Json &object, const char *key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null())
    return nullptr;
  return &*it;
}

void expectObject(const Json &value, const std::string &path) {
  if (!value.is_object())
    fail(path, "expected an object, got " + typeName(value) + " " +
                   brief(value));
}

void expectArray(const Json &value, const std::string &path) {
  if (!value.is_array())
    fail(path, "expected an array, got " + typeName(value) + " " +
                   brief(value));
}

int64_t asInt(const Json &value, const std::string &path) {
  if (value.is_number_unsigned()) {
    if (value.get<uint64_t>() >
        static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(path, "value " + brief(value) + " does not fit in int64");
    return static_cast<int64_t>(value.get<uint64_t>());
  }
  if (value.is_number_integer())
    return value.get<int64_t>();
  fail(path, "expected an integer, got " + typeName(value) + " " +
                 brief(value));
}

uint64_t asUnsigned(const Json &value, const std::string &path) {
  if (value.is_number_unsigned())
    return value.get<uint64_t>();
  if (value.is_number_integer())
    fail(path, "expected an integer >= 0, got " + brief(value));
  fail(path, "expected an integer, got " + typeName(value) + " " +
                 brief(value));
}

double asNumber(const Json &value, const std::string &path) {
  if (!value.is_number())
    fail(path, "expected a number, got " + typeName(value) + " " +
                   brief(value));
  return value.get<double>();
}

bool asBool(const Json &value, const std::string &path) {
  if (!value.is_boolean())
    fail(path, "expected true or false, got " + typeName(value) + " " +
                   brief(value));
  return value.get<bool>();
}

std::string asString(const Json &value, const std::string &path) {
  if (!value.is_string())
    fail(path, "expected a string, got " + typeName(value) + " " +
                   brief(value));
  return value.get<std::string>();
}

template <typename Enum, typename Parse>
Enum asEnum(const Json &value, const std::string &path, Parse parse,
            std::initializer_list<std::string_view> allowed) {
  std::string text = asString(value, path);
  if (std::optional<Enum> parsed = parse(text))
    return *parsed;
  fail(path, "unknown value '" + text + "'; allowed: " + joinNames(allowed));
}

DType asDType(const Json &value, const std::string &path) {
  return asEnum<DType>(value, path, parseDType, {"f32", "bf16", "f16", "i32"});
}

//===----------------------------------------------------------------------===//
// Reader
//===----------------------------------------------------------------------===//

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
  layer.expertKind =
      asEnum<ExpertKind>(field(json, path, "expert_kind"),
                         path + ".expert_kind", parseExpertKind,
                         {"ffn", "gated"});
  // FFN only; a gated layer may leave them out.
  if (const Json *act = optionalField(json, "activation"))
    layer.activation = asEnum<Activation>(*act, path + ".activation",
                                          parseActivation,
                                          {"relu", "gelu", "silu"});
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

StepAttrs readAttrs(const Json *json, const std::string &path, StepOp op,
                    const LayerConfig &layer) {
  StepAttrs attrs;
  // Defaults come from the layer, so that a plan may leave out what the
  // layer already says.
  attrs.topK = layer.topK;
  attrs.capacityMode = layer.capacityMode;
  attrs.capacityFactor = layer.capacityFactor;
  attrs.normalize = layer.normalizeGate;
  attrs.batchPrioritized = layer.batchPrioritized;
  attrs.noise = layer.gateNoise;
  attrs.seed = layer.seed;
  attrs.activation = layer.activation;
  static const Json empty = Json::object();
  if (json)
    expectObject(*json, path);
  const Json &object = json ? *json : empty;

  auto has = [&](const char *key) { return optionalField(object, key); };
  std::string at = path + ".";
  if (const Json *v = has("top_k"))
    attrs.topK = asInt(*v, at + "top_k");
  if (const Json *v = has("capacity_mode"))
    attrs.capacityMode = asEnum<CapacityMode>(*v, at + "capacity_mode",
                                              parseCapacityMode,
                                              {"fixed", "dropless", "bounded"});
  if (const Json *v = has("capacity_factor"))
    attrs.capacityFactor = asNumber(*v, at + "capacity_factor");
  if (const Json *v = has("normalize"))
    attrs.normalize = asBool(*v, at + "normalize");
  if (const Json *v = has("batch_prioritized"))
    attrs.batchPrioritized = asBool(*v, at + "batch_prioritized");
  if (const Json *v = has("noise"))
    attrs.noise = asNumber(*v, at + "noise");
  if (const Json *v = has("seed"))
    attrs.seed = asUnsigned(*v, at + "seed");
  if (const Json *v = has("layout"))
    attrs.layout = asEnum<DispatchLayout>(*v, at + "layout",
                                          parseDispatchLayout,
                                          {"padded", "ragged"});
  else if (op == StepOp::Gate)
    fail(at + "layout", "missing (required by op 'gate'); allowed: padded, "
                        "ragged");
  if (const Json *v = has("capacity_alignment")) {
    attrs.capacityAlignment = asInt(*v, at + "capacity_alignment");
    if (attrs.capacityAlignment < 1 || attrs.capacityAlignment > (1 << 20))
      fail(at + "capacity_alignment",
           "alignment " + std::to_string(attrs.capacityAlignment) +
               " is out of range; allowed: 1 to 2^20");
  }
  if (const Json *v = has("trans_b"))
    attrs.transB = asBool(*v, at + "trans_b");
  if (const Json *v = has("accumulate"))
    attrs.accumulate = asBool(*v, at + "accumulate");
  if (const Json *v = has("epilogue"))
    attrs.epilogue = asEnum<Epilogue>(*v, at + "epilogue", parseEpilogue,
                                      {"none", "relu", "gelu", "silu"});
  if (const Json *v = has("activation"))
    attrs.activation = asEnum<Activation>(*v, at + "activation",
                                          parseActivation,
                                          {"relu", "gelu", "silu"});
  // Collectives (PlanFormat.md, "Many ranks"). Ranges are the verifier's.
  if (const Json *v = has("direction"))
    attrs.direction = asEnum<AllToAllDirection>(
        *v, at + "direction", parseAllToAllDirection, {"dispatch", "combine"});
  else if (op == StepOp::AllToAll)
    fail(at + "direction", "missing (required by op 'all_to_all'); allowed: "
                           "dispatch, combine");
  if (const Json *v = has("chunks"))
    attrs.chunks = asInt(*v, at + "chunks");
  if (const Json *v = has("chunk"))
    attrs.chunk = asInt(*v, at + "chunk");
  if (const Json *v = has("ranks_per_node"))
    attrs.ranksPerNode = asInt(*v, at + "ranks_per_node");
  if (const Json *v = has("groups"))
    attrs.groups = asInt(*v, at + "groups");
  else if (op == StepOp::UniformSegments)
    fail(at + "groups", "missing (required by op 'uniform_segments')");
  if (const Json *v = has("ranks"))
    attrs.ranks = asInt(*v, at + "ranks");
  else if (op == StepOp::UniformSegments)
    fail(at + "ranks", "missing (required by op 'uniform_segments')");
  if (const Json *v = has("group_size"))
    attrs.groupSize = asInt(*v, at + "group_size");
  if (const Json *v = has("group_stride"))
    attrs.groupStride = asInt(*v, at + "group_stride");
  // Experts sharded over ranks. Ranges are the verifier's.
  if (const Json *v = has("shards"))
    attrs.shards = asInt(*v, at + "shards");
  else if (op == StepOp::ShardRouting || op == StepOp::ShardRoutingBackward)
    fail(at + "shards",
         "missing (required by op '" + std::string(toString(op)) + "')");
  if (const Json *v = has("bias_scale")) {
    attrs.biasScale = asNumber(*v, at + "bias_scale");
    if (!(attrs.biasScale > 0.0) || !std::isfinite(attrs.biasScale))
      fail(at + "bias_scale", "bias_scale " + brief(*v) +
                                  " is out of range; allowed: a finite "
                                  "number > 0");
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
      all.push_back(toString(role) );
    return joinNames(all);
  };
  if (json) {
    expectObject(*json, path);
    for (auto it = json->begin(); it != json->end(); ++it) {
      std::string rolePath = path + "." + it.key();
      std::optional<OperandRole> role = parseOperandRole(it.key());
      bool known =
          role && (std::find(required.begin(), required.end(), *role) !=
                       required.end() ||
                   std::find(optional.begin(), optional.end(), *role) !=
                       optional.end());
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

Step readStep(const Json &json, const std::string &path,
              const NameTable &names, const LayerConfig &layer) {
  expectObject(json, path);
  Step step;
  step.op = asEnum<StepOp>(
      field(json, path, "op"), path + ".op", parseStepOp,
      {"router", "gate", "dispatch", "grouped_gemm", "glu", "combine",
       "combine_backward", "grouped_gemm_wgrad", "activation_backward",
       "glu_backward", "dispatch_backward", "gate_backward", "router_backward",
       "sync_capacity", "all_to_all", "uniform_segments", "all_gather",
       "reduce_scatter"});
  readOperands(optionalField(json, "in"), path + ".in", names, step.op,
               /*isInput=*/true, step.inputs);
  readOperands(optionalField(json, "out"), path + ".out", names, step.op,
               /*isInput=*/false, step.outputs);
  step.attrs = readAttrs(optionalField(json, "attrs"), path + ".attrs",
                         step.op, layer);
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

void verifyHeader(const Plan &plan);

void readPlan(const Json &root, Plan &plan) {
  expectObject(root, "<document>");
  std::string format = asString(field(root, "", "format"), "format");
  if (format != kPlanFormatName)
    fail("format", "'" + format + "' is not a Flex plan; expected '" +
                       std::string(kPlanFormatName) + "'");
  int64_t version = asInt(field(root, "", "version"), "version");
  if (version != kPlanFormatVersion)
    fail("version", "plan format version " + std::to_string(version) +
                        " is not supported; this runtime reads version " +
                        std::to_string(kPlanFormatVersion));
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
                                  names, plan.layer));
    }
    variant.predictedUs = readMicros(json, "predicted_us", path);
    variant.measuredUs = readMicros(json, "measured_us", path);
    if (const Json *parallel = optionalField(json, "parallel")) {
      expectObject(*parallel, path + ".parallel");
      variant.parallelJson = parallel->dump();
    }
    plan.variants.push_back(std::move(variant));
  }
  if (const Json *defaultVariant = optionalField(root, "default_variant"))
    plan.defaultVariant = asInt(*defaultVariant, "default_variant");
}

//===----------------------------------------------------------------------===//
// Verifier
//===----------------------------------------------------------------------===//

/// a * b, or nullopt on int64 overflow.
std::optional<int64_t> checkedMul(int64_t a, int64_t b) {
  int64_t result;
  if (__builtin_mul_overflow(a, b, &result))
    return std::nullopt;
  return result;
}

void checkBufferSize(const BufferDesc &desc, const std::string &path) {
  int64_t count = 1;
  for (int64_t dim : desc.shape) {
    std::optional<int64_t> next = checkedMul(count, dim);
    if (!next)
      fail(path + ".shape", "buffer '" + desc.name + "' of shape " +
                                shapeString(desc.shape) +
                                " has more elements than fit in int64");
    count = *next;
  }
  if (!checkedMul(count, static_cast<int64_t>(dtypeSize(desc.dtype))))
    fail(path + ".shape", "buffer '" + desc.name + "' of shape " +
                              shapeString(desc.shape) + " and dtype " +
                              std::string(toString(desc.dtype)) +
                              " has a byte size that overflows int64");
}

/// The buffer a step operand names, for the operand's message path.
struct OperandChecker {
  const Plan &plan;
  const Step &step;
  std::string path;

  const BufferDesc *get(OperandRole role, bool isInput) const {
    const BufferRef &ref = isInput ? step.in(role) : step.out(role);
    return ref.isValid() ? &plan.getBuffer(ref) : nullptr;
  }
  std::string where(OperandRole role, bool isInput) const {
    return path + (isInput ? ".in." : ".out.") + std::string(toString(role));
  }

  /// Checks dtype (any of `dtypes`) and shape; -1 in `shape` matches any dim.
  const BufferDesc *expect(OperandRole role, bool isInput,
                           std::initializer_list<DType> dtypes,
                           std::vector<int64_t> shape,
                           const std::string &meaning) const {
    const BufferDesc *desc = get(role, isInput);
    if (!desc)
      return nullptr;
    if (std::find(dtypes.begin(), dtypes.end(), desc->dtype) == dtypes.end()) {
      std::vector<std::string_view> allowed;
      for (DType type : dtypes)
        allowed.push_back(toString(type));
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has dtype " +
               std::string(toString(desc->dtype)) + "; op '" +
               std::string(toString(step.op)) + "' needs " +
               joinNames(allowed));
    }
    bool match = desc->shape.size() == shape.size();
    for (size_t i = 0; match && i < shape.size(); ++i)
      match = shape[i] < 0 || shape[i] == desc->shape[i];
    if (!match) {
      std::string expected = "[";
      for (size_t i = 0; i < shape.size(); ++i)
        expected += (i ? ", " : "") +
                    (shape[i] < 0 ? std::string("?") : std::to_string(shape[i]));
      expected += "]";
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has shape " +
               shapeString(desc->shape) + ", which disagrees with the layer: " +
               "expected " + expected + " (" + meaning + ")");
    }
    return desc;
  }

  /// A [R, cols] buffer: rows at least `minRows` (the dispatch row bound).
  const BufferDesc *expectRows(OperandRole role, bool isInput, int64_t cols,
                               int64_t minRows,
                               const std::string &meaning) const {
    const BufferDesc *desc =
        expect(role, isInput, {DType::F32, DType::BF16, DType::F16},
               {-1, cols}, meaning);
    if (desc && desc->shape[0] < minRows)
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has " +
               std::to_string(desc->shape[0]) +
               " rows; the dispatch layout needs at least " +
               std::to_string(minRows) + " (" + meaning + ")");
    return desc;
  }

  void expectSameShape(OperandRole role, bool isInput,
                       const BufferDesc *reference,
                       const std::string &referenceName) const {
    const BufferDesc *desc = get(role, isInput);
    if (!desc || !reference)
      return;
    if (desc->shape != reference->shape)
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has shape " +
               shapeString(desc->shape) + "; expected the shape of " +
               referenceName + " " + shapeString(reference->shape));
  }
};

constexpr std::initializer_list<DType> kFloatTypes = {DType::F32, DType::BF16,
                                                     DType::F16};

/// The chunks D and chunk q of all_to_all and uniform_segments.
void checkChunks(const Step &step, const std::string &path) {
  const StepAttrs &a = step.attrs;
  if (a.chunks < 1 || a.chunks > (1 << 20))
    fail(path + ".attrs.chunks", "chunks " + std::to_string(a.chunks) +
                                     " is out of range; allowed: 1 to 2^20");
  if (a.chunk < 0 || a.chunk >= a.chunks)
    fail(path + ".attrs.chunk", "chunk " + std::to_string(a.chunk) +
                                    " is out of range; allowed: 0 "
                                    "to chunks - 1 = " +
                                    std::to_string(a.chunks - 1));
}

/// ranks_per_node of all_to_all: 0 (flat) or N dividing W (W / N nodes).
void checkRanksPerNode(const Step &step, const std::string &path, int64_t W) {
  const int64_t N = step.attrs.ranksPerNode;
  if (N == 0 || (N > 0 && N <= W && W % N == 0))
    return;
  std::string divisors;
  for (int64_t n = 1; n <= W; ++n)
    if (W % n == 0)
      divisors += ", " + std::to_string(n);
  fail(path + ".attrs.ranks_per_node",
       "ranks_per_node " + std::to_string(N) +
           " does not divide the plan's world size " + std::to_string(W) +
           "; allowed: 0 (flat)" + divisors);
}

/// group_size / group_stride of a collective: 0 (all W ranks), or groups of
/// n ranks S apart with n * S dividing W; not with ranks_per_node. A
/// grouped all_to_all is a token class (n * S == W, experts sharded), a
/// grouped gather or scatter a shard group (S == 1).
void checkGroups(const Step &step, const std::string &path, int64_t W,
                 int64_t s) {
  const int64_t n = step.attrs.groupSize, S = step.attrs.groupStride;
  const bool grouped = n != 0 || S != 1;
  if (!grouped)
    return;
  if (step.op != StepOp::AllToAll && step.op != StepOp::AllGather &&
      step.op != StepOp::ReduceScatter)
    fail(path + ".attrs.group_size",
         "op '" + std::string(toString(step.op)) +
             "' takes no group; group_size and group_stride are attributes "
             "of all_to_all, all_gather and reduce_scatter");
  if (n < 1 || S < 1 || n > W || S > W || W % (n * S) != 0)
    fail(path + ".attrs.group_size",
         "groups of group_size " + std::to_string(n) + " ranks group_stride " +
             std::to_string(S) +
             " apart do not partition the plan's world size " +
             std::to_string(W) +
             "; need group_size >= 1, group_stride >= 1 and group_size * "
             "group_stride dividing W");
  if (step.attrs.ranksPerNode != 0)
    fail(path + ".attrs.ranks_per_node",
         "ranks_per_node (2DH) runs over all W ranks; a grouped all_to_all "
         "(group_size " +
             std::to_string(n) + ") is flat");
  // The groups the layout needs (PlanFormat.md, "Groups of ranks"): a
  // shard group gathers g consecutive ranks' shards, and a token class of
  // W / g ranks g apart exchanges them. Other groups partition the ranks too
  // but hold other experts than the segment ops run: a wrong answer.
  if (n == W)
    return; // all W ranks: no group
  if (step.op == StepOp::AllToAll) {
    if (s == 1)
      fail(path + ".attrs.group_size",
           "a grouped all_to_all (group_size " + std::to_string(n) +
               ") needs experts sharded over ranks (E < W, W % E == 0): "
               "with whole experts the segment ops run L = E / W experts "
               "per rank");
    if (n * S != W)
      fail(path + ".attrs.group_stride",
           "a grouped all_to_all runs among a token class: group_size " +
               std::to_string(n) + " ranks group_stride = W / group_size = " +
               std::to_string(W / n) + " apart, got group_stride " +
               std::to_string(S));
  } else if (S != 1) {
    fail(path + ".attrs.group_stride",
         "a grouped " + std::string(toString(step.op)) +
             " runs among consecutive ranks (a shard group): group_stride "
             "must be 1, got " +
             std::to_string(S));
  }
}

void checkStepShapes(const Plan &plan, const Step &step,
                     const std::string &path, const StepAttrs &gateAttrs) {
  const LayerConfig &layer = plan.layer;
  const int64_t T = layer.tokens, d = layer.modelDim, E = layer.experts,
                k = std::min(layer.topK, layer.experts);
  // [cap-1] C is rounded up to the variant's alignment.
  const int64_t alignment = gateAttrs.capacityAlignment;
  const int64_t capacityBound =
      (staticCapacityBound(layer) + alignment - 1) / alignment * alignment;
  const DispatchLayout layout = gateAttrs.layout;
  // Experts sharded over s ranks: after shard_routing the routing is over
  // E * s virtual experts with k * s choices, and every dispatch-shaped
  // buffer holds E * s capacity blocks.
  const int64_t s = plan.shards(), Ev = plan.virtualExperts(), kv = k * s;
  // The rows of the dispatch buffer: E * C for padded, at most T * k for
  // ragged (never more than E * C either).
  int64_t paddedRows = checkedMul(Ev, capacityBound)
                           .value_or(std::numeric_limits<int64_t>::max());
  int64_t minRows = layout == DispatchLayout::Padded
                        ? paddedRows
                        : std::min(checkedMul(T, k).value_or(paddedRows),
                                   paddedRows);
  const DType tokenType = layer.dtype;
  const DType routerType = layer.routerFp32 ? DType::F32 : layer.dtype;
  OperandChecker c{plan, step, path};
  using R = OperandRole;
  const bool in = true, out = false;
  const int64_t W = plan.worldSize, L = plan.localExperts();
  checkGroups(step, path, W, plan.shards());
  // The ranks a collective runs among: W, or its group's.
  const int64_t groupW = step.attrs.groupRanks(W);

  // The ops that run per group of rows take their groups from
  // expert_offsets/expert_rows: the gate's E experts, or the L = E / W
  // local experts of a received buffer (uniform_segments).
  const bool segmentOp =
      step.op == StepOp::GroupedGemm || step.op == StepOp::Glu ||
      step.op == StepOp::ActivationBackward || step.op == StepOp::GluBackward ||
      step.op == StepOp::GroupedGemmWgrad || step.op == StepOp::UniformSegments;
  int64_t G = Ev;
  if (segmentOp) {
    const BufferDesc *rows =
        c.get(R::ExpertRows, step.op != StepOp::UniformSegments);
    if (rows && rows->shape.size() == 1 && rows->shape[0] == L)
      G = L;
    // Sharded experts exchanged among groups of n ranks: E * s / n local
    // (virtual) experts per rank (PlanFormat.md, "Groups of ranks").
    else if (rows && rows->shape.size() == 1 && s > 1 && rows->shape[0] > 0 &&
             Ev % rows->shape[0] == 0 && W % (Ev / rows->shape[0]) == 0)
      G = rows->shape[0];
  }
  const std::string groupsMeaning =
      segmentOp && s > 1 ? " (G = E * s = " + std::to_string(Ev) +
                               " virtual experts (shards), or 1 shard per rank)"
      : segmentOp && L != E
          ? " (G = E = " + std::to_string(E) +
                " experts, or L = E / W = " + std::to_string(L) +
                " local experts)"
          : "";

  // Which routing each side of the step holds: the gate's (k choices over
  // E experts) or, with sharded experts, shard_routing's (k * s over E * s).
  bool shardedIn = false, shardedOut = false;
  switch (step.op) {
  case StepOp::ShardRouting:
    shardedOut = true;
    break;
  case StepOp::ShardRoutingBackward:
    shardedIn = true;
    break;
  case StepOp::Dispatch:
  case StepOp::Combine:
  case StepOp::CombineBackward:
  case StepOp::DispatchBackward:
    shardedIn = shardedOut = s > 1;
    break;
  default:
    break;
  }

  // Routing buffers have the same shape wherever they appear.
  for (bool isInput : {in, out}) {
    const bool sharded = isInput ? shardedIn : shardedOut;
    const int64_t kk = sharded ? kv : k, EE = sharded ? Ev : E;
    const std::string kName = sharded ? "k * s" : "k";
    const std::string eName = sharded ? "E * s" : "E";
    const std::string kMeaning =
        sharded ? " (k * s = " + std::to_string(kv) +
                      ": the routing over the shards of each expert)"
                : "";
    c.expect(R::Scores, isInput, {DType::F32}, {T, E}, "scores [T, E] f32");
    c.expect(R::Indices, isInput, {DType::I32}, {T, kk},
             "indices [T, " + kName + "] i32" + kMeaning);
    c.expect(R::Locations, isInput, {DType::I32}, {T, kk},
             "locations [T, " + kName + "] i32" + kMeaning);
    c.expect(R::Gates, isInput, {DType::F32}, {T, kk},
             "gates [T, " + kName + "] f32" + kMeaning);
    c.expect(R::Capacity, isInput, {DType::I32}, {1}, "capacity [1] i32");
    c.expect(R::ExpertOffsets, isInput, {DType::I32},
             {segmentOp ? G + 1 : EE + 1},
             (segmentOp ? std::string("expert_offsets [G + 1] i32")
                        : "expert_offsets [" + eName + " + 1] i32") +
                 groupsMeaning);
    c.expect(R::ExpertRows, isInput, {DType::I32}, {segmentOp ? G : EE},
             (segmentOp ? std::string("expert_rows [G] i32")
                        : "expert_rows [" + eName + "] i32") +
                 groupsMeaning);
    c.expect(R::LAux, isInput, {DType::F32}, {1}, "l_aux [1] f32");
    c.expect(R::GradLAux, isInput, {DType::F32}, {1}, "grad_l_aux [1] f32");
    c.expect(R::Logits, isInput, {DType::F32}, {T, E}, "logits [T, E] f32");
    c.expect(R::GradLogits, isInput, {DType::F32}, {T, E},
             "grad_logits [T, E] f32");
    c.expect(R::GradGates, isInput, {DType::F32}, {T, kk},
             "grad_gates [T, " + kName + "] f32" + kMeaning);
  }

  switch (step.op) {
  case StepOp::Router:
  case StepOp::RouterBackward:
    c.expect(R::X, in, {tokenType}, {T, d}, "x [T, d]");
    c.expect(R::Wg, in, {routerType}, {d, E}, "wg [d, E]");
    c.expect(R::GradX, out, {tokenType}, {T, d}, "grad_x [T, d]");
    c.expect(R::GradWg, out, {routerType}, {d, E}, "grad_wg [d, E]");
    break;
  case StepOp::Gate:
  case StepOp::GateBackward:
    if (step.attrs.topK != layer.topK)
      fail(path + ".attrs.top_k",
           "top_k " + std::to_string(step.attrs.topK) +
               " disagrees with the layer's top_k " +
               std::to_string(layer.topK));
    if (step.op == StepOp::Gate && step.attrs.capacityMode != layer.capacityMode)
      fail(path + ".attrs.capacity_mode",
           "'" + std::string(toString(step.attrs.capacityMode)) +
               "' disagrees with the layer's capacity_mode '" +
               std::string(toString(layer.capacityMode)) + "'");
    // [cap-1] The gate writes expert_offsets[e] = e * C with C rounded up
    // to the alignment: the layer's check of the unaligned bound is not
    // enough.
    if (step.op == StepOp::Gate &&
        checkedMul(layer.experts, capacityBound)
                .value_or(std::numeric_limits<int64_t>::max()) >
            std::numeric_limits<int32_t>::max())
      fail(path + ".attrs.capacity_alignment",
           "[cap-1] the capacity bound " + std::to_string(capacityBound) +
               " aligned to " + std::to_string(alignment) + " times " +
               std::to_string(layer.experts) +
               " experts exceeds the i32 range of the routing buffers");
    break;
  case StepOp::Dispatch:
    c.expect(R::X, in, {tokenType}, {T, d}, "x [T, d]");
    c.expectRows(R::Dispatched, out, d, minRows, "dispatched [R, d]");
    break;
  case StepOp::DispatchBackward:
    c.expectRows(R::GradDispatched, in, d, minRows, "grad_dispatched [R, d]");
    c.expect(R::GradX, out, {tokenType}, {T, d}, "grad_x [T, d]");
    break;
  case StepOp::Combine:
    c.expectRows(R::ExpertOut, in, d, minRows, "expert_out [R, d]");
    c.expect(R::Out, out, {tokenType}, {T, d}, "out [T, d]");
    break;
  case StepOp::CombineBackward: {
    c.expect(R::GradOut, in, {tokenType}, {T, d}, "grad_out [T, d]");
    const BufferDesc *expertOut =
        c.expectRows(R::ExpertOut, in, d, minRows, "expert_out [R, d]");
    c.expectSameShape(R::GradExpertOut, out, expertOut, "expert_out");
    break;
  }
  case StepOp::GroupedGemm: {
    const BufferDesc *a =
        c.expect(R::A, in, kFloatTypes, {-1, -1}, "a [R, K]");
    int64_t K = a->shape[1];
    const BufferDesc *b = c.expect(
        R::B, in, kFloatTypes, {G, -1, -1},
        (step.attrs.transB ? "b [G, N, K]" : "b [G, K, N]") + groupsMeaning);
    int64_t bK = b->shape[step.attrs.transB ? 2 : 1];
    int64_t N = b->shape[step.attrs.transB ? 1 : 2];
    if (bK != K)
      fail(c.where(R::B, in),
           "buffer '" + b->name + "' of shape " + shapeString(b->shape) +
               " has K = " + std::to_string(bK) + " but a '" + a->name +
               "' has K = " + std::to_string(K) +
               (step.attrs.transB ? " (trans_b: b is [E, N, K])"
                                  : " (b is [E, K, N])"));
    c.expect(R::Bias, in, kFloatTypes, {G, N}, "bias [G, N]" + groupsMeaning);
    c.expectRows(R::A, in, K, minRows, "a [R, K]");
    c.expect(R::C, out, kFloatTypes, {a->shape[0], N}, "c [R, N], R of a");
    c.expect(R::Pre, out, kFloatTypes, {a->shape[0], N},
             "pre [R, N], R of a");
    break;
  }
  case StepOp::GroupedGemmWgrad: {
    const BufferDesc *a =
        c.expectRows(R::A, in, -1, minRows, "a [R, K]");
    const BufferDesc *gradC =
        c.expect(R::GradC, in, kFloatTypes, {a->shape[0], -1},
                 "grad_c [R, N], R of a");
    int64_t K = a->shape[1], N = gradC->shape[1];
    c.expect(R::GradB, out, kFloatTypes, {G, K, N},
             "grad_b [G, K, N]" + groupsMeaning);
    c.expect(R::GradBias, out, kFloatTypes, {G, N},
             "grad_bias [G, N]" + groupsMeaning);
    break;
  }
  case StepOp::SyncCapacity:
    // capacity and expert_offsets: the routing shapes above.
    break;
  case StepOp::ShardRouting:
  case StepOp::ShardRoutingBackward:
    // The routing shapes above say the rest.
    if (s == 1)
      fail(path + ".op", "op '" + std::string(toString(step.op)) +
                             "' needs experts sharded over ranks (E < W, "
                             "W % E == 0); this plan has E = " +
                             std::to_string(E) +
                             " experts on W = " + std::to_string(W) + " ranks");
    if (step.attrs.shards != s)
      fail(path + ".attrs.shards",
           "shards " + std::to_string(step.attrs.shards) +
               " disagrees with the plan: s = W / E = " + std::to_string(W) +
               " / " + std::to_string(E) + " = " + std::to_string(s));
    // [cap-1] The routing buffers are i32 and shard_routing writes
    // expert_offsets[v] = v * C up to E * s * C: the layer's check of
    // E * C is not enough.
    if (step.op == StepOp::ShardRouting &&
        paddedRows > std::numeric_limits<int32_t>::max())
      fail(path + ".op",
           "[cap-1] the capacity bound " + std::to_string(capacityBound) +
               " times the E * s = " + std::to_string(Ev) +
               " virtual experts exceeds the i32 range of the routing "
               "buffers (expert_offsets); lower capacity_factor or tokens");
    break;
  case StepOp::AllToAll: {
    checkChunks(step, path);
    checkRanksPerNode(step, path, W);
    // Both sides hold E * C rows: [W, L, C, n] and [D, L, W, C / D, n].
    const BufferDesc *input =
        c.expectRows(R::Input, in, -1, paddedRows, "input [E * C, n]");
    c.expectRows(R::Output, out, input->shape[1], paddedRows,
                 "output [E * C, n], n of input");
    c.expect(R::Output, out, {input->dtype}, {-1, input->shape[1]},
             "output has the dtype of input");
    break;
  }
  case StepOp::UniformSegments:
    checkChunks(step, path);
    // Sharded experts exchanged among groups of n ranks (n dividing W):
    // G = E * s / n local virtual experts.
    if (s > 1 && step.attrs.ranks >= 1 && step.attrs.ranks < W &&
        W % step.attrs.ranks == 0) {
      if (step.attrs.groups * step.attrs.ranks != Ev)
        fail(path + ".attrs.groups",
             "groups " + std::to_string(step.attrs.groups) + " on ranks " +
                 std::to_string(step.attrs.ranks) +
                 " disagrees with the plan: groups * ranks must be the E * s "
                 "= " +
                 std::to_string(Ev) + " virtual experts");
      break;
    }
    if (step.attrs.groups != L)
      fail(path + ".attrs.groups",
           "groups " + std::to_string(step.attrs.groups) +
               " disagrees with the local experts of the plan: L = E / W = " +
               std::to_string(E) + " / " + std::to_string(W) + " = " +
               std::to_string(L));
    if (step.attrs.ranks != W)
      fail(path + ".attrs.ranks", "ranks " + std::to_string(step.attrs.ranks) +
                                      " disagrees with the plan's world size " +
                                      std::to_string(W));
    break;
  case StepOp::AllGather:
  case StepOp::ReduceScatter: {
    // The rank's block is 1/W of the full buffer's first dimension.
    bool gather = step.op == StepOp::AllGather;
    const BufferDesc *input = c.get(R::Input, in);
    const BufferDesc *output = c.get(R::Output, out);
    const BufferDesc *block = gather ? input : output;
    const BufferDesc *full = gather ? output : input;
    std::string fullPath = c.where(gather ? R::Output : R::Input, !gather);
    if (!gather && input->dtype == DType::I32)
      fail(c.where(R::Input, in), "buffer '" + input->name +
                                      "' has dtype i32; op 'reduce_scatter' "
                                      "sums f32, bf16 or f16");
    if (input->dtype != output->dtype)
      fail(c.where(R::Output, out),
           "buffer '" + output->name + "' has dtype " +
               std::string(toString(output->dtype)) + "; op '" +
               std::string(toString(step.op)) +
               "' keeps the dtype of its input (" +
               std::string(toString(input->dtype)) + ")");
    std::vector<int64_t> want = block->shape;
    if (!want.empty())
      want[0] = checkedMul(want[0], groupW).value_or(-1);
    if (block->shape.empty() || full->shape != want)
      fail(fullPath,
           "buffer '" + full->name + "' has shape " + shapeString(full->shape) +
               "; op '" + std::string(toString(step.op)) +
               "' needs the rank's block " + shapeString(block->shape) +
               " times " + (step.attrs.groupSize > 0 ? "group_size" : "W") +
               " = " + std::to_string(groupW) + " in the first dimension, " +
               shapeString(want));
    break;
  }
  case StepOp::Glu:
  case StepOp::GluBackward:
  case StepOp::ActivationBackward: {
    OperandRole first =
        step.op == StepOp::ActivationBackward ? R::Pre : R::GateIn;
    const BufferDesc *reference =
        c.expectRows(first, in, -1, minRows,
                     std::string(toString(first)) + " [R, N]");
    std::string name = "'" + reference->name + "'";
    for (OperandRole role : {R::UpIn, R::Grad})
      c.expectSameShape(role, in, reference, name);
    for (OperandRole role : {R::C, R::GradPre, R::GradGateIn, R::GradUpIn})
      c.expectSameShape(role, out, reference, name);
    for (OperandRole role : {R::UpIn, R::Grad})
      c.expect(role, in, kFloatTypes, reference->shape, "[R, N]");
    for (OperandRole role : {R::C, R::GradPre, R::GradGateIn, R::GradUpIn})
      c.expect(role, out, kFloatTypes, reference->shape, "[R, N]");
    break;
  }
  }
}

std::string stepPath(size_t variant, bool backward, size_t index) {
  return "variants[" + std::to_string(variant) + "]." +
         (backward ? "backward[" : "forward[") + std::to_string(index) + "]";
}

/// The outputs a step reads before writing: accumulation targets, and what
/// sync_capacity rewrites.
std::vector<OperandRole> readOutputs(const Step &step) {
  using R = OperandRole;
  switch (step.op) {
  case StepOp::RouterBackward:
    return {R::GradX};
  case StepOp::GroupedGemm:
    return step.attrs.accumulate ? std::vector<R>{R::C} : std::vector<R>{};
  case StepOp::GroupedGemmWgrad:
    return step.attrs.accumulate ? std::vector<R>{R::GradB, R::GradBias}
                                 : std::vector<R>{};
  case StepOp::SyncCapacity:
    return {R::Capacity, R::ExpertOffsets};
  default:
    return {};
  }
}

/// The rules of multi-rank steps over one variant (PlanFormat.md, "Many
/// ranks"): the padded layout, chunks that divide the capacity, and one C
/// on every rank before tokens move.
void verifyRanks(const Plan &plan, size_t v, const Step &gate) {
  const Variant &variant = plan.variants[v];
  const std::string path = "variants[" + std::to_string(v) + "]";
  bool movesTokens = false;
  for (bool backward : {false, true}) {
    const std::vector<Step> &steps =
        backward ? variant.backward : variant.forward;
    for (size_t s = 0; s < steps.size(); ++s) {
      const Step &step = steps[s];
      if (step.op != StepOp::AllToAll && step.op != StepOp::UniformSegments)
        continue;
      movesTokens = true;
      // The chunks split the capacity C, which the gate aligns.
      if (step.attrs.chunks >= 1 &&
          gate.attrs.capacityAlignment % step.attrs.chunks != 0)
        fail(stepPath(v, backward, s) + ".attrs.chunks",
             "op '" + std::string(toString(step.op)) +
                 "' splits the "
                 "capacity into " +
                 std::to_string(step.attrs.chunks) +
                 " chunks, but the gate's capacity_alignment " +
                 std::to_string(gate.attrs.capacityAlignment) +
                 " is not a multiple of it");
    }
  }
  if ((plan.worldSize > 1 || movesTokens) &&
      gate.attrs.layout != DispatchLayout::Padded)
    fail(path + ".forward",
         std::string("the gate's layout is 'ragged'; ") +
             (plan.worldSize > 1 ? "multi-rank plans"
                                 : "plans with all_to_all or "
                                   "uniform_segments") +
             " use the 'padded' layout (PlanFormat.md, \"Many ranks\")");
  // With a data-dependent C, every rank must use one C before rows move:
  // sync_capacity between the gate and any step reading the gate's
  // capacity or offsets.
  if (!movesTokens || plan.worldSize == 1 ||
      plan.layer.capacityMode == CapacityMode::Fixed)
    return;
  const BufferRef capacity = gate.out(OperandRole::Capacity);
  const BufferRef offsets = gate.out(OperandRole::ExpertOffsets);
  bool afterGate = false;
  for (size_t s = 0; s < variant.forward.size(); ++s) {
    const Step &step = variant.forward[s];
    if (&step == &gate) {
      afterGate = true;
      continue;
    }
    if (!afterGate)
      continue;
    if (step.op == StepOp::SyncCapacity)
      return;
    for (const BufferRef &ref : step.inputs)
      if (ref.isValid() && (ref == capacity || ref == offsets))
        fail(stepPath(v, false, s),
             "op '" + std::string(toString(step.op)) + "' reads '" +
                 plan.getBuffer(ref).name +
                 "' before a 'sync_capacity' step: with capacity_mode '" +
                 std::string(toString(plan.layer.capacityMode)) + "' on " +
                 std::to_string(plan.worldSize) +
                 " ranks, every rank must use one C before tokens move; "
                 "put 'sync_capacity' right after the gate");
  }
  fail(path + ".forward",
       "no 'sync_capacity' step after the gate: with capacity_mode '" +
           std::string(toString(plan.layer.capacityMode)) + "' on " +
           std::to_string(plan.worldSize) +
           " ranks the all_to_all steps need one C on every rank");
}

/// The checks that need no steps: layer, sizes, argument table, workspace.
/// The reader runs them before it resolves step operands, so a missing
/// argument is reported as such, not as an unknown buffer name.
void verifyHeader(const Plan &plan) {
  if (std::optional<std::string> error = verifyLayerConfig(plan.layer))
    fail("layer", *error);
  const LayerConfig &layer = plan.layer;
  const int64_t W = plan.worldSize;
  if (W < 1 || W > (1 << 20))
    fail("world.size", "world size " + std::to_string(W) +
                           " is out of range; allowed: 1 to 2^20");
  // Each rank holds L = E / W whole experts, or one shard of h / s hidden
  // units of an expert shared by s = W / E ranks (PlanFormat.md, "Many
  // ranks").
  if (W > 1 && layer.experts % W != 0 && W % layer.experts != 0)
    fail("world.size",
         std::to_string(W) + " ranks cannot hold the " +
             std::to_string(layer.experts) +
             " experts whole or sharded: a multi-rank plan needs E % W == 0 "
             "(each rank "
             "holds L = E / W experts) or W % E == 0 (each expert sharded "
             "over s = W / E ranks)");
  if (const int64_t s = plan.shards(); s > 1 && layer.hiddenDim % s != 0)
    fail("world.size",
         std::to_string(W) + " ranks shard each of the " +
             std::to_string(layer.experts) + " experts over s = " +
             std::to_string(s) + " ranks, but hidden_dim " +
             std::to_string(layer.hiddenDim) + " is not a multiple of s");

  // Sizes first: every later check multiplies dims.
  for (size_t i = 0; i < plan.arguments.size(); ++i)
    checkBufferSize(plan.arguments[i], "arguments[" + std::to_string(i) + "]");
  for (size_t i = 0; i < plan.workspace.buffers.size(); ++i)
    checkBufferSize(plan.workspace.buffers[i],
                    "workspace.buffers[" + std::to_string(i) + "]");

  // The argument table is fixed by the layer (PlanFormat.md).
  std::vector<Argument> expected =
      getExpectedArguments(layer, plan.training, W);
  std::vector<std::string> expectedNames;
  for (const Argument &arg : expected)
    expectedNames.push_back(arg.name);
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    const Argument &arg = plan.arguments[i];
    std::string path = "arguments[" + std::to_string(i) + "]";
    auto it = std::find_if(expected.begin(), expected.end(),
                           [&](const Argument &e) { return e.name == arg.name; });
    if (it == expected.end())
      fail(path + ".name",
           "argument '" + arg.name + "' is not an argument of this layer" +
               (plan.training ? "" : " (training is false)") +
               "; allowed: " + joinNames(expectedNames));
    if (arg.role != it->role)
      fail(path + ".role", "argument '" + arg.name + "' has role '" +
                               std::string(toString(arg.role)) +
                               "'; expected '" +
                               std::string(toString(it->role)) + "'");
    if (arg.dtype != it->dtype)
      fail(path + ".dtype", "argument '" + arg.name + "' has dtype " +
                                std::string(toString(arg.dtype)) +
                                "; the layer needs " +
                                std::string(toString(it->dtype)));
    if (arg.shape != it->shape)
      fail(path + ".shape", "argument '" + arg.name + "' has shape " +
                                shapeString(arg.shape) +
                                ", which disagrees with the layer: expected " +
                                shapeString(it->shape));
  }
  for (const Argument &e : expected)
    if (plan.findArgument(e.name) < 0)
      fail("arguments", "argument '" + e.name + "' (role " +
                            std::string(toString(e.role)) +
                            ") is missing; this layer needs " +
                            joinNames(expectedNames));

  // Workspace bounds.
  const Workspace &ws = plan.workspace;
  if (ws.bytes < 0)
    fail("workspace.bytes",
         "size " + std::to_string(ws.bytes) + " is negative");
  if (ws.alignment <= 0 || (ws.alignment & (ws.alignment - 1)) != 0)
    fail("workspace.alignment", "alignment " + std::to_string(ws.alignment) +
                                    " is not a power of two");
  for (size_t i = 0; i < ws.buffers.size(); ++i) {
    const WorkspaceBuffer &buffer = ws.buffers[i];
    std::string path = "workspace.buffers[" + std::to_string(i) + "]";
    if (buffer.offset < 0 || buffer.offset % ws.alignment != 0)
      fail(path + ".offset",
           "offset " + std::to_string(buffer.offset) + " of buffer '" +
               buffer.name + "' is not a non-negative multiple of the " +
               "alignment " + std::to_string(ws.alignment));
    if (buffer.bytes < buffer.numBytes())
      fail(path + ".bytes", "buffer '" + buffer.name + "' reserves " +
                                std::to_string(buffer.bytes) +
                                " bytes but its shape " +
                                shapeString(buffer.shape) + " needs " +
                                std::to_string(buffer.numBytes()));
    int64_t end;
    if (__builtin_add_overflow(buffer.offset, buffer.bytes, &end) ||
        end > ws.bytes)
      fail(path, "buffer '" + buffer.name + "' at offset " +
                     std::to_string(buffer.offset) + " with " +
                     std::to_string(buffer.bytes) +
                     " bytes lies outside the workspace [0, " +
                     std::to_string(ws.bytes) + ")");
  }

}

void verify(const Plan &plan, const PlanCheckOptions &options) {
  verifyHeader(plan);
  const Workspace &ws = plan.workspace;
  // Variants.
  if (plan.variants.empty())
    fail("variants", "a plan needs at least one variant");
  if (plan.defaultVariant < 0 ||
      plan.defaultVariant >= static_cast<int64_t>(plan.variants.size()))
    fail("default_variant",
         "index " + std::to_string(plan.defaultVariant) +
             " is out of range; the plan has " +
             std::to_string(plan.variants.size()) + " variants");
  std::set<std::string> variantNames;
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    const Variant &variant = plan.variants[v];
    std::string path = "variants[" + std::to_string(v) + "]";
    if (variant.name.empty())
      fail(path + ".name", "empty variant name");
    if (!variantNames.insert(variant.name).second)
      fail(path + ".name", "variant name '" + variant.name +
                               "' is used twice");
    if (!plan.training && !variant.backward.empty())
      fail(path + ".backward",
           "an inference plan (training false) has no backward steps; got " +
           std::to_string(variant.backward.size()));
    if (plan.training && variant.backward.empty())
      fail(path + ".backward", "a training plan needs backward steps");

    // The layout comes from the gate step; one gate per forward.
    const Step *gate = nullptr;
    for (const Step &step : variant.forward)
      if (step.op == StepOp::Gate) {
        if (gate)
          fail(path + ".forward", "more than one 'gate' step");
        gate = &step;
      }
    if (!gate)
      fail(path + ".forward", "no 'gate' step; every forward routes once");
    for (const Step &step : variant.backward)
      if (step.op == StepOp::Gate)
        fail(path + ".backward", "a 'gate' step belongs in forward");
    verifyRanks(plan, v, *gate);

    // Data flow: workspace buffers are written before they are read,
    // inputs are never written, outputs are written in the right pass.
    std::vector<bool> written(ws.buffers.size(), false);
    std::vector<bool> argWritten(plan.arguments.size(), false);
    std::vector<std::pair<int64_t, int64_t>> live(ws.buffers.size(),
                                                  {-1, -1});
    int64_t position = 0;
    for (bool backward : {false, true}) {
      const std::vector<Step> &steps =
          backward ? variant.backward : variant.forward;
      for (size_t s = 0; s < steps.size(); ++s, ++position) {
        const Step &step = steps[s];
        std::string at = stepPath(v, backward, s);
        checkStepShapes(plan, step, at, gate->attrs);
        // A step that adds into its output (or rewrites it) reads it
        // first: it must hold a value written earlier, not uninitialized
        // memory.
        for (OperandRole accumulated : readOutputs(step)) {
          const BufferRef &target = step.out(accumulated);
          if (!target.isValid())
            continue;
          bool wasWritten = target.kind == BufferRef::Kind::Workspace
                                ? static_cast<bool>(written[target.index])
                                : static_cast<bool>(argWritten[target.index]);
          if (!wasWritten)
            fail(at + ".out." + std::string(toString(accumulated)),
                 "op '" + std::string(toString(step.op)) +
                     (step.op == StepOp::SyncCapacity ? "' rewrites '"
                                                      : "' adds into '") +
                     plan.getBuffer(target).name +
                     "', which no earlier step writes");
        }
        for (int32_t waitOn : step.wait)
          if (waitOn >= static_cast<int32_t>(s))
            fail(at + ".wait", "step " + std::to_string(s) +
                                   " waits on step " + std::to_string(waitOn) +
                                   ", which does not come before it");
        for (int r = 0; r < kNumOperandRoles; ++r) {
          const BufferRef &ref = step.inputs[r];
          if (ref.kind != BufferRef::Kind::Workspace)
            continue;
          if (!written[ref.index])
            fail(at + ".in." +
                     std::string(toString(static_cast<OperandRole>(r))),
                 "workspace buffer '" + ws.buffers[ref.index].name +
                     "' is read before any step writes it");
        }
        for (int r = 0; r < kNumOperandRoles; ++r)
          for (const BufferRef *ref : {&step.inputs[r], &step.outputs[r]})
            if (ref->kind == BufferRef::Kind::Workspace) {
              auto &interval = live[ref->index];
              if (interval.first < 0)
                interval.first = position;
              interval.second = position;
            }
        for (int r = 0; r < kNumOperandRoles; ++r) {
          const BufferRef &ref = step.outputs[r];
          std::string rolePath =
              at + ".out." + std::string(toString(static_cast<OperandRole>(r)));
          if (ref.kind == BufferRef::Kind::Workspace) {
            written[ref.index] = true;
            continue;
          }
          if (ref.kind != BufferRef::Kind::Argument)
            continue;
          const Argument &arg = plan.arguments[ref.index];
          ArgumentRole allowed =
              backward ? ArgumentRole::GradOutput : ArgumentRole::Output;
          if (arg.role != allowed)
            fail(rolePath, "step writes argument '" + arg.name +
                               "' of role '" +
                               std::string(toString(arg.role)) + "'; " +
                               (backward ? "backward" : "forward") +
                               " steps may write only '" +
                               std::string(toString(allowed)) +
                               "' arguments and workspace buffers");
          argWritten[ref.index] = true;
        }
      }
      // Every output of the pass is produced.
      ArgumentRole produced =
          backward ? ArgumentRole::GradOutput : ArgumentRole::Output;
      for (size_t i = 0; i < plan.arguments.size(); ++i)
        if (plan.arguments[i].role == produced && !argWritten[i])
          fail(path + (backward ? ".backward" : ".forward"),
               "argument '" + plan.arguments[i].name + "' (role " +
                   std::string(toString(produced)) +
                   ") is written by no step");
    }

    if (options.checkWorkspaceOverlap) {
      for (size_t i = 0; i < ws.buffers.size(); ++i)
        for (size_t j = i + 1; j < ws.buffers.size(); ++j) {
          const WorkspaceBuffer &a = ws.buffers[i], &b = ws.buffers[j];
          if (live[i].first < 0 || live[j].first < 0)
            continue;
          bool bytesOverlap = a.offset < b.offset + b.numBytes() &&
                              b.offset < a.offset + a.numBytes();
          bool timeOverlap = live[i].first <= live[j].second &&
                             live[j].first <= live[i].second;
          if (bytesOverlap && timeOverlap && a.numBytes() && b.numBytes())
            fail("workspace.buffers[" + std::to_string(j) + "]",
                 "buffer '" + b.name + "' [" + std::to_string(b.offset) +
                     ", " + std::to_string(b.offset + b.numBytes()) +
                     ") overlaps buffer '" + a.name + "' [" +
                     std::to_string(a.offset) + ", " +
                     std::to_string(a.offset + a.numBytes()) +
                     ") while both are live in variant '" + variant.name +
                     "'");
        }
    }
  }
}

//===----------------------------------------------------------------------===//
// Writer
//===----------------------------------------------------------------------===//

Json writeBufferDesc(const BufferDesc &desc) {
  Json json;
  json["name"] = desc.name;
  json["dtype"] = std::string(toString(desc.dtype));
  json["shape"] = desc.shape;
  return json;
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
  const StepAttrs &a = step.attrs;
  switch (step.op) {
  case StepOp::Gate:
    attrs["top_k"] = a.topK;
    attrs["capacity_mode"] = std::string(toString(a.capacityMode));
    attrs["capacity_factor"] = a.capacityFactor;
    attrs["normalize"] = a.normalize;
    attrs["batch_prioritized"] = a.batchPrioritized;
    attrs["noise"] = a.noise;
    attrs["seed"] = a.seed;
    attrs["layout"] = std::string(toString(a.layout));
    if (a.capacityAlignment != 1)
      attrs["capacity_alignment"] = a.capacityAlignment;
    break;
  case StepOp::GateBackward:
    attrs["top_k"] = a.topK;
    attrs["normalize"] = a.normalize;
    break;
  case StepOp::GroupedGemm:
    attrs["trans_b"] = a.transB;
    attrs["epilogue"] = std::string(toString(a.epilogue));
    if (a.accumulate)
      attrs["accumulate"] = true;
    if (a.biasScale != 1.0)
      attrs["bias_scale"] = a.biasScale;
    break;
  case StepOp::ShardRouting:
  case StepOp::ShardRoutingBackward:
    attrs["shards"] = a.shards;
    break;
  case StepOp::ActivationBackward:
    attrs["activation"] = std::string(toString(a.activation));
    break;
  case StepOp::GroupedGemmWgrad:
    if (a.accumulate)
      attrs["accumulate"] = true;
    break;
  case StepOp::AllToAll:
    attrs["direction"] = std::string(toString(a.direction));
    attrs["chunks"] = a.chunks;
    attrs["chunk"] = a.chunk;
    if (a.ranksPerNode != 0)
      attrs["ranks_per_node"] = a.ranksPerNode;
    break;
  case StepOp::UniformSegments:
    attrs["groups"] = a.groups;
    attrs["ranks"] = a.ranks;
    attrs["chunks"] = a.chunks;
    attrs["chunk"] = a.chunk;
    break;
  default:
    break;
  }
  if (isCollective(step.op) && (a.groupSize != 0 || a.groupStride != 1)) {
    attrs["group_size"] = a.groupSize;
    attrs["group_stride"] = a.groupStride;
  }
  json["attrs"] = std::move(attrs);
  if (step.stream != 0)
    json["stream"] = step.stream;
  if (!step.wait.empty())
    json["wait"] = step.wait;
  return json;
}

} // namespace

std::vector<Argument> getExpectedArguments(const LayerConfig &layer,
                                           bool training, int64_t worldSize) {
  const int64_t T = layer.tokens, d = layer.modelDim, h = layer.hiddenDim,
                E = layer.experts;
  // Expert parameters are the rank's L = E / W experts, or its shard of
  // h / s hidden units of one expert (b2 whole) when E < W.
  const int64_t s = expertShards(E, worldSize);
  const int64_t L = s > 1 ? 1 : worldSize > 1 ? E / worldSize : E;
  const int64_t hl = h / s;
  const DType dt = layer.dtype;
  const DType routerType = layer.routerFp32 ? DType::F32 : dt;
  const bool ffn = layer.expertKind == ExpertKind::FFN;
  const bool bias = ffn && layer.bias;
  const bool gated = layer.expertKind == ExpertKind::Gated;
  std::vector<Argument> args;
  auto add = [&](const char *name, ArgumentRole role, DType dtype,
                 std::vector<int64_t> shape) {
    Argument arg;
    arg.name = name;
    arg.role = role;
    arg.dtype = dtype;
    arg.shape = std::move(shape);
    args.push_back(std::move(arg));
  };
  using AR = ArgumentRole;
  struct Param {
    const char *name, *gradName;
    DType dtype;
    std::vector<int64_t> shape;
    bool present;
  };
  std::vector<Param> params = {
      {"x", "grad_x", dt, {T, d}, true},
      {"wg", "grad_wg", routerType, {d, E}, true},
      {"w1", "grad_w1", dt, {L, d, hl}, true},
      {"b1", "grad_b1", dt, {L, hl}, bias},
      {"w2", "grad_w2", dt, {L, hl, d}, true},
      {"b2", "grad_b2", dt, {L, d}, bias},
      {"w3", "grad_w3", dt, {L, d, hl}, gated},
  };
  for (const Param &p : params)
    if (p.present)
      add(p.name, AR::Input, p.dtype, p.shape);
  add("out", AR::Output, dt, {T, d});
  add("l_aux", AR::Output, DType::F32, {1});
  if (training) {
    add("grad_out", AR::GradInput, dt, {T, d});
    add("grad_l_aux", AR::GradInput, DType::F32, {1});
    for (const Param &p : params)
      if (p.present)
        add(p.gradName, AR::GradOutput, p.dtype, p.shape);
  }
  return args;
}

Status verifyPlan(const Plan &plan, const PlanCheckOptions &options) {
  try {
    verify(plan, options);
  } catch (const PlanError &error) {
    return Status(StatusCode::InvalidPlan, error.message);
  } catch (const std::exception &error) {
    return Status(StatusCode::InvalidPlan,
                  std::string("plan rejected: ") + error.what());
  }
  return Status::ok();
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
    return Status(StatusCode::IOError,
                  "cannot open plan file '" + path + "'");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad())
    return Status(StatusCode::IOError,
                  "cannot read plan file '" + path + "'");
  Status status = parsePlan(text.str(), plan, options);
  if (!status)
    return Status(status.code(), path + ": " + status.message());
  return status;
}

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
