//===- VariantFusion.h - What the variant-fusing passes share ---*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares what --moert-fuse-dispatch, --moert-fuse-glu and
// --moert-fuse-activation-backward share (internal to this library): each
// adds, after every variant of a plan, a fused copy `<name><suffix>` of each
// variant it can fuse, with workspace buffers of its own, and keeps the
// original. Which variants qualify and how the copy is rewritten stay in
// each pass's file.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_DIALECT_MOERT_TRANSFORMS_VARIANTFUSION_H
#define LIB_DIALECT_MOERT_TRANSFORMS_VARIANTFUSION_H

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"

#include "llvm/ADT/DenseMap.h"
#include "llvm/ADT/SetVector.h"
#include "llvm/ADT/StringSet.h"

#include <string>

namespace flex::moert {

/// The number of columns of a 2-D buffer.
int64_t columns(mlir::Value buffer);

/// Steps of `variant`, forward then backward.
llvm::SmallVector<mlir::Operation *> stepsOf(VariantOp variant);

/// The step's name in the plan (`grouped_gemm`), for the remarks.
llvm::StringRef stepName(mlir::Operation *step);

/// The plan's name of a buffer, for the remarks.
llvm::StringRef bufferName(mlir::Value buffer);

/// The element type of a buffer.
mlir::Type elementOf(mlir::Value buffer);

/// Whether `step` writes `buffer` (one of its outputs).
bool writes(mlir::Operation *step, mlir::Value buffer);

/// Whether `step` reads or writes `buffer`.
bool touches(mlir::Operation *step, mlir::Value buffer);

/// Each step of `original` to its counterpart in `copy`, a copy of it
/// (VariantFusion::copyVariant): the steps in the same order.
llvm::DenseMap<mlir::Operation *, mlir::Operation *>
stepCopies(VariantOp original, VariantOp copy);

/// A workspace buffer that a fused copy adds, with no counterpart in the
/// original variant; named `<fused>.<name>` in the plan.
struct AddedBuffer {
  llvm::StringRef name;
  mlir::MemRefType type;
  mlir::Location loc;
};

/// A fused copy of a variant, and its added buffers in the order asked for.
struct FusedCopy {
  VariantOp variant;
  llvm::SmallVector<mlir::Value> added;
};

/// Adds fused copies of a plan's variants for the pass whose flag is `pass`
/// (`--moert-fuse-glu`), which the diagnostics name.
class VariantFusion {
public:
  VariantFusion(PlanOp plan, llvm::StringRef pass);

  /// For each variant the plan had, in order: `analyze(variant, reason)`
  /// returns a FailureOr of what fusing it needs (on failure, `reason` says
  /// why not), and `fuse(variant, analysis, fusedName)` adds the copy
  /// `<variant><suffix>` (copyVariant) and rewrites it. A variant whose
  /// copy's name the plan has already is not fused. With `report`, a remark
  /// names each variant not fused and why. Fails where a variant would be
  /// fused in a plan whose workspace is placed ([plan-3]), or `fuse` fails.
  template <typename AnalyzeFn, typename FuseFn>
  mlir::LogicalResult fuseEach(llvm::StringRef suffix, bool report,
                               AnalyzeFn analyze, FuseFn fuse);

  /// Adds `fusedName`, a copy of `variant`, after every variant the plan
  /// had: the existing variants keep their indices (a caller selecting one
  /// by index, FLEX_VARIANT=1, gets what it got before the pass). The copy
  /// reads and writes its own copy of each workspace buffer in `used` (in
  /// plan order), then the `added` buffers, named `<fusedName>.<name>`
  /// where the original's were `<variant>.<name>` or `<name>`. A name the
  /// plan has already is an error ([plan-3]).
  mlir::FailureOr<FusedCopy>
  copyVariant(VariantOp variant, llvm::StringRef fusedName,
              const llvm::SetVector<mlir::Value> &used,
              llvm::ArrayRef<AddedBuffer> added = {});

private:
  /// A plan whose workspace is placed (--moert-plan-memory) takes no new
  /// buffers ([plan-3]).
  mlir::LogicalResult checkWorkspaceNotPlaced();

  PlanOp plan;
  std::string pass;
  /// The names of the plan's arguments and workspace buffers.
  llvm::StringSet<> bufferNames;
};

template <typename AnalyzeFn, typename FuseFn>
mlir::LogicalResult VariantFusion::fuseEach(llvm::StringRef suffix, bool report,
                                            AnalyzeFn analyze, FuseFn fuse) {
  llvm::StringSet<> variantNames;
  for (VariantOp variant : plan.getBody().getOps<VariantOp>())
    variantNames.insert(variant.getName());

  for (VariantOp variant :
       llvm::to_vector(plan.getBody().getOps<VariantOp>())) {
    std::string reason;
    auto fusible = analyze(variant, reason);
    std::string fusedName = (variant.getName() + suffix).str();
    if (mlir::succeeded(fusible) && variantNames.contains(fusedName)) {
      reason = "the plan has a variant '" + fusedName + "' already";
      fusible = mlir::failure();
    }
    if (mlir::failed(fusible)) {
      if (report)
        variant.emitRemark("variant '")
            << variant.getName() << "' not fused: " << reason;
      continue;
    }
    if (mlir::failed(checkWorkspaceNotPlaced()) ||
        mlir::failed(fuse(variant, *fusible, fusedName)))
      return mlir::failure();
    variantNames.insert(fusedName);
  }
  return mlir::success();
}

} // namespace flex::moert

#endif // LIB_DIALECT_MOERT_TRANSFORMS_VARIANTFUSION_H
