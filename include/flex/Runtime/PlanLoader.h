//===- PlanLoader.h - Read, check and write plans (format v1) ---*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the plan loader, the plan verifier and the plan writer.
// The loader never throws and never aborts on a bad document: it returns a
// Status of code InvalidPlan whose message names the field (as a JSON path,
// e.g. `variants[0].forward[3].in.a`), the value found and what is allowed.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_PLANLOADER_H
#define FLEX_RUNTIME_PLANLOADER_H

#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <string>
#include <string_view>

namespace flex {

/// How a plan is checked. Empty today: every check always runs, the
/// workspace liveness check included (a plan that loads computes the
/// layer); kept so that callers need not change when one becomes optional.
struct PlanCheckOptions {};

/// Parses and verifies a plan from JSON text.
Status parsePlan(std::string_view text, Plan &plan,
                 const PlanCheckOptions &options = {});

/// Reads `path` and parses it; IOError when the file cannot be read.
Status loadPlanFile(const std::string &path, Plan &plan,
                    const PlanCheckOptions &options = {});

/// The checks of parsePlan that do not depend on the JSON form, so that a
/// plan built in memory (by the compiler or a test) is checked the same way:
/// layer config, argument table, buffer sizes, workspace bounds, operand
/// shapes and dtypes, step attributes against the layer, read-before-write
/// of workspace buffers, no step writes an input, no step repeats an earlier
/// one, no two workspace buffers share bytes while both are live.
Status verifyPlan(const Plan &plan, const PlanCheckOptions &options = {});

/// Writes `plan` as JSON (format v2). `indent` < 0 writes one line.
/// parsePlan(writePlan(p)) gives back p.
std::string writePlan(const Plan &plan, int indent = 2);

/// The argument table of PlanFormat.md for `layer`: the arguments a plan of
/// this layer must have, in canonical order (inputs, outputs, and with
/// `training` the grad inputs and grad outputs). On `worldSize` W > 1 ranks
/// the expert parameters and their gradients are the rank's L = E / W
/// experts, [L, ...].
std::vector<Argument> getExpectedArguments(const LayerConfig &layer,
                                           bool training,
                                           int64_t worldSize = 1);

} // namespace flex

#endif // FLEX_RUNTIME_PLANLOADER_H
