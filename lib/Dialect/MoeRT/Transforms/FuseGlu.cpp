//===- FuseGlu.cpp - One step for the SwiGLU expert's first layer ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-fuse-glu: next to each variant whose forward
// computes a gated expert's first layer as two grouped GEMMs and a glu
// (gate = a @ w1, up = a @ w3, h = silu(gate) * up), a variant
// `<name>+glu` in which each such triple is one `grouped_gemm_glu` step: the
// two products need not be written and read back (inference), or are
// written once by the fused step for the backward (training). The original
// variant is kept, first: which one is faster depends on the shapes and the
// device, so the runtime's cost model picks per call.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "VariantFusion.h"

#include "mlir/IR/Builders.h"
#include "llvm/ADT/DenseSet.h"

#include <array>

namespace flex::moert {
#define GEN_PASS_DEF_MOERTFUSEGLUPASS
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"
} // namespace flex::moert

using namespace mlir;
using namespace flex::moert;

namespace {
/// The fused kernel loads bf16/f16 rows and columns in 16-byte vectors, as
/// the gathered A load of --moert-fuse-dispatch: K and N must be multiples
/// of 8 elements.
constexpr int64_t kGluVector = 8;

/// One glu and the two grouped GEMMs writing its inputs, fused into one
/// `grouped_gemm_glu`; `keep` when another step touches the products
/// (glu_backward), which the fused step then writes as `gate_in` / `up_in`.
struct GluTriple {
  GroupedGemmOp gate;
  GroupedGemmOp up;
  GluOp glu;
  bool keep = false;

