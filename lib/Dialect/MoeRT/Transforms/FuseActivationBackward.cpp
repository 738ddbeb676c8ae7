//===- FuseActivationBackward.cpp - The activation's backward in a GEMM ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-fuse-activation-backward: next to each
// variant whose backward computes the input gradient of an expert's second
// layer as a grouped GEMM and then the backward of what follows the first
// layer over it (activation_backward: grad_pre = grad * act'(pre); or, for
// a gated expert, glu_backward), a variant `<name>+act_backward` in which
// each such pair is one grouped_gemm_activation_backward (or
// grouped_gemm_glu_backward) step: the gradient before the activation is
// neither written nor read back. The original variant is kept, first: the
// fused step pays only where a kernel applies the backward in its store, so
// the runtime's cost model picks per call.
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

/// What the pass needs of an activation_backward or a glu_backward.
struct BackwardStep {
  Operation *op = nullptr;
  Value grad, offsets, rows;
  /// The forward's values it reads (pre; gate_in and up_in) and the
  /// gradients it writes (grad_pre; grad_gate_in and grad_up_in).
  SmallVector<Value, 2> reads, writes;
};

std::optional<BackwardStep> backwardStep(Operation *op) {
  if (auto act = dyn_cast<ActivationBackwardOp>(op))
    return BackwardStep{op,
                        act.getGrad(),
                        act.getExpertOffsets(),
                        act.getExpertRows(),
                        {act.getPre()},
                        {act.getGradPre()}};
  if (auto glu = dyn_cast<GluBackwardOp>(op))
    return BackwardStep{op,
                        glu.getGrad(),
                        glu.getExpertOffsets(),
                        glu.getExpertRows(),
                        {glu.getGateIn(), glu.getUpIn()},
                        {glu.getGradGateIn(), glu.getGradUpIn()}};
  return std::nullopt;
}

/// One backward step and the grouped GEMM writing its `grad`.
struct GemmAndBackward {
  GroupedGemmOp gemm;
  BackwardStep backward;
};

