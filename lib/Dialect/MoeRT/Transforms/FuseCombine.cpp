//===- FuseCombine.cpp - The combine in the second GEMM's store -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-fuse-combine: next to each variant whose
// forward computes every expert row with one grouped GEMM and then combines
// them into the layer's output, a variant `<name>+combine` in which the two
// are one grouped_gemm_combine step: a kernel sums a token's rows into out
// in its store once the last of them is written, so the combine's pass over
// the rows and its launch go. The original variant is kept, first: the
// fused step pays only where a kernel sums in its store, so the runtime's
// cost model picks per call.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "VariantFusion.h"

#include "mlir/IR/Builders.h"

namespace flex::moert {
#define GEN_PASS_DEF_MOERTFUSECOMBINEPASS
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"
} // namespace flex::moert

using namespace mlir;
using namespace flex::moert;

namespace {
/// The kernels load bf16/f16 rows in 16-byte vectors, as the other
/// fusions': K and d must be multiples of 8 elements.
constexpr int64_t kVector = 8;

/// The combine, the GEMM writing its rows, and the row -> token map of the
/// variant's dispatch_rows when it has one.
struct GemmAndCombine {
  GroupedGemmOp gemm;
  CombineOp combine;
  DispatchRowsOp rowMap;
};

/// The grouped GEMM that writes `combine`'s expert_out, once in the forward
/// and before it; a failure with `why` otherwise.
FailureOr<GroupedGemmOp> producerOf(CombineOp combine,
                                    llvm::raw_string_ostream &why) {
  Value rows = combine.getExpertOut();
  GroupedGemmOp gemm;
  for (Operation &step : combine->getBlock()->getOperations()) {
    if (&step == combine.getOperation())
      break;
    if (!writes(&step, rows))
      continue;
    if (gemm) {
      why << "its expert_out is written by more than one step (a pipelined "
             "variant's chunks)";
      return failure();
    }
    gemm = dyn_cast<GroupedGemmOp>(step);
    if (!gemm || gemm.getC() != rows) {
      why << "its expert_out is written by moert." << stepName(&step)
          << ", not as 'c' of a moert.grouped_gemm";
      return failure();
    }
  }
  if (!gemm) {
    why << "no step before it writes its expert_out";
    return failure();
  }
  return gemm;
}

/// Whether the variant's combine and the GEMM before it can be one step; if
/// not, `reason` says why.
FailureOr<GemmAndCombine> analyze(VariantOp variant, std::string &reason) {
  llvm::raw_string_ostream why(reason);
  auto combines = variant.getForward().front().getOps<CombineOp>();
  size_t count = std::distance(combines.begin(), combines.end());
  if (count != 1) {
    why << "its forward has " << count << " combines, not one";
    return failure();
  }
  CombineOp combine = *combines.begin();
  FailureOr<GroupedGemmOp> producer = producerOf(combine, why);
  if (failed(producer))
    return failure();
  GroupedGemmOp gemm = *producer;
  StringRef what;
  if (gemm.getPre())
    what = "keeps 'pre'";
  else if (gemm.getAccumulate())
    what = "accumulates";
  else if (gemm.getRowTokens())
    what = "gathers its 'a' (row_tokens)";
  if (!what.empty()) {
    why << "the moert.grouped_gemm writing its expert_out " << what;
    return failure();
  }
  if (gemm.getExpertOffsets() != combine.getExpertOffsets()) {
    why << "the moert.grouped_gemm writing its expert_out runs over other "
           "segments than its routing's experts";
    return failure();
  }
  Value rows = combine.getExpertOut(), out = combine.getOut();
  Type element = elementOf(out);
  if (elementOf(rows) != element || elementOf(gemm.getA()) != element ||
      elementOf(gemm.getB()) != element) {
    why << "its out, expert_out and the GEMM's a and b are not one element "
           "type";
    return failure();
  }
  if (!element.isBF16() && !element.isF16()) {
    why << "its rows are " << element << "; the fused step needs bf16 or f16";
    return failure();
  }
  if (columns(gemm.getA()) % kVector != 0 || columns(out) % kVector != 0) {
    why << "the GEMM has K = " << columns(gemm.getA())
        << " and d = " << columns(out) << "; both must be multiples of "
        << kVector;
    return failure();
  }

  // The fused step runs in the combine's place: nothing in between may use
  // the rows or out, or change what the GEMM reads.
  SmallVector<Value> inputs = {gemm.getA(), gemm.getB(),
                               gemm.getExpertOffsets(), gemm.getExpertRows()};
  if (gemm.getBias())
    inputs.push_back(gemm.getBias());
  for (Value output : {rows, out})
    if (llvm::is_contained(inputs, output)) {
      why << "the fused step would read and write '" << bufferName(output)
          << "'";
      return failure();
    }
  for (Operation *step = gemm->getNextNode(); step != combine;
       step = step->getNextNode()) {
    for (Value used : {rows, out})
      if (touches(step, used)) {
        why << "moert." << stepName(step) << " between the GEMM and it uses '"
            << bufferName(used) << "'";
        return failure();
      }
    for (Value input : inputs)
      if (writes(step, input)) {
        why << "moert." << stepName(step) << " between the GEMM and it writes '"
            << bufferName(input) << "', which the GEMM reads";
        return failure();
      }
  }

  // The row -> token map, where a dispatch_rows over the same routing wrote
  // it before the GEMM (a gather-fused variant's) and nothing else writes it.
  DispatchRowsOp rowMap;
  for (auto map : variant.getForward().front().getOps<DispatchRowsOp>())
    if (map->isBeforeInBlock(gemm) &&
        map.getIndices() == combine.getIndices() &&
        map.getLocations() == combine.getLocations() &&
        map.getCapacity() == combine.getCapacity() &&
        map.getExpertOffsets() == combine.getExpertOffsets() &&
        llvm::none_of(stepsOf(variant), [&](Operation *step) {
          return step != map && writes(step, map.getRowTokens());
        }))
      rowMap = map;
  return GemmAndCombine{gemm, combine, rowMap};
}

struct MoeRTFuseCombinePass final
    : flex::moert::impl::MoeRTFuseCombinePassBase<MoeRTFuseCombinePass> {
  using Base::Base;

  void runOnOperation() override {
    PlanOp plan = getOperation();
    VariantFusion fusion(plan, "--moert-fuse-combine");
    if (failed(fusion.fuseEach(
            "+combine", report,
            [&](VariantOp variant, std::string &reason) {
              return analyze(variant, reason);
            },
            [&](VariantOp variant, const GemmAndCombine &pair,
                StringRef fusedName) {
              return fuse(fusion, variant, pair, fusedName);
            })))
      signalPassFailure();
  }

  /// Adds `fusedName`, the fused copy of `variant`: the pair is one
  /// grouped_gemm_combine in the combine's place.
  LogicalResult fuse(VariantFusion &fusion, VariantOp variant,
                     const GemmAndCombine &pair, StringRef fusedName) {
    // The copy uses every buffer the original does (it still writes the
    // rows: combine_backward reads them).
    llvm::SetVector<Value> used;
    for (Operation *step : stepsOf(variant))
      used.insert(step->getOperands().begin(), step->getOperands().end());
    FailureOr<FusedCopy> fused = fusion.copyVariant(variant, fusedName, used);
    if (failed(fused))
      return failure();

    llvm::DenseMap<Operation *, Operation *> copyOf =
        stepCopies(variant, fused->variant);
    auto gemm = cast<GroupedGemmOp>(copyOf[pair.gemm]);
    auto combine = cast<CombineOp>(copyOf[pair.combine]);
    // The copy's row_tokens: what its copy of the dispatch_rows writes.
    Value rowTokens;
    if (pair.rowMap)
      rowTokens = cast<DispatchRowsOp>(copyOf[pair.rowMap]).getRowTokens();
    OpBuilder b(variant->getContext());
    b.setInsertionPoint(combine);
    SmallVector<NamedAttribute> attrs =
        llvm::to_vector(combine->getDiscardableAttrs());
    if (gemm.getTransB())
      attrs.push_back(b.getNamedAttr("trans_b", b.getUnitAttr()));
    if (auto epilogue = gemm.getEpilogueAttr())
      attrs.push_back(b.getNamedAttr("epilogue", epilogue));
    if (auto scale = gemm.getBiasScaleAttr())
      attrs.push_back(b.getNamedAttr("bias_scale", scale));
    createStep<GroupedGemmCombineOp>(
        b, combine.getLoc(),
        {{"a", gemm.getA()},
         {"b", gemm.getB()},
         {"bias", gemm.getBias()},
         {"expert_offsets", gemm.getExpertOffsets()},
         {"expert_rows", gemm.getExpertRows()},
         {"row_tokens", rowTokens},
         {"indices", combine.getIndices()},
         {"locations", combine.getLocations()},
         {"gates", combine.getGates()},
         {"capacity", combine.getCapacity()},
         {"c", gemm.getC()},
         {"out", combine.getOut()}},
        attrs);
    combine.erase();
    gemm.erase();
    if (report)
      variant.emitRemark("variant '")
          << variant.getName() << "' fused as '" << fusedName
          << "': 1 grouped_gemm_combine step"
          << (rowTokens ? " (with the variant's row_tokens)" : "");
    return success();
  }
};
} // namespace
