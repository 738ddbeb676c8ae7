//===- MoeOps.h - Types, attributes and ops of moe --------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the types, attributes and operations of the `moe`
// dialect, generated from MoeTypes.td, MoeAttrs.td and MoeOps.td.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOEOPS_H
#define FLEX_DIALECT_MOE_IR_MOEOPS_H

#include "flex/Dialect/Moe/IR/MoeDialect.h"

#include "mlir/Bytecode/BytecodeOpInterface.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/OpDefinition.h"
#include "mlir/IR/OpImplementation.h"
#include "mlir/Interfaces/SideEffectInterfaces.h"

#include "flex/Dialect/Moe/IR/MoeEnums.h.inc"

#define GET_ATTRDEF_CLASSES
#include "flex/Dialect/Moe/IR/MoeAttrs.h.inc"

#define GET_TYPEDEF_CLASSES
#include "flex/Dialect/Moe/IR/MoeTypes.h.inc"

#define GET_OP_CLASSES
#include "flex/Dialect/Moe/IR/MoeOps.h.inc"

#endif // FLEX_DIALECT_MOE_IR_MOEOPS_H