/// Whether `backward` and the GEMM writing its `grad` can be one fused
/// step, as far as the two steps and those between them tell; if not,
/// `reason` says why. (Which other steps use `grad` is the caller's
/// question: the chunks of a pipelined variant share it.)
FailureOr<GemmAndBackward> analyze(const BackwardStep &backward,
                                   std::string &reason) {
  llvm::raw_string_ostream why(reason);
  Value grad = backward.grad, gradOut = backward.writes.front();
  GroupedGemmOp gemm;
  for (Operation *step = backward.op->getPrevNode(); step;
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
  if (gemm.getExpertOffsets() != backward.offsets ||
      gemm.getExpertRows() != backward.rows) {
    why << "the moert.grouped_gemm writing its grad and it follow different "
           "expert segments";
    return failure();
  }
  Type element = elementOf(gradOut);
  auto sameElement = [&](Value v) { return elementOf(v) == element; };
  if (!sameElement(grad) || !sameElement(gemm.getA()) ||
      !llvm::all_of(backward.reads, sameElement) ||
      !llvm::all_of(backward.writes, sameElement)) {
    why << "its operands and the GEMM's a are not one element type";
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
  if (columns(gradOut) % kVector != 0) {
    why << "it has N = " << columns(gradOut) << ", not a multiple of "
        << kVector;
    return failure();
  }

  // The fused step reads the GEMM's inputs and the forward's values, and
  // writes the gradients where the backward step was: the gradients must
  // be none of them, and the steps in between must not change the inputs.
  SmallVector<Value> inputs = {gemm.getA(), gemm.getB(), backward.offsets,
                               backward.rows};
  llvm::append_range(inputs, backward.reads);
  for (Value output : backward.writes)
    if (llvm::is_contained(inputs, output) || output == grad) {
      why << "the fused step would read and write '" << bufferName(output)
          << "'";
      return failure();
    }
  if (backward.writes.size() == 2 && backward.writes[0] == backward.writes[1]) {
    why << "it writes both gradients into '" << bufferName(backward.writes[0])
        << "'";
    return failure();
  }
  for (Operation *step = gemm->getNextNode(); step != backward.op;
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
    SmallVector<BackwardStep> backwards;
    for (Operation &op : variant.getBackward().front())
      if (std::optional<BackwardStep> backward = backwardStep(&op))
        backwards.push_back(*backward);
    if (backwards.empty()) {
      reason = "its backward has no activation_backward or glu_backward step";
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
                                    "fused with another backward step"});
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
          fusedSteps.insert(pair->backward.op);
        }
      for (auto [index, pair] : llvm::enumerate(candidates)) {
        if (!pair)
          continue;
        Value grad = pair->backward.grad;
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
    // "glu_backward step 2 of 3": the backward steps counted together.
    auto stepOf = [&](size_t index) {
      return (stepName(backwards[index].op) + " step " +
              std::to_string(index + 1) + " of " +
              std::to_string(backwards.size()))
          .str();
    };
    if (pairs.empty()) {
      const auto &[index, why] = leftAlone.front();
      reason = backwards.size() == 1 ? why : stepOf(index) + ": " + why;
      return failure();
    }
    if (report)
      for (auto &[index, why] : leftAlone)
        variant.emitRemark("variant '")
            << variant.getName() << "': " << stepOf(index)
            << " left unfused: " << why;
    return pairs;
  }

  /// Adds `fusedName`, the fused copy of `variant`: each pair is one
  /// grouped_gemm_activation_backward (grouped_gemm_glu_backward) in its
  /// activation_backward's (glu_backward's) place.
  LogicalResult fuse(VariantFusion &fusion, VariantOp variant,
                     ArrayRef<GemmAndBackward> pairs, StringRef fusedName) {
    // The workspace buffers the copy uses, in plan order: those of every
    // step but the fused ones, and the fused steps' operands but grad.
    llvm::DenseSet<Operation *> fusedSteps;
    llvm::SetVector<Value> used;
    for (GemmAndBackward pair : pairs) {
      fusedSteps.insert(pair.gemm);
      fusedSteps.insert(pair.backward.op);
      for (Operation *step : {pair.gemm.getOperation(), pair.backward.op})
        for (Value operand : step->getOperands())
          if (operand != pair.backward.grad)
            used.insert(operand);
    }
    for (Operation *step : stepsOf(variant))
      if (!fusedSteps.contains(step))
        used.insert(step->getOperands().begin(), step->getOperands().end());
    FailureOr<FusedCopy> fused = fusion.copyVariant(variant, fusedName, used);
    if (failed(fused))
      return failure();

    llvm::DenseMap<Operation *, Operation *> copyOf =
        stepCopies(variant, fused->variant);
    OpBuilder b(variant->getContext());
    size_t activations = 0, glus = 0;
    for (GemmAndBackward pair : pairs) {
      auto gemm = cast<GroupedGemmOp>(copyOf[pair.gemm]);
      Operation *backward = copyOf[pair.backward.op];
      b.setInsertionPoint(backward);
      SmallVector<NamedAttribute> attrs =
          llvm::to_vector(backward->getDiscardableAttrs());
      if (gemm.getTransB())
        attrs.push_back(b.getNamedAttr("trans_b", b.getUnitAttr()));
      if (auto act = dyn_cast<ActivationBackwardOp>(backward)) {
        attrs.push_back(b.getNamedAttr("activation", act.getActivationAttr()));
        createStep<GroupedGemmActivationBackwardOp>(
            b, act.getLoc(),
            {{"a", gemm.getA()},
             {"b", gemm.getB()},
             {"pre", act.getPre()},
             {"expert_offsets", act.getExpertOffsets()},
             {"expert_rows", act.getExpertRows()},
             {"c", act.getGradPre()}},
            attrs);
        ++activations;
      } else {
        auto glu = cast<GluBackwardOp>(backward);
        createStep<GroupedGemmGluBackwardOp>(
            b, glu.getLoc(),
            {{"a", gemm.getA()},
             {"b", gemm.getB()},
             {"gate_in", glu.getGateIn()},
             {"up_in", glu.getUpIn()},
             {"expert_offsets", glu.getExpertOffsets()},
             {"expert_rows", glu.getExpertRows()},
             {"grad_gate_in", glu.getGradGateIn()},
             {"grad_up_in", glu.getGradUpIn()}},
            attrs);
        ++glus;
      }
      backward->erase();
      gemm.erase();
    }
    if (report) {
      auto count = [](size_t n, StringRef step) {
        return std::to_string(n) + " " + step.str() + " step" +
               (n == 1 ? "" : "s");
      };
      std::string what;
      if (activations)
        what = count(activations, "grouped_gemm_activation_backward");
      if (glus)
        what += (what.empty() ? "" : ", ") +
                count(glus, "grouped_gemm_glu_backward");
      variant.emitRemark("variant '")
          << variant.getName() << "' fused as '" << fusedName << "': " << what;
    }
    return success();
  }
};
} // namespace
