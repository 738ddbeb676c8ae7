//===- MoeToMoeRT.h - Lower a moe layer to a moert plan ---------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the lowering of one expanded `moe` layer (a function
// holding gate, dispatch, expert and combine) to a `moert.plan`.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_CONVERSION_MOETOMOERT_MOETOMOERT_H
#define FLEX_CONVERSION_MOETOMOERT_MOETOMOERT_H

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Pass/Pass.h"

namespace flex {

#define GEN_PASS_DECL_CONVERTMOETOMOERTPASS
#include "flex/Conversion/Passes.h.inc"

struct MoeToMoeRTOptions {
  bool training = false;
  /// std::nullopt: padded for a fixed capacity, ragged otherwise.
  std::optional<moert::Layout> layout;
  /// When not empty, one variant per layout (`layout` is then unused),
  /// named after it; the one `layout` = std::nullopt would give comes
  /// first.
  llvm::SmallVector<moert::Layout, 2> layouts;
};

/// Builds the plan of the layer in `func` next to it and returns it; `func`
/// is left in place. Fails, with a diagnostic on the op at fault, when
/// `func` is not one expanded layer over its arguments.
mlir::FailureOr<moert::PlanOp>
lowerLayerToPlan(mlir::func::FuncOp func, const MoeToMoeRTOptions &options);

} // namespace flex

#endif // FLEX_CONVERSION_MOETOMOERT_MOETOMOERT_H
