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

#include "VariantFusion.h"

#include "mlir/IR/Builders.h"

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
        why << "moert." << stepName(step) << " uses the dispatched rows as '"
            << operand.role << "', not as the A operand of a grouped GEMM";
        return failure();
      }
      if (step->getParentRegion() == dispatch->getParentRegion() &&
          step->isBeforeInBlock(dispatch)) {
        why << "moert." << stepName(step)
            << " reads the dispatched rows before the dispatch";
        return failure();
      }
      Value product = gemm ? gemm.getC() : wgrad.getGradC();
      if (columns(product) % kGatherVector != 0) {
        why << "moert." << stepName(step)
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
    for (ArgumentOp argument : plan.getBody().getOps<ArgumentOp>())
      if (argument.getName() == "x")
        x = argument.getBuffer();
    VariantFusion fusion(plan, "--moert-fuse-dispatch");
    if (failed(fusion.fuseEach(
            "+gather", report,
            [&](VariantOp variant, std::string &reason) {
              return analyze(variant, x, reason);
            },
            [&](VariantOp variant, const FusibleDispatch &fusible,
                StringRef fusedName) {
              return fuse(fusion, variant, fusible, fusedName);
            })))
      signalPassFailure();
  }

  /// Adds `fusedName`, the fused copy of `variant`: its dispatch writes
  /// only the row -> token map, which its grouped GEMMs read x through.
  LogicalResult fuse(VariantFusion &fusion, VariantOp variant,
                     const FusibleDispatch &fusible, StringRef fusedName) {
    // The workspace buffers the copy uses (all but D), in plan order.
    llvm::SetVector<Value> used;
    for (Operation *step : stepsOf(variant))
      for (Value operand : step->getOperands())
        if (operand != fusible.dispatched)
          used.insert(operand);
    // In D's place, the row -> token map: one i32 per row.
    auto rowTokensType = MemRefType::get(
        {cast<MemRefType>(fusible.dispatched.getType()).getDimSize(0)},
        IntegerType::get(variant->getContext(), 32));
    FailureOr<FusedCopy> fused = fusion.copyVariant(
        variant, fusedName, used,
        {{"row_tokens", rowTokensType, fusible.dispatched.getLoc()}});
    if (failed(fused))
      return failure();
    Value rowTokens = fused->added.front();

    OpBuilder b(variant->getContext());
    for (Operation *step : stepsOf(fused->variant)) {
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
          << bufferName(rowTokens) << "'";
    return success();
  }
};
} // namespace
