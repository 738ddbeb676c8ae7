//===- MoeRTOps.h - Operations of the moert dialect -------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the `moert` dialect and its ops, and the role-named
// operand syntax every step shares.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_IR_MOERTOPS_H
#define FLEX_DIALECT_MOERT_IR_MOERTOPS_H

#include "flex/Dialect/Moe/IR/MoeOps.h"

#include "mlir/Bytecode/BytecodeOpInterface.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/Dialect.h"
#include "mlir/IR/OpDefinition.h"
#include "mlir/IR/OpImplementation.h"
#include "mlir/IR/RegionKindInterface.h"
#include "mlir/IR/SymbolTable.h"

#include "flex/Dialect/MoeRT/IR/MoeRTDialect.h.inc"
#include "flex/Dialect/MoeRT/IR/MoeRTEnums.h.inc"

namespace flex::moert::detail {
/// Parses `true` or `false`, a bool parameter of an attribute.
mlir::FailureOr<bool> parseBoolParameter(mlir::AsmParser &parser);
/// Parses a float literal, an f64 parameter of an attribute.
mlir::FailureOr<llvm::APFloat> parseF64Parameter(mlir::AsmParser &parser);
} // namespace flex::moert::detail

#define GET_ATTRDEF_CLASSES
#include "flex/Dialect/MoeRT/IR/MoeRTAttrs.h.inc"

namespace flex::moert {

/// One operand of a step and the role the plan file names it by.
struct StepOperand {
  llvm::StringRef role;
  bool isOutput;
  mlir::Value value;
};

namespace detail {
/// The operands of `op` by role, from its ODS operand groups in role order.
template <typename OpTy>
llvm::SmallVector<StepOperand> collectStepOperands(OpTy op) {
  llvm::SmallVector<StepOperand> operands;
  for (auto [index, role] : llvm::enumerate(OpTy::kRoles)) {
    for (mlir::Value value : op.getODSOperands(index))
      operands.push_back(
          {role.ltrim("?").rtrim("?"), index >= OpTy::kNumInputRoles, value});
  }
  return operands;
}

/// Parses `ins(role = %v : type, ...) outs(role = %v : type, ...) attrs`,
/// with roles in any order and optional roles left out.
mlir::ParseResult parseStepOperands(mlir::OpAsmParser &parser,
                                    mlir::OperationState &result,
                                    llvm::ArrayRef<llvm::StringLiteral> roles,
                                    unsigned numInputRoles,
                                    llvm::SmallVectorImpl<int32_t> &segments);

template <typename OpTy>
mlir::ParseResult parseStepOp(mlir::OpAsmParser &parser,
                              mlir::OperationState &result) {
  llvm::SmallVector<int32_t> segments;
  if (parseStepOperands(parser, result, OpTy::kRoles, OpTy::kNumInputRoles,
                        segments))
    return mlir::failure();
  if constexpr (OpTy::template hasTrait<
                    mlir::OpTrait::AttrSizedOperandSegments>())
    llvm::copy(segments, result.getOrAddProperties<typename OpTy::Properties>()
                             .operandSegmentSizes.begin());
  return mlir::success();
}

void printStepOperands(mlir::Operation *op,
                       llvm::ArrayRef<StepOperand> operands,
                       mlir::OpAsmPrinter &printer);

template <typename OpTy>
void printStepOp(OpTy op, mlir::OpAsmPrinter &printer) {
  printStepOperands(op, collectStepOperands(op), printer);
}
} // namespace detail
} // namespace flex::moert

#include "flex/Dialect/MoeRT/IR/MoeRTInterfaces.h.inc"

#define GET_OP_CLASSES
#include "flex/Dialect/MoeRT/IR/MoeRTOps.h.inc"

namespace flex::moert {
/// Creates a step from its operands by role (`{"x", %x}`); optional roles may
/// be left out or given a null value. A required role left out is a bug. A
/// role named in both ins and outs (shard_routing) takes the given values of
/// that name in order: the first for the input.
template <typename OpTy>
OpTy createStep(mlir::OpBuilder &builder, mlir::Location loc,
                llvm::ArrayRef<std::pair<llvm::StringRef, mlir::Value>> roles,
                llvm::ArrayRef<mlir::NamedAttribute> attributes = {}) {
  llvm::SmallVector<mlir::Value> operands;
  llvm::SmallVector<int32_t> segments;
  llvm::SmallVector<bool> used(roles.size(), false);
  for (llvm::StringLiteral role : OpTy::kRoles) {
    llvm::StringRef name = role.rtrim("?");
    const auto *it = roles.begin();
    for (; it != roles.end(); ++it)
      if (it->first == name && !used[it - roles.begin()])
        break;
    if (it != roles.end())
      used[it - roles.begin()] = true;
    bool present = it != roles.end() && it->second;
    assert((present || role.ends_with("?")) && "missing required step role");
    if (present)
      operands.push_back(it->second);
    segments.push_back(present ? 1 : 0);
  }
  llvm::SmallVector<mlir::NamedAttribute> allAttributes(attributes);
  if constexpr (OpTy::template hasTrait<
                    mlir::OpTrait::AttrSizedOperandSegments>())
    allAttributes.push_back(builder.getNamedAttr(
        "operandSegmentSizes", builder.getDenseI32ArrayAttr(segments)));
  return OpTy::create(builder, loc, mlir::TypeRange{}, operands, allAttributes);
}
} // namespace flex::moert

#endif // FLEX_DIALECT_MOERT_IR_MOERTOPS_H
