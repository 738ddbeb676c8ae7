//===- PlanDetail.h - Shared by the plan reader, verifier, writer
//-----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file holds what the plan reader, verifier and writer share: the JSON
// type, the error they throw (turned into a Status at the public boundary,
// PlanLoader.h) and typed field access with the JSON path in every message.
// Private to lib/Runtime/Plan.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_LIB_RUNTIME_PLAN_PLANDETAIL_H
#define FLEX_LIB_RUNTIME_PLAN_PLANDETAIL_H

#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

namespace flex::plan_detail {

using Json = nlohmann::ordered_json;

struct PlanError {
  std::string message;
};

[[noreturn]] inline void fail(const std::string &path,
                              const std::string &what) {
  throw PlanError{"plan field '" + path + "': " + what};
}

inline std::string typeName(const Json &value) {
  if (value.is_number_integer())
    return "integer";
  if (value.is_number_float())
    return "number";
  return value.type_name();
}

/// A short rendering of a value for messages; long values are cut.
inline std::string brief(const Json &value) {
  std::string text = value.dump();
  if (text.size() > 60)
    text = text.substr(0, 57) + "...";
  return text;
}

template <typename List> inline std::string joinNames(const List &names) {
  std::string text;
  for (const auto &name : names) {
    if (!text.empty())
      text += ", ";
    text += std::string(name);
  }
  return text;
}

inline std::string shapeString(const std::vector<int64_t> &shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

//===----------------------------------------------------------------------===//
// Typed field access with the JSON path in every message.
//===----------------------------------------------------------------------===//

inline const Json &field(const Json &object, const std::string &path,
                         const char *key) {
  auto it = object.find(key);
  if (it == object.end())
    fail(path.empty() ? std::string(key) : path + "." + key,
         "missing (required)");
  return *it;
}

inline const Json *optionalField(const Json &object, const char *key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null())
    return nullptr;
  return &*it;
}

inline void expectObject(const Json &value, const std::string &path) {
  if (!value.is_object())
    fail(path,
         "expected an object, got " + typeName(value) + " " + brief(value));
}

inline void expectArray(const Json &value, const std::string &path) {
  if (!value.is_array())
    fail(path,
         "expected an array, got " + typeName(value) + " " + brief(value));
}

inline int64_t asInt(const Json &value, const std::string &path) {
  if (value.is_number_unsigned()) {
    if (value.get<uint64_t>() >
        static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(path, "value " + brief(value) + " does not fit in int64");
    return static_cast<int64_t>(value.get<uint64_t>());
  }
  if (value.is_number_integer())
    return value.get<int64_t>();
  fail(path,
       "expected an integer, got " + typeName(value) + " " + brief(value));
}

inline uint64_t asUnsigned(const Json &value, const std::string &path) {
  if (value.is_number_unsigned())
    return value.get<uint64_t>();
  if (value.is_number_integer())
    fail(path, "expected an integer >= 0, got " + brief(value));
  fail(path,
       "expected an integer, got " + typeName(value) + " " + brief(value));
}

inline double asNumber(const Json &value, const std::string &path) {
  if (!value.is_number())
    fail(path,
         "expected a number, got " + typeName(value) + " " + brief(value));
  return value.get<double>();
}

inline bool asBool(const Json &value, const std::string &path) {
  if (!value.is_boolean())
    fail(path,
         "expected true or false, got " + typeName(value) + " " + brief(value));
  return value.get<bool>();
}

inline std::string asString(const Json &value, const std::string &path) {
  if (!value.is_string())
    fail(path,
         "expected a string, got " + typeName(value) + " " + brief(value));
  return value.get<std::string>();
}

template <typename Enum, typename Parse>
inline Enum asEnum(const Json &value, const std::string &path, Parse parse,
                   std::initializer_list<std::string_view> allowed) {
  std::string text = asString(value, path);
  if (std::optional<Enum> parsed = parse(text))
    return *parsed;
  fail(path, "unknown value '" + text + "'; allowed: " + joinNames(allowed));
}

inline DType asDType(const Json &value, const std::string &path) {
  return asEnum<DType>(value, path, parseDType, {"f32", "bf16", "f16", "i32"});
}

/// a * b, or nullopt on int64 overflow.
inline std::optional<int64_t> checkedMul(int64_t a, int64_t b) {
  int64_t result;
  if (__builtin_mul_overflow(a, b, &result))
    return std::nullopt;
  return result;
}

/// "variants[v].forward[i]" (or backward): a step's path in messages.
std::string stepPath(size_t variant, bool backward, size_t index);

/// Reads the document into `plan` (PlanReader.cpp); runs verifyHeader
/// before it resolves step operands.
void readPlan(const Json &root, Plan &plan);

/// The checks that need no steps: layer, sizes, argument table, workspace.
void verifyHeader(const Plan &plan);

/// Every check of a plan (PlanVerifier.cpp).
void verify(const Plan &plan, const PlanCheckOptions &options);

/// The dtypes and shapes of one step's operands against the layer, and its
/// attributes' cross-field rules (StepShapeRules.cpp). `gateAttrs` are the
/// attributes of the variant's gate (layout, capacity alignment).
void checkStepShapes(const Plan &plan, const Step &step,
                     const std::string &path, const StepAttrs &gateAttrs,
                     bool backward);

} // namespace flex::plan_detail

#endif // FLEX_LIB_RUNTIME_PLAN_PLANDETAIL_H
