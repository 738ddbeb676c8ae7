//===- FuseDispatch.cpp - Gather dispatched rows in the GEMMs' A loads ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-fuse-dispatch: next to each variant whose
// dispatched rows are read only as the A operand of grouped GEMMs, a variant
// `<name>+gather` in which the dispatch writes only the row -> token map
// (`dispatch_rows`) and those GEMMs load their A rows from x through it, so
// the [R, d] copy of the tokens is never written nor read back. The original
// variant is kept, first: which one is faster depends on the shapes and the
// device, so the runtime's cost model picks per call.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/IRMapping.h"
#include "llvm/ADT/SetVector.h"
#include "llvm/ADT/StringSet.h"

namespace flex::moert {
#define GEN_PASS_DEF_MOERTFUSEDISPATCHPASS
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"
} // namespace flex::moert

using namespace mlir;
using namespace flex::moert;

namespace {
/// The runtime's gathered A load moves bf16/f16 rows in 16-byte vectors: K
/// (and N) must be multiples of 8 elements.
constexpr int64_t kGatherVector = 8;

/// What the fused variant of one variant needs: its dispatch, the buffer D
/// it writes and the x it reads.
struct FusibleDispatch {
  DispatchOp dispatch;
  Value dispatched;
  Value x;
};

int64_t columns(Value buffer) {
  return cast<MemRefType>(buffer.getType()).getDimSize(1);
}

/// Steps of `variant`, forward then backward.
SmallVector<Operation *> stepsOf(VariantOp variant) {
  SmallVector<Operation *> steps;
  for (Region *region : {&variant.getForward(), &variant.getBackward()})
    for (Operation &step : region->front())
      steps.push_back(&step);
  return steps;
}

/// Whether `variant` can be fused; if not, `reason` says why (for the
/// remark of `report`).
FailureOr<FusibleDispatch> analyze(VariantOp variant, Value x,
                                   std::string &reason) {
  llvm::raw_string_ostream why(reason);
  auto dispatches = variant.getForward().front().getOps<DispatchOp>();
  size_t count = std::distance(dispatches.begin(), dispatches.end());
  if (count != 1) {
    why << "its forward has " << count << " dispatches, not one";
    return failure();
  }
  DispatchOp dispatch = *dispatches.begin();
  Value dispatched = dispatch.getDispatched();

  // The routing: a gate's, laid out ragged (a padded buffer's rows past an
  // expert's count are never written by dispatch either, but multi-rank
  // and pipelined plans, the padded layout's users, move whole blocks).
  GateOp gate;
  for (GateOp candidate : variant.getForward().front().getOps<GateOp>())
    if (candidate.getExpertOffsets() == dispatch.getExpertOffsets() &&
        candidate->isBeforeInBlock(dispatch))
      gate = candidate;
  if (!gate) {
    why << "its dispatch reads no gate's routing";
    return failure();
  }
  if (gate.getLayout() != Layout::Ragged) {
    why << "its gate's layout is " << stringifyLayout(gate.getLayout())
        << ", not ragged";
    return failure();
  }
  if (!dispatched.getDefiningOp<AllocOp>()) {
    why << "its dispatch writes no workspace buffer";
    return failure();
  }
  if (dispatch.getX() != x) {
    why << "its dispatch reads another buffer than the plan's 'x'";
    return failure();
  }
  auto type = cast<MemRefType>(dispatched.getType());
  Type element = type.getElementType();
  if (!element.isBF16() && !element.isF16()) {
    why << "the dispatched rows are " << element
        << "; the gather needs bf16 or f16";
    return failure();
  }
  if (columns(dispatched) % kGatherVector != 0) {
    why << "the dispatched rows have K = " << columns(dispatched)
        << " columns, not a multiple of " << kGatherVector;
    return failure();
  }

  // Every other step touching D reads it as a GEMM's A, after the dispatch.
  for (Operation *step : stepsOf(variant)) {
    if (step == dispatch)
      continue;
    for (const StepOperand &operand :
         cast<StepOpInterface>(step).getStepOperands()) {
      if (operand.value != dispatched)
        continue;
      auto gemm = dyn_cast<GroupedGemmOp>(step);
      auto wgrad = dyn_cast<GroupedGemmWgradOp>(step);
      bool readAsA = (gemm || wgrad) && !operand.isOutput &&
                     operand.role == "a" &&
                     !(gemm ? gemm.getRowTokens() : wgrad.getRowTokens());
      if (!readAsA) {
        why << "moert." << cast<StepOpInterface>(step).getStepName()
            << " uses the dispatched rows as '" << operand.role
            << "', not as the A operand of a grouped GEMM";
        return failure();
      }
      if (step->getParentRegion() == dispatch->getParentRegion() &&
          step->isBeforeInBlock(dispatch)) {
        why << "moert." << cast<StepOpInterface>(step).getStepName()
            << " reads the dispatched rows before the dispatch";
        return failure();
      }
      Value product = gemm ? gemm.getC() : wgrad.getGradC();
      if (columns(product) % kGatherVector != 0) {
        why << "moert." << cast<StepOpInterface>(step).getStepName()
            << " reading the dispatched rows has N = " << columns(product)
            << " columns, not a multiple of " << kGatherVector;
        return failure();
      }
    }
  }
  return FusibleDispatch{dispatch, dispatched, x};
}

struct MoeRTFuseDispatchPass final
    : flex::moert::impl::MoeRTFuseDispatchPassBase<MoeRTFuseDispatchPass> {
  using Base::Base;

  void runOnOperation() override {
    PlanOp plan = getOperation();
    if (plan.getWorldSize() != 1) {
      if (report)
        plan.emitRemark("not fused: the plan runs on ")
            << plan.getWorldSize()
            << " ranks, whose exchanges move whole dispatch blocks";
      return;
    }
    Value x;
    llvm::StringSet<> names;
    for (Operation &op : plan.getBody().front()) {
      if (auto argument = dyn_cast<ArgumentOp>(op)) {
        names.insert(argument.getName());
        if (argument.getName() == "x")
          x = argument.getBuffer();
      } else if (auto alloc = dyn_cast<AllocOp>(op)) {
        names.insert(alloc.getName());
      }
    }
    llvm::StringSet<> variantNames;
    for (VariantOp variant : plan.getBody().getOps<VariantOp>())
      variantNames.insert(variant.getName());

    for (VariantOp variant :
         llvm::to_vector(plan.getBody().getOps<VariantOp>())) {
      std::string reason;
      FailureOr<FusibleDispatch> fusible = analyze(variant, x, reason);
      std::string fusedName = (variant.getName() + "+gather").str();
      if (succeeded(fusible) && variantNames.contains(fusedName)) {
        reason = "the plan has a variant '" + fusedName + "' already";
        fusible = failure();
      }
      if (failed(fusible)) {
        if (report)
          variant.emitRemark("variant '")
              << variant.getName() << "' not fused: " << reason;
        continue;
      }
      if (plan.getWorkspaceBytes()) {
        plan.emitError("[plan-3] --moert-fuse-dispatch must run before "
                       "--moert-plan-memory: the workspace is placed");
        return signalPassFailure();
      }
      if (failed(fuse(plan, variant, *fusible, fusedName, names)))
        return signalPassFailure();
      variantNames.insert(fusedName);
    }
  }

  /// Adds `fusedName`, the fused copy of `variant`, after every variant the
  /// plan had: the existing variants keep their indices (a caller selecting
  /// one by index, FLEX_VARIANT=1, gets what it got before the pass).
  LogicalResult fuse(PlanOp plan, VariantOp variant,
                     const FusibleDispatch &fusible, StringRef fusedName,
                     llvm::StringSet<> &names) {
    // The workspace buffers the copy uses (all but D), in plan order.
    llvm::SetVector<Value> used;
    for (Operation *step : stepsOf(variant))
      for (Value operand : step->getOperands())
        if (operand != fusible.dispatched)
          used.insert(operand);
    std::string prefix = (variant.getName() + ".").str();
    auto fusedBufferName = [&](StringRef name) {
      name.consume_front(prefix);
      return (fusedName + "." + name).str();
    };
    SmallVector<std::pair<AllocOp, std::string>> copies;
    for (AllocOp alloc : plan.getBody().getOps<AllocOp>())
      if (used.contains(alloc.getBuffer()))
        copies.push_back({alloc, fusedBufferName(alloc.getName())});
    std::string rowTokensName = fusedBufferName("row_tokens");
    SmallVector<StringRef> newNames = {rowTokensName};
    for (auto &copy : copies)
      newNames.push_back(copy.second);
    for (StringRef name : newNames)
      if (names.contains(name))
        return plan.emitError("[plan-3] --moert-fuse-dispatch: buffer '")
               << name << "' of variant '" << fusedName
               << "' is defined in the plan already";

    OpBuilder b(variant->getContext());
    b.setInsertionPointToEnd(&plan.getBody().front());
    IRMapping mapping;
    for (auto &[alloc, name] : copies) {
      auto copy = AllocOp::create(b, alloc.getLoc(), alloc.getType(), name,
                                  IntegerAttr());
      mapping.map(alloc.getBuffer(), copy.getBuffer());
      names.insert(name);
    }
    auto rowTokensType = MemRefType::get(
        {cast<MemRefType>(fusible.dispatched.getType()).getDimSize(0)},
        b.getI32Type());
    Value rowTokens =
        AllocOp::create(b, fusible.dispatched.getLoc(), rowTokensType,
                        rowTokensName, IntegerAttr())
            .getBuffer();
    names.insert(rowTokensName);

    auto fused = cast<VariantOp>(b.clone(*variant, mapping));
    fused.setName(fusedName);
    for (Operation *step : stepsOf(fused)) {
      if (auto dispatch = dyn_cast<DispatchOp>(step);
          dispatch && dispatch.getDispatched() == fusible.dispatched) {
        b.setInsertionPoint(dispatch);
        createStep<DispatchRowsOp>(
            b, dispatch.getLoc(),
            {{"indices", dispatch.getIndices()},
             {"locations", dispatch.getLocations()},
             {"capacity", dispatch.getCapacity()},
             {"expert_offsets", dispatch.getExpertOffsets()},
             {"row_tokens", rowTokens}},
            llvm::to_vector(dispatch->getDiscardableAttrs()));
        dispatch.erase();
      } else if (auto gemm = dyn_cast<GroupedGemmOp>(step);
                 gemm && gemm.getA() == fusible.dispatched) {
        gemm.getAMutable().assign(fusible.x);
        gemm.getRowTokensMutable().assign(rowTokens);
      } else if (auto wgrad = dyn_cast<GroupedGemmWgradOp>(step);
                 wgrad && wgrad.getA() == fusible.dispatched) {
        wgrad.getAMutable().assign(fusible.x);
        wgrad.getRowTokensMutable().assign(rowTokens);
      }
    }
    if (report)
      variant.emitRemark("variant '")
          << variant.getName() << "' fused as '" << fusedName
          << "': dispatch_rows, and the grouped GEMMs read 'x' through '"
          << rowTokensName << "'";
    return success();
  }
};
} // namespace
