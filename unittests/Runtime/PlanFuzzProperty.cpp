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

} // namespace

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
