//===- Parallelize.cpp - Parallelize a layer over ranks -------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moe-parallelize: an expanded single-rank layer runs
// on W ranks, expert parallel (all-to-all of tokens) or data parallel
// (all-gather of experts), with one parameter layout for both; with fewer
// experts than ranks each expert is sharded over W / E ranks.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"

namespace flex::moe {
#define GEN_PASS_DEF_MOEPARALLELIZEPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct MoeParallelizePass final
    : flex::moe::impl::MoeParallelizePassBase<MoeParallelizePass> {
  using Base::Base;

  void runOnOperation() override {
    func::FuncOp func = getOperation();
    bool hasGate = false;
    func.walk([&](GateOp) { hasGate = true; });
    if (!hasGate)
      return;
    if (failed(parallelizeLayer(func, ranks, parallelism)))
      signalPassFailure();
  }
};
} // namespace
