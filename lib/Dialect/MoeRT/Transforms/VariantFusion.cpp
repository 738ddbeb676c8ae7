//===- VariantFusion.cpp - What the variant-fusing passes share -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the helpers of VariantFusion.h: the buffer and step
// names the remarks use, and the copy of a variant with buffers of its own.
//
//===----------------------------------------------------------------------===//

#include "VariantFusion.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/IRMapping.h"

using namespace mlir;
using namespace flex::moert;

int64_t flex::moert::columns(Value buffer) {
  return cast<MemRefType>(buffer.getType()).getDimSize(1);
}

SmallVector<Operation *> flex::moert::stepsOf(VariantOp variant) {
  SmallVector<Operation *> steps;
  for (Region *region : {&variant.getForward(), &variant.getBackward()})
    for (Operation &step : region->front())
      steps.push_back(&step);
  return steps;
}

StringRef flex::moert::stepName(Operation *step) {
  return cast<StepOpInterface>(step).getStepName();
}

StringRef flex::moert::bufferName(Value buffer) {
  if (auto alloc = buffer.getDefiningOp<AllocOp>())
    return alloc.getName();
  if (auto argument = buffer.getDefiningOp<ArgumentOp>())
    return argument.getName();
  return "?";
}

Type flex::moert::elementOf(Value buffer) {
  return cast<MemRefType>(buffer.getType()).getElementType();
}

bool flex::moert::writes(Operation *step, Value buffer) {
  for (const StepOperand &operand :
       cast<StepOpInterface>(step).getStepOperands())
    if (operand.isOutput && operand.value == buffer)
      return true;
  return false;
}

bool flex::moert::touches(Operation *step, Value buffer) {
  return llvm::is_contained(step->getOperands(), buffer);
}

llvm::DenseMap<Operation *, Operation *>
flex::moert::stepCopies(VariantOp original, VariantOp copy) {
  llvm::DenseMap<Operation *, Operation *> copyOf;
  for (auto [step, copied] : llvm::zip_equal(stepsOf(original), stepsOf(copy)))
    copyOf[step] = copied;
  return copyOf;
}

VariantFusion::VariantFusion(PlanOp plan, StringRef pass)
    : plan(plan), pass(pass.str()) {
  for (Operation &op : plan.getBody().front()) {
    if (auto argument = dyn_cast<ArgumentOp>(op))
      bufferNames.insert(argument.getName());
    else if (auto alloc = dyn_cast<AllocOp>(op))
      bufferNames.insert(alloc.getName());
  }
}

LogicalResult VariantFusion::checkWorkspaceNotPlaced() {
  if (!plan.getWorkspaceBytes())
    return success();
  return plan.emitError("[plan-3] ")
         << pass
         << " must run before --moert-plan-memory: the workspace is placed";
}

FailureOr<FusedCopy>
VariantFusion::copyVariant(VariantOp variant, StringRef fusedName,
                           const llvm::SetVector<Value> &used,
                           ArrayRef<AddedBuffer> added) {
  std::string prefix = (variant.getName() + ".").str();
  auto fusedBufferName = [&](StringRef name) {
    name.consume_front(prefix);
    return (fusedName + "." + name).str();
  };
  SmallVector<std::pair<AllocOp, std::string>> copies;
  for (AllocOp alloc : plan.getBody().getOps<AllocOp>())
    if (used.contains(alloc.getBuffer()))
      copies.push_back({alloc, fusedBufferName(alloc.getName())});
  SmallVector<std::string> addedNames;
  for (const AddedBuffer &buffer : added)
    addedNames.push_back(fusedBufferName(buffer.name));
  SmallVector<StringRef> newNames(addedNames.begin(), addedNames.end());
  for (auto &copy : copies)
    newNames.push_back(copy.second);
  for (StringRef name : newNames)
    if (bufferNames.contains(name))
      return plan.emitError("[plan-3] ")
             << pass << ": buffer '" << name << "' of variant '" << fusedName
             << "' is defined in the plan already";

  OpBuilder b(variant->getContext());
  b.setInsertionPointToEnd(&plan.getBody().front());
  IRMapping mapping;
  for (auto &[alloc, name] : copies) {
    auto copy = AllocOp::create(b, alloc.getLoc(), alloc.getType(), name,
                                IntegerAttr());
    mapping.map(alloc.getBuffer(), copy.getBuffer());
    bufferNames.insert(name);
  }
  FusedCopy result;
  for (auto [buffer, name] : llvm::zip_equal(added, addedNames)) {
    result.added.push_back(
        AllocOp::create(b, buffer.loc, buffer.type, name, IntegerAttr())
            .getBuffer());
    bufferNames.insert(name);
  }
  result.variant = cast<VariantOp>(b.clone(*variant, mapping));
  result.variant.setName(fusedName);
  return result;
}
