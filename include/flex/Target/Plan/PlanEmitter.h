//===- PlanEmitter.h - Serialize a moert plan for the runtime ---*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the translation of a `moert.plan` to the runtime's plan
// (flex::Plan) and to the plan file of docs/PlanFormat.md.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_TARGET_PLAN_PLANEMITTER_H
#define FLEX_TARGET_PLAN_PLANEMITTER_H

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"
#include "flex/Runtime/Plan.h"

#include "mlir/IR/BuiltinOps.h"

#include <string>

namespace flex {

/// The runtime plan of `plan`, checked by the runtime's own verifier (a
/// failure there is a compiler bug and is reported on `plan`). The plan must
/// have been through --moert-plan-memory.
mlir::FailureOr<Plan> translateToRuntimePlan(moert::PlanOp plan);

/// Writes the plan file of the one moert.plan in `module`; with a device
/// profile (`profilePath`, docs/CostModel.md) each variant's predicted_us
/// is filled by the cost model ([plan-4]: an unreadable, corrupt or
/// other-world-size profile is an error).
mlir::LogicalResult emitPlanFile(mlir::ModuleOp module, llvm::raw_ostream &os,
                                 const std::string &profilePath = "");

/// Registers the `--moert-to-plan` translation for moe-translate.
void registerPlanTranslation();

} // namespace flex

#endif // FLEX_TARGET_PLAN_PLANEMITTER_H
