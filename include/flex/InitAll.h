//===- InitAll.h - Register every Flex dialect and pass ---------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the one registration point shared by moe-opt, the C API
// and the JIT: the dialects Flex parses (its own and the few upstream ones it
// uses) and its passes and pipelines.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_INITALL_H
#define FLEX_INITALL_H

namespace mlir {
class DialectRegistry;
} // namespace mlir

namespace flex {

void registerAllDialects(mlir::DialectRegistry &registry);
void registerAllPasses();

} // namespace flex

#endif // FLEX_INITALL_H
