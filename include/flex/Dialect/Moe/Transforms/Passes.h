//===- Passes.h - Passes of the moe dialect ---------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the passes of the `moe` dialect and their registration.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_TRANSFORMS_PASSES_H
#define FLEX_DIALECT_MOE_TRANSFORMS_PASSES_H

#include "flex/Dialect/Moe/IR/MoeOps.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Pass/Pass.h"

namespace flex::moe {

#define GEN_PASS_DECL
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"

#define GEN_PASS_REGISTRATION
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"

} // namespace flex::moe

#endif // FLEX_DIALECT_MOE_TRANSFORMS_PASSES_H
