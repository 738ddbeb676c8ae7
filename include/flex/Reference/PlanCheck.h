//===- PlanCheck.h - A plan's run against the fp64 reference ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares what moe-run --check and the plan loader's fuzz tests
// share: the reference configured as a plan's variant runs the layer, the
// [num-1] tolerance, the comparison of every output and gradient by name,
// and (for the fuzz tests) a whole run of a one-rank plan on the CPU backend
// with fresh random inputs and poisoned outputs.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_REFERENCE_PLANCHECK_H
#define FLEX_REFERENCE_PLANCHECK_H

#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace flex::reference {

/// [num-1]: the relative L2 error allowed for a layer of `dtype`.
double layerTolerance(DType dtype);

/// The configuration and options with which the reference computes what
/// variant `variant` of `plan` runs: the layer, with the gate step's noise,
/// seed and capacity alignment (the last gate's, when it has several).
void configureForVariant(const Plan &plan, int64_t variant, LayerConfig &config,
                         ReferenceOptions &options);

/// One output or gradient compared with the reference.
struct OutputCheck {
  std::string name;
  double error = 0;
  bool pass = false;
};

/// The values of a run's argument `name`; empty when the plan has none.
using ArgumentValues = std::function<std::vector<double>(const char *name)>;

/// Compares `out`, `l_aux` and, with `training`, every gradient the run has
/// (grad_x, grad_wg, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, in this
/// order) by relativeL2 against `tolerance`; arguments the run lacks are
/// skipped.
std::vector<OutputCheck> compareOutputs(const ArgumentValues &got,
                                        const LayerForward &forward,
                                        const LayerGradients *grads,
                                        double tolerance);

/// What runPlanOnCpu found.
struct PlanRunCheck {
  /// Not OK when the executor refused the plan or a pass failed.
  Status status;
  std::vector<OutputCheck> results;
  double tolerance = 0;
  /// Every result within the tolerance (false when status is not OK).
  bool pass() const;
  /// One line: the status, or each failing output and its error.
  std::string describe() const;
};

/// Runs variant `variant` of the one-rank `plan` on the CPU backend (forward,
/// and backward when it is a training plan) with random inputs drawn from
/// `seed` (resampled until the routing is not within fp32 rounding of a
/// tie), outputs and gradients poisoned with NaN first, and compares with
/// the reference of the layer the plan declares (configureForVariant).
PlanRunCheck runPlanOnCpu(const Plan &plan, int64_t variant, uint64_t seed);

} // namespace flex::reference

#endif // FLEX_REFERENCE_PLANCHECK_H
