//===- MoeDialect.h - The moe dialect ---------------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the `moe` dialect class.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOEDIALECT_H
#define FLEX_DIALECT_MOE_IR_MOEDIALECT_H

#include "mlir/IR/Dialect.h"

#include "flex/Dialect/Moe/IR/MoeDialect.h.inc"

#endif // FLEX_DIALECT_MOE_IR_MOEDIALECT_H
