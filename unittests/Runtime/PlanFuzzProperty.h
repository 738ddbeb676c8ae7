//===- PlanFuzzProperty.h - What a loaded plan must do ----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the property the plan loader's fuzz target and its
// gtest check on every input: the loader rejects it with InvalidPlan, or it
// loads, writes and loads again, and (when it is one rank and small enough
// to run here) computes the layer it declares within [num-1]'s tolerance on
// the CPU backend, every variant, forward and (training) backward.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_UNITTESTS_RUNTIME_PLANFUZZPROPERTY_H
#define FLEX_UNITTESTS_RUNTIME_PLANFUZZPROPERTY_H

#include <cstdint>
#include <string>
#include <string_view>

namespace flex::test {

struct PlanVerdict {
  enum Kind {
    Rejected, ///< InvalidPlan
    Computes, ///< loaded and every variant computes the layer
    Loaded,   ///< loaded; too large or multi-rank, not run
    Finding,  ///< the property does not hold (see message)
  } kind = Rejected;
  std::string message;
};

/// T * d * h * E above this is not run (a few million multiply-adds).
constexpr int64_t kMaxRunSize = 4 << 20;

/// Checks the property on `text`; `seed` draws the inputs.
PlanVerdict checkPlanProperty(std::string_view text, uint64_t seed = 1);

/// One structural mutation of the plan `text`, drawn from `seed`: a number
/// nudged or set to a boundary, a key or array element removed, an array
/// element repeated, a string swapped for another of the plan, two workspace
/// buffers put on one offset. False (text unchanged) when it is no JSON
/// object with workspace buffers.
bool mutatePlan(std::string &text, uint64_t seed);

} // namespace flex::test

#endif // FLEX_UNITTESTS_RUNTIME_PLANFUZZPROPERTY_H
