//===- Passes.h - Passes of the moert dialect -------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the passes of the `moert` dialect.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_H
#define FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_H

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"
#include "mlir/Pass/Pass.h"

namespace flex::moert {

#define GEN_PASS_DECL
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"

#define GEN_PASS_REGISTRATION
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"

} // namespace flex::moert

#endif // FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_H
