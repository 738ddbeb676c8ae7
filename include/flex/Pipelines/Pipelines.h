//===- Pipelines.h - Flex pass pipelines ------------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares Flex's pass pipelines, shared by moe-opt (as
// --moe-lower-to-plan) and the C API's compiler.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_PIPELINES_PIPELINES_H
#define FLEX_PIPELINES_PIPELINES_H

#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassOptions.h"

namespace flex {

struct LowerToPlanOptions
    : public mlir::PassPipelineOptions<LowerToPlanOptions> {
  Option<bool> training{*this, "training",
                        llvm::cl::desc("Emit backward steps too"),
                        llvm::cl::init(false)};
  Option<std::string> layout{
      *this, "layout",
      llvm::cl::desc("Expert row layout: auto, padded, ragged or aligned"),
      llvm::cl::init("auto")};
  ListOption<std::string> layouts{
      *this, "layouts",
      llvm::cl::desc("Several layouts, one variant each: padded,ragged,"
                     "aligned "
                     "(the one layout=auto gives first)")};
  Option<bool> fuseDispatch{
      *this, "fuse-dispatch",
      llvm::cl::desc("Add a `<variant>+gather` variant whose grouped GEMMs "
                     "gather the dispatched rows from x "
                     "(--moert-fuse-dispatch); the cost model picks "
                     "between them per call"),
      llvm::cl::init(true)};
  Option<bool> fuseGlu{
      *this, "fuse-glu",
      llvm::cl::desc("Add a `<variant>+glu` variant whose gated experts "
                     "compute gate, up and glu in one grouped_gemm_glu "
                     "step (--moert-fuse-glu, after --moert-fuse-dispatch); "
                     "the cost model picks between them per call"),
      llvm::cl::init(true)};
  Option<bool> fuseCombine{
      *this, "fuse-combine",
      llvm::cl::desc("Add a `<variant>+combine` variant whose forward "
                     "computes each expert's second layer and the combine "
                     "in one grouped_gemm_combine step (--moert-fuse-combine, "
                     "after the dispatch and glu fusions); the cost model "
                     "picks between them per call"),
      llvm::cl::init(false)};
  Option<bool> fuseActivationBackward{
      *this, "fuse-activation-backward",
      llvm::cl::desc("Add a `<variant>+act_backward` variant whose training "
                     "backward computes each expert's input gradient and "
                     "activation backward in one "
                     "grouped_gemm_activation_backward step "
                     "(--moert-fuse-activation-backward, after the other "
                     "fusions); the cost model picks between them per call"),
      llvm::cl::init(false)};
};

/// moe IR -> placed moert plans: expand layers, canonicalize, lower each
/// layer function to a plan, with `fuse-dispatch` add the gather-fused
/// variants, with `fuse-glu` the glu-fused ones (of those too), with
/// `fuse-combine` the combine-fused ones (of those too), with
/// `fuse-activation-backward` the backward-fused ones (of all of those),
/// place its workspace.
void buildLowerToPlanPipeline(mlir::OpPassManager &pm,
                              const LowerToPlanOptions &options);

void registerPipelines();

} // namespace flex

#endif // FLEX_PIPELINES_PIPELINES_H