  std::array<Operation *, 3> steps() const { return {gate, up, glu}; }
};

/// The last step before `glu` in its block that writes `buffer`, if it is a
/// grouped_gemm writing it as `c`; otherwise `reason` says why not.
FailureOr<GroupedGemmOp> producer(GluOp glu, Value buffer, StringRef role,
                                  llvm::raw_ostream &why) {
  for (Operation *step = glu->getPrevNode(); step; step = step->getPrevNode()) {
    if (!writes(step, buffer))
      continue;
    auto gemm = dyn_cast<GroupedGemmOp>(step);
    if (!gemm || gemm.getC() != buffer) {
      why << "its " << role << " is written by moert." << stepName(step)
          << ", not as 'c' of a moert.grouped_gemm";
      return failure();
    }
    return gemm;
  }
  why << "no step before it writes its " << role;
  return failure();
}

/// A GEMM of the triple computes a plain product: no bias, pre, epilogue,
/// transposed b, accumulation or bias scale.
LogicalResult expectPlainProduct(GroupedGemmOp gemm, StringRef role,
                                 llvm::raw_ostream &why) {
  StringRef what;
  if (gemm.getBias())
    what = "has a bias";
  else if (gemm.getPre())
    what = "keeps 'pre'";
  else if (gemm.getEpilogueAttr())
    what = "has an epilogue";
  else if (gemm.getTransB())
    what = "reads b transposed";
  else if (gemm.getAccumulate())
    what = "accumulates";
  else if (gemm.getBiasScaleAttr() &&
           gemm.getBiasScaleAttr().getValueAsDouble() != 1.0)
    what = "scales its bias";
  if (what.empty())
    return success();
  why << "the moert.grouped_gemm writing its " << role << " " << what;
  return failure();
}

/// Whether `glu` and the GEMMs writing its inputs can be one
/// grouped_gemm_glu; if not, `reason` says why (for the remark of
/// `report`). `keep` is left for the caller.
FailureOr<GluTriple> analyze(GluOp glu, std::string &reason) {
  llvm::raw_string_ostream why(reason);
  Value gateIn = glu.getGateIn(), upIn = glu.getUpIn(), c = glu.getC();
  FailureOr<GroupedGemmOp> gate = producer(glu, gateIn, "gate_in", why);
  if (failed(gate))
    return failure();
  FailureOr<GroupedGemmOp> up = producer(glu, upIn, "up_in", why);
  if (failed(up))
    return failure();
  if (*gate == *up) {
    why << "its gate_in and up_in are one buffer";
    return failure();
  }
  if (failed(expectPlainProduct(*gate, "gate_in", why)) ||
      failed(expectPlainProduct(*up, "up_in", why)))
    return failure();
  if (gate->getA() != up->getA()) {
    why << "the GEMMs writing its gate_in and up_in read different 'a' ('"
        << bufferName(gate->getA()) << "', '" << bufferName(up->getA()) << "')";
    return failure();
  }
  if (gate->getRowTokens() != up->getRowTokens()) {
    why << "the GEMMs writing its gate_in and up_in read 'a' through "
           "different 'row_tokens'";
    return failure();
  }
  if (gate->getExpertOffsets() != glu.getExpertOffsets() ||
      up->getExpertOffsets() != glu.getExpertOffsets() ||
      gate->getExpertRows() != glu.getExpertRows() ||
      up->getExpertRows() != glu.getExpertRows()) {
    why << "the GEMMs writing its gate_in and up_in and the glu follow "
           "different expert segments";
    return failure();
  }
  Type element = elementOf(c);
  if (elementOf(gateIn) != element || elementOf(upIn) != element) {
    why << "its gate_in, up_in and c are " << elementOf(gateIn) << ", "
        << elementOf(upIn) << " and " << element << ", not one element type";
    return failure();
  }
  if (!element.isBF16() && !element.isF16()) {
    why << "its operands are " << element
        << "; the fused step needs bf16 or f16";
    return failure();
  }
  if (columns(gate->getA()) % kGluVector != 0) {
    why << "its GEMMs have K = " << columns(gate->getA())
        << ", not a multiple of " << kGluVector;
    return failure();
  }
  if (columns(c) % kGluVector != 0) {
    why << "it has N = " << columns(c) << ", not a multiple of " << kGluVector;
    return failure();
  }

  // The fused step reads the GEMMs' inputs and writes the products where
  // the glu was: its outputs must be none of its inputs, and the steps in
  // between neither change those inputs nor touch the products.
  SmallVector<Value> inputs = {gate->getA(), gate->getB(), up->getB(),
                               glu.getExpertOffsets(), glu.getExpertRows()};
  if (gate->getRowTokens())
    inputs.push_back(gate->getRowTokens());
  for (Value output : {c, gateIn, upIn})
    if (llvm::is_contained(inputs, output)) {
      why << "the fused step would read and write '" << bufferName(output)
          << "'";
      return failure();
    }
  if (c == gateIn || c == upIn) {
    why << "it writes 'c' over its '" << (c == gateIn ? "gate_in" : "up_in")
        << "'";
    return failure();
  }
  Operation *first = gate->getOperation()->isBeforeInBlock(*up) ? *gate : *up;
  for (Operation *step = first->getNextNode(); step != glu;
       step = step->getNextNode()) {
    if (step == *gate || step == *up)
      continue;
    for (Value product : {gateIn, upIn})
      if (touches(step, product)) {
        why << "moert." << stepName(step) << " between its GEMMs and it uses '"
            << bufferName(product) << "'";
        return failure();
      }
    for (Value input : inputs)
      if (writes(step, input)) {
        why << "moert." << stepName(step)
            << " between its GEMMs and it writes '" << bufferName(input)
            << "', which they read";
        return failure();
      }
  }
  return GluTriple{*gate, *up, glu};
}

struct MoeRTFuseGluPass final
    : flex::moert::impl::MoeRTFuseGluPassBase<MoeRTFuseGluPass> {
  using Base::Base;

  void runOnOperation() override {
    PlanOp plan = getOperation();
    VariantFusion fusion(plan, "--moert-fuse-glu");
    if (failed(fusion.fuseEach(
            "+glu", report,
            [&](VariantOp variant, std::string &reason) {
              return analyzeVariant(variant, reason);
            },
            [&](VariantOp variant, ArrayRef<GluTriple> triples,
                StringRef fusedName) {
              return fuse(fusion, variant, triples, fusedName);
            })))
      signalPassFailure();
  }

  /// The glu triples of `variant` to fuse, every qualifying one of its
  /// forward (pipelined chunks have one each), with `keep` set; a failure
  /// with `reason` when none qualifies. A remark of `report` names each glu
  /// left alone beside fused ones.
  FailureOr<SmallVector<GluTriple>> analyzeVariant(VariantOp variant,
                                                   std::string &reason) {
    auto glus = llvm::to_vector(variant.getForward().front().getOps<GluOp>());
    if (glus.empty()) {
      reason = "its forward has no glu step";
      return failure();
    }
    SmallVector<GluTriple> triples;
    SmallVector<std::pair<size_t, std::string>> leftAlone;
    for (auto [index, glu] : llvm::enumerate(glus)) {
      std::string why;
      FailureOr<GluTriple> triple = analyze(glu, why);
      if (succeeded(triple))
        triples.push_back(*triple);
      else
        leftAlone.push_back({index, why});
    }
    if (triples.empty()) {
      reason = glus.size() == 1
                   ? leftAlone.front().second
                   : "glu step 1 of " + std::to_string(glus.size()) + ": " +
                         leftAlone.front().second;
      return failure();
    }
    if (report)
      for (auto &[index, why] : leftAlone)
        variant.emitRemark("variant '")
            << variant.getName() << "': glu step " << index + 1 << " of "
            << glus.size() << " left unfused: " << why;

    // The products are kept where any step the fusion leaves reads or
    // writes them (the backward's glu_backward).
    llvm::DenseSet<Operation *> fusedSteps;
    for (GluTriple triple : triples)
      for (Operation *step : triple.steps())
        fusedSteps.insert(step);
    for (GluTriple &triple : triples)
      for (Operation *step : stepsOf(variant))
        if (!fusedSteps.contains(step) &&
            (touches(step, triple.glu.getGateIn()) ||
             touches(step, triple.glu.getUpIn())))
          triple.keep = true;
    return triples;
  }

  /// Adds `fusedName`, the fused copy of `variant`: each triple is one
  /// grouped_gemm_glu in its glu's place.
  LogicalResult fuse(VariantFusion &fusion, VariantOp variant,
                     ArrayRef<GluTriple> triples, StringRef fusedName) {
    // The workspace buffers the copy uses, in plan order: those of every
    // step but the fused ones, and the fused steps' operands (the products
    // only where kept).
    llvm::DenseSet<Operation *> fusedSteps;
    llvm::SetVector<Value> used;
    for (GluTriple triple : triples) {
      for (Operation *step : triple.steps())
        fusedSteps.insert(step);
      for (GroupedGemmOp gemm : {triple.gate, triple.up})
        for (Value operand : gemm->getOperands())
          if (operand != gemm.getC())
            used.insert(operand);
      used.insert(triple.glu.getC());
      if (triple.keep) {
        used.insert(triple.glu.getGateIn());
        used.insert(triple.glu.getUpIn());
      }
    }
    for (Operation *step : stepsOf(variant))
      if (!fusedSteps.contains(step))
        used.insert(step->getOperands().begin(), step->getOperands().end());
    FailureOr<FusedCopy> fused = fusion.copyVariant(variant, fusedName, used);
    if (failed(fused))
      return failure();

    // The copy's steps in the original's order: the triples' steps by index.
    llvm::DenseMap<Operation *, Operation *> copyOf =
        stepCopies(variant, fused->variant);
    OpBuilder b(variant->getContext());
    for (GluTriple triple : triples) {
      auto gate = cast<GroupedGemmOp>(copyOf[triple.gate]);
      auto up = cast<GroupedGemmOp>(copyOf[triple.up]);
      auto glu = cast<GluOp>(copyOf[triple.glu]);
      b.setInsertionPoint(glu);
      createStep<GroupedGemmGluOp>(
          b, glu.getLoc(),
          {{"a", gate.getA()},
           {"b", gate.getB()},
           {"b_up", up.getB()},
           {"expert_offsets", glu.getExpertOffsets()},
           {"expert_rows", glu.getExpertRows()},
           {"row_tokens", gate.getRowTokens()},
           {"c", glu.getC()},
           {"gate_in", triple.keep ? glu.getGateIn() : Value()},
           {"up_in", triple.keep ? glu.getUpIn() : Value()}},
          llvm::to_vector(glu->getDiscardableAttrs()));
      glu.erase();
      up.erase();
      gate.erase();
    }
    if (report) {
      size_t kept = llvm::count_if(
          triples, [](const GluTriple &triple) { return triple.keep; });
      variant.emitRemark("variant '")
          << variant.getName() << "' fused as '" << fusedName
          << "': " << triples.size() << " grouped_gemm_glu step"
          << (triples.size() == 1 ? "" : "s")
          << (kept ? ", writing gate_in and up_in for the steps that read them"
                   : ", gate_in and up_in not written");
    }
    return success();
  }
};
} // namespace
