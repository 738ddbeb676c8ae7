//===- PlanFuzzProperty.cpp - What a loaded plan must do ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the plan loader's fuzz property (issue 10): a
// corrupted plan is rejected naming the field, or it computes the layer.
// The run and the comparison are the reference library's (PlanCheck.h), the
// ones moe-run --check uses.
//
//===----------------------------------------------------------------------===//

#include "PlanFuzzProperty.h"

#include "flex/Reference/PlanCheck.h"
#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

#include <random>

using Json = nlohmann::ordered_json;

namespace flex::test {

namespace {

/// T * d * h * E, or -1 past kMaxRunSize (or on a non-positive size).
int64_t runSize(const LayerConfig &layer) {
  int64_t size = 1;
  for (int64_t dim :
       {layer.tokens, layer.modelDim, layer.hiddenDim, layer.experts}) {
    if (dim <= 0 || dim > kMaxRunSize || size > kMaxRunSize / dim)
      return -1;
    size *= dim;
  }
  return size;
}

/// Every value of `doc` with its JSON pointer.
void collect(const Json &doc, const Json::json_pointer &at,
             std::vector<Json::json_pointer> &out) {
  out.push_back(at);
  if (doc.is_object())
    for (auto it = doc.begin(); it != doc.end(); ++it)
      collect(it.value(), at / it.key(), out);
  else if (doc.is_array())
    for (size_t i = 0; i < doc.size(); ++i)
      collect(doc[i], at / i, out);
}

void mutateJson(Json &doc, std::mt19937_64 &rng) {
  std::vector<Json::json_pointer> all;
  collect(doc, Json::json_pointer(), all);
  Json::json_pointer at = all[rng() % (all.size() - 1) + 1];
  Json &value = doc[at];
  Json &parent = doc[at.parent_pointer()];
  switch (rng() % 6) {
  case 0: // a number nudged
    if (value.is_number_integer()) {
      const int64_t deltas[] = {1, -1, 2, 8, 16, -16, 1000};
      value = value.get<int64_t>() + deltas[rng() % 7];
      return;
    }
    if (value.is_number_float()) {
      value = value.get<double>() * (rng() % 2 ? 2.0 : 0.5);
      return;
    }
    if (value.is_boolean()) {
      value = !value.get<bool>();
      return;
    }
    [[fallthrough]];
  case 1: // a number set to a boundary
    if (value.is_number()) {
      const int64_t values[] = {0, -1, 1, 3, 1 << 20};
      value = values[rng() % 5];
      return;
    }
    [[fallthrough]];
  case 2: // removed
    if (parent.is_object())
      parent.erase(at.back());
    else
      parent.erase(static_cast<size_t>(std::stoul(at.back())));
    return;
  case 3: // an array element repeated
    if (parent.is_array()) {
      size_t i = std::stoul(at.back());
      parent.insert(parent.begin() + i, parent[i]);
      return;
    }
    [[fallthrough]];
  case 4: { // a string swapped for another of the document
    std::vector<Json::json_pointer> strings;
    for (const Json::json_pointer &p : all)
      if (doc[p].is_string())
        strings.push_back(p);
    if (value.is_string() && !strings.empty()) {
      value = doc[strings[rng() % strings.size()]];
      return;
    }
    [[fallthrough]];
  }
  default: { // a workspace buffer moved onto another's bytes
    Json &buffers = doc["workspace"]["buffers"];
    size_t a = rng() % buffers.size(), b = rng() % buffers.size();
    buffers[a]["offset"] = buffers[b]["offset"];
    return;
  }
  }
}

} // namespace

bool mutatePlan(std::string &text, uint64_t seed) {
  Json doc = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("workspace") ||
      !doc["workspace"].is_object() || !doc["workspace"].contains("buffers") ||
      !doc["workspace"]["buffers"].is_array() ||
      doc["workspace"]["buffers"].empty())
    return false;
  std::mt19937_64 rng(seed);
  try {
    mutateJson(doc, rng);
  } catch (const std::exception &) {
    return false; // a pointer into a value the mutation just removed
  }
  text = doc.dump();
  return true;
}

PlanVerdict checkPlanProperty(std::string_view text, uint64_t seed) {
  Plan plan;
  Status status = parsePlan(text, plan);
  if (!status.isOk()) {
    if (status.code() != StatusCode::InvalidPlan || status.message().empty())
      return {PlanVerdict::Finding,
              std::string("rejected with ") + toString(status.code()) +
                  " instead of InvalidPlan: " + status.message()};
    return {PlanVerdict::Rejected, status.message()};
  }
  // A plan that loads must write and load again.
  Plan again;
  if (Status reloaded = parsePlan(writePlan(plan), again); !reloaded.isOk())
    return {PlanVerdict::Finding,
            "loads, but its written form does not: " + reloaded.message()};
  if (plan.worldSize != 1 || runSize(plan.layer) < 0 ||
      plan.workspace.bytes > (int64_t(256) << 20))
    return {PlanVerdict::Loaded, "not run here"};
  for (int64_t v = 0; v < static_cast<int64_t>(plan.variants.size()); ++v) {
    reference::PlanRunCheck check = reference::runPlanOnCpu(plan, v, seed);
    if (!check.pass())
      return {PlanVerdict::Finding,
              "loads, but variant '" + plan.variants[v].name +
                  "' does not compute the layer: " + check.describe()};
  }
  return {PlanVerdict::Computes, ""};
}

} // namespace flex::test
