//===- MoeRTDialect.cpp - The moert dialect -------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file registers the `moert` dialect, its enums and attributes.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/DialectImplementation.h"
#include "llvm/ADT/TypeSwitch.h"

using namespace mlir;
using namespace flex::moert;

#include "flex/Dialect/MoeRT/IR/MoeRTDialect.cpp.inc"
#include "flex/Dialect/MoeRT/IR/MoeRTEnums.cpp.inc"

#define GET_ATTRDEF_CLASSES
#include "flex/Dialect/MoeRT/IR/MoeRTAttrs.cpp.inc"

void MoeRTDialect::initialize() {
  addOperations<
#define GET_OP_LIST
#include "flex/Dialect/MoeRT/IR/MoeRTOps.cpp.inc"
      >();
  addAttributes<
#define GET_ATTRDEF_LIST
#include "flex/Dialect/MoeRT/IR/MoeRTAttrs.cpp.inc"
      >();
}
