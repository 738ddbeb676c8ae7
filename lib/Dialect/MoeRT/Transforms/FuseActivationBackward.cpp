//===- FuseActivationBackward.cpp - The activation's backward in a GEMM ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-fuse-activation-backward: next to each
// variant whose backward computes the input gradient of an expert's second
// layer as a grouped GEMM and then the activation's backward over it
// (grad = grad_out @ w2^T, grad_pre = grad * act'(pre)), a variant
// `<name>+act_backward` in which each such pair is one
// `grouped_gemm_activation_backward` step: the gradient before the
// activation is neither written nor read back. The original variant is
// kept, first: the fused step pays only where a kernel applies the
// derivative in its store, so the runtime's cost model picks per call.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "VariantFusion.h"

#include "mlir/IR/Builders.h"
#include "llvm/ADT/DenseSet.h"

#include <optional>

namespace flex::moert {
#define GEN_PASS_DEF_MOERTFUSEACTIVATIONBACKWARDPASS
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"
} // namespace flex::moert

using namespace mlir;
using namespace flex::moert;

namespace {
/// The wgmma kernel loads bf16/f16 rows and columns in 16-byte boxes (TMA),
/// as the other fusions' kernels: K and N must be multiples of 8 elements.
constexpr int64_t kVector = 8;

/// One activation_backward and the grouped GEMM writing its `grad`.
struct GemmAndBackward {
  GroupedGemmOp gemm;
  ActivationBackwardOp backward;
};

Type elementOf(Value buffer) {
  return cast<MemRefType>(buffer.getType()).getElementType();
}

bool writes(Operation *step, Value buffer) {
  for (const StepOperand &operand :
       cast<StepOpInterface>(step).getStepOperands())
    if (operand.isOutput && operand.value == buffer)
      return true;
  return false;
}

bool touches(Operation *step, Value buffer) {
  return llvm::is_contained(step->getOperands(), buffer);
}

/// Whether `backward` and the GEMM writing its `grad` can be one
/// grouped_gemm_activation_backward, as far as the two steps and those
/// between them tell; if not, `reason` says why. (Which other steps use
/// `grad` is the caller's question: the chunks of a pipelined variant
/// share it.)
FailureOr<GemmAndBackward> analyze(ActivationBackwardOp backward,
                                   std::string &reason) {
  llvm::raw_string_ostream why(reason);
  Value grad = backward.getGrad(), pre = backward.getPre(),
        gradPre = backward.getGradPre();
  GroupedGemmOp gemm;
  for (Operation *step = backward->getPrevNode(); step;
       step = step->getPrevNode()) {
    if (!writes(step, grad))
      continue;
    gemm = dyn_cast<GroupedGemmOp>(step);
    if (!gemm || gemm.getC() != grad) {
      why << "its grad is written by moert." << stepName(step)
          << ", not as 'c' of a moert.grouped_gemm";
      return failure();
    }
    break;
  }
  if (!gemm) {
    why << "no step before it writes its grad";
    return failure();
  }
  StringRef what;
  if (gemm.getBias())
    what = "has a bias";
  else if (gemm.getPre())
    what = "keeps 'pre'";
  else if (gemm.getEpilogueAttr())
    what = "has an epilogue";
  else if (gemm.getAccumulate())
    what = "accumulates";
  else if (gemm.getRowTokens())
    what = "gathers its 'a' (row_tokens)";
  if (!what.empty()) {
    why << "the moert.grouped_gemm writing its grad " << what;
    return failure();
  }
  if (gemm.getExpertOffsets() != backward.getExpertOffsets() ||
      gemm.getExpertRows() != backward.getExpertRows()) {
    why << "the moert.grouped_gemm writing its grad and it follow different "
           "expert segments";
    return failure();
  }
  Type element = elementOf(gradPre);
  if (elementOf(grad) != element || elementOf(pre) != element ||
      elementOf(gemm.getA()) != element) {
    why << "its pre, grad and grad_pre and the GEMM's a are not one element "
           "type";
    return failure();
  }
  if (!element.isBF16() && !element.isF16()) {
    why << "its operands are " << element
        << "; the fused step needs bf16 or f16";
    return failure();
  }
  if (columns(gemm.getA()) % kVector != 0) {
    why << "the GEMM has K = " << columns(gemm.getA()) << ", not a multiple of "
        << kVector;
    return failure();
  }
  if (columns(gradPre) % kVector != 0) {
    why << "it has N = " << columns(gradPre) << ", not a multiple of "
        << kVector;
    return failure();
  }

  // The fused step reads the GEMM's inputs and pre, and writes grad_pre
  // where the activation_backward was: grad_pre must be none of them, and
  // the steps in between must not change the inputs.
  SmallVector<Value> inputs = {gemm.getA(), gemm.getB(), pre,
                               backward.getExpertOffsets(),
                               backward.getExpertRows()};
  if (llvm::is_contained(inputs, gradPre)) {
    why << "the fused step would read and write '" << bufferName(gradPre)
        << "'";
    return failure();
  }
  for (Operation *step = gemm->getNextNode(); step != backward;
       step = step->getNextNode())
    for (Value input : inputs)
      if (writes(step, input)) {
        why << "moert." << stepName(step) << " between the GEMM and it writes '"
            << bufferName(input) << "', which they read";
        return failure();
      }
  return GemmAndBackward{gemm, backward};
}

struct MoeRTFuseActivationBackwardPass final
    : flex::moert::impl::MoeRTFuseActivationBackwardPassBase<
          MoeRTFuseActivationBackwardPass> {
  using Base::Base;

  void runOnOperation() override {
    PlanOp plan = getOperation();
    VariantFusion fusion(plan, "--moert-fuse-activation-backward");
    if (failed(fusion.fuseEach(
            "+act_backward", report,
            [&](VariantOp variant, std::string &reason) {
              return analyzeVariant(variant, reason);
            },
            [&](VariantOp variant, ArrayRef<GemmAndBackward> pairs,
                StringRef fusedName) {
              return fuse(fusion, variant, pairs, fusedName);
            })))
      signalPassFailure();
  }

  /// The pairs of `variant` to fuse, every qualifying activation_backward
  /// of its backward (pipelined chunks have one each); a failure with
  /// `reason` when none qualifies. A remark of `report` names each one left
  /// alone beside fused ones.
  FailureOr<SmallVector<GemmAndBackward>> analyzeVariant(VariantOp variant,
                                                         std::string &reason) {
    auto backwards = llvm::to_vector(
        variant.getBackward().front().getOps<ActivationBackwardOp>());
    if (backwards.empty()) {
      reason = "its backward has no activation_backward step";
      return failure();
    }
    SmallVector<std::optional<GemmAndBackward>> candidates;
    SmallVector<std::pair<size_t, std::string>> leftAlone;
    for (auto [index, backward] : llvm::enumerate(backwards)) {
      std::string why;
      FailureOr<GemmAndBackward> pair = analyze(backward, why);
      candidates.push_back(succeeded(pair) ? std::optional(*pair)
                                           : std::nullopt);
      if (failed(pair))
        leftAlone.push_back({index, why});
    }
    // One GEMM fuses with one activation_backward: where two read what it
    // wrote, the later one is left alone (and, reading grad, drops the
    // first below).
    llvm::DenseSet<Operation *> claimed;
    for (auto [index, pair] : llvm::enumerate(candidates))
      if (pair && !claimed.insert(pair->gemm).second) {
        leftAlone.push_back({index, "its grad's moert.grouped_gemm is "
                                    "fused with another "
                                    "activation_backward"});
        pair.reset();
      }
    // The fused copy no longer writes grad: every other step using it must
    // be fused too (the chunks of a pipelined variant share it, each in its
    // own rows). Dropping a pair may drop those sharing its grad, so repeat
    // until none changes.
    SmallVector<Operation *> steps = stepsOf(variant);
    for (bool changed = true; changed;) {
      changed = false;
      llvm::DenseSet<Operation *> fusedSteps;
      for (const std::optional<GemmAndBackward> &pair : candidates)
        if (pair) {
          fusedSteps.insert(pair->gemm);
          fusedSteps.insert(pair->backward);
        }
      for (auto [index, pair] : llvm::enumerate(candidates)) {
        if (!pair)
          continue;
        Value grad = pair->backward.getGrad();
        auto user = llvm::find_if(steps, [&](Operation *step) {
          return !fusedSteps.contains(step) && touches(step, grad);
        });
        if (user == steps.end())
          continue;
        leftAlone.push_back(
            {index, ("moert." + stepName(*user) + " also uses its grad '" +
                     bufferName(grad) + "'")
                        .str()});
        pair.reset();
        changed = true;
      }
    }
    llvm::sort(leftAlone, llvm::less_first());
    SmallVector<GemmAndBackward> pairs;
    for (const std::optional<GemmAndBackward> &pair : candidates)
      if (pair)
        pairs.push_back(*pair);
    if (pairs.empty()) {
      reason = backwards.size() == 1 ? leftAlone.front().second
                                     : "activation_backward step 1 of " +
                                           std::to_string(backwards.size()) +
                                           ": " + leftAlone.front().second;
      return failure();
    }
    if (report)
      for (auto &[index, why] : leftAlone)
        variant.emitRemark("variant '")
            << variant.getName() << "': activation_backward step " << index + 1
            << " of " << backwards.size() << " left unfused: " << why;
    return pairs;
  }

  /// Adds `fusedName`, the fused copy of `variant`: each pair is one
  /// grouped_gemm_activation_backward in its activation_backward's place.
  LogicalResult fuse(VariantFusion &fusion, VariantOp variant,
                     ArrayRef<GemmAndBackward> pairs, StringRef fusedName) {
    // The workspace buffers the copy uses, in plan order: those of every
    // step but the fused ones, and the fused steps' operands but grad.
    llvm::DenseSet<Operation *> fusedSteps;
    llvm::SetVector<Value> used;
    for (GemmAndBackward pair : pairs) {
      fusedSteps.insert(pair.gemm);
      fusedSteps.insert(pair.backward);
      for (Operation *step :
           {pair.gemm.getOperation(), pair.backward.getOperation()})
        for (Value operand : step->getOperands())
          if (operand != pair.backward.getGrad())
            used.insert(operand);
    }
    for (Operation *step : stepsOf(variant))
      if (!fusedSteps.contains(step))
        used.insert(step->getOperands().begin(), step->getOperands().end());
    FailureOr<FusedCopy> fused = fusion.copyVariant(variant, fusedName, used);
    if (failed(fused))
      return failure();

    SmallVector<Operation *> originalSteps = stepsOf(variant);
    SmallVector<Operation *> copiedSteps = stepsOf(fused->variant);
    llvm::DenseMap<Operation *, Operation *> copyOf;
    for (auto [original, copy] : llvm::zip_equal(originalSteps, copiedSteps))
      copyOf[original] = copy;
    OpBuilder b(variant->getContext());
    for (GemmAndBackward pair : pairs) {
      auto gemm = cast<GroupedGemmOp>(copyOf[pair.gemm]);
      auto backward = cast<ActivationBackwardOp>(copyOf[pair.backward]);
      b.setInsertionPoint(backward);
      SmallVector<NamedAttribute> attrs =
          llvm::to_vector(backward->getDiscardableAttrs());
      attrs.push_back(
          b.getNamedAttr("activation", backward.getActivationAttr()));
      if (gemm.getTransB())
        attrs.push_back(b.getNamedAttr("trans_b", b.getUnitAttr()));
      createStep<GroupedGemmActivationBackwardOp>(
          b, backward.getLoc(),
          {{"a", gemm.getA()},
           {"b", gemm.getB()},
           {"pre", backward.getPre()},
           {"expert_offsets", backward.getExpertOffsets()},
           {"expert_rows", backward.getExpertRows()},
           {"c", backward.getGradPre()}},
          attrs);
      backward.erase();
      gemm.erase();
    }
    if (report)
      variant.emitRemark("variant '")
          << variant.getName() << "' fused as '" << fusedName
          << "': " << pairs.size() << " grouped_gemm_activation_backward step"
          << (pairs.size() == 1 ? "" : "s");
    return success();
  }
};
} // namespace
