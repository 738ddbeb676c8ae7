//===- FusedVariantsMatch.h - Fused copies against originals ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// What the fusion tests check of a compiled plan: every variant runs on the
// CPU from the same inputs, each fused copy `<v><suffix>` gives v's bytes in
// every output (the fused steps compute bit for bit what they replace), and
// both are within the dtype's tolerance of the fp64 reference.
//
//===----------------------------------------------------------------------===//

#ifndef UNITTESTS_COMPILER_FUSEDVARIANTSMATCH_H
#define UNITTESTS_COMPILER_FUSEDVARIANTSMATCH_H

#include "MultiRankTestSupport.h"

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Executor.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace flex::test {

/// Runs every variant of `plan` on its ranks (CPU, threads), each from fresh
/// buffers holding `inputs`, outputs and workspace poisoned. Returns the
/// buffers per variant and rank.
inline std::vector<std::vector<RankBuffers>>
runEveryVariant(const std::shared_ptr<const Plan> &plan,
                const RankInputs &inputs, double gradLAux) {
  const int W = static_cast<int>(plan->worldSize);
  std::vector<std::vector<RankBuffers>> results;
  for (size_t v = 0; v < plan->variants.size(); ++v) {
    std::vector<RankBuffers> buffers =
        makeRankBuffers(*plan, inputs, gradLAux);
    auto comms = localRanks(W);
    std::vector<Status> statuses(W);
    onRanks(W, [&](int r) {
      CpuRankExecutor rank;
      Status s = rank.create(plan, comms[r], 0xff);
      std::vector<Binding> bindings = buffers[r].bindings();
      if (s)
        s = runVariant(*rank.executor, static_cast<int64_t>(v), bindings,
                       plan->training);
      statuses[r] = s;
    });
    for (int r = 0; r < W; ++r)
      EXPECT_TRUE(statuses[r].isOk()) << plan->variants[v].name << " on rank "
                                      << r << ": " << statuses[r].message();
    results.push_back(std::move(buffers));
  }
  return results;
}

/// Every `<v><suffix>` variant gave v's bytes in every output argument, and
/// its out (and grad_x) are the fp64 reference's within the dtype's
/// tolerance. Returns the number of `<suffix>` variants.
inline int expectFusedVariantsMatch(const Plan &plan, const RankInputs &inputs,
                                    const std::string &suffix,
                                    double gradLAux) {
  auto shared = std::make_shared<const Plan>(plan);
  std::vector<std::vector<RankBuffers>> results =
      runEveryVariant(shared, inputs, gradLAux);
  reference::ReferenceOptions options;
  for (const Step &step : plan.variants[0].forward)
    if (step.op == StepOp::Gate)
      options.capacityAlignment = step.attrs.capacityAlignment;
  const RankReference ref =
      referenceOnRanks(plan.layer, options, inputs, gradLAux, plan.training);
  const double tolerance = plan.layer.dtype == DType::BF16 ? 5e-2 : 1e-2;
  int fused = 0;
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    const std::string &name = plan.variants[v].name;
    if (name.size() <= suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    ++fused;
    const int64_t original =
        plan.findVariant(name.substr(0, name.size() - suffix.size()));
    EXPECT_GE(original, 0) << name << " has no original variant";
    if (original < 0)
      continue;
    for (int r = 0; r < static_cast<int>(plan.worldSize); ++r) {
      for (const Argument &arg : plan.arguments) {
        if (arg.role == ArgumentRole::Output ||
            arg.role == ArgumentRole::GradOutput) {
          EXPECT_EQ(results[v][r].data.at(arg.name),
                    results[original][r].data.at(arg.name))
              << name << " differs from " << plan.variants[original].name
              << " in " << arg.name << " on rank " << r;
        }
      }
      EXPECT_LE(
          reference::relativeL2(results[v][r].get("out"), ref.forward[r].out),
          tolerance)
          << name << " on rank " << r;
      if (plan.training) {
        EXPECT_LE(reference::relativeL2(
                      results[v][r].get("grad_x"), ref.grads[r].x,
                      reference::normL2(ref.grads[r].x) == 0.0 ? 1.0 : 0.0),
                  tolerance)
            << name << " on rank " << r;
      }
    }
  }
  return fused;
}

} // namespace flex::test

#endif // UNITTESTS_COMPILER_FUSEDVARIANTSMATCH_H
