//===- Pipeline.cpp - Split the expert exchange into chunks ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moe-pipeline: the capacity of an expert-parallel
// layer is split into D chunks, so the runtime can overlap the all-to-all of
// one chunk with the experts of another.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"

namespace flex::moe {
#define GEN_PASS_DEF_MOEPIPELINEPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct MoePipelinePass final
    : flex::moe::impl::MoePipelinePassBase<MoePipelinePass> {
  using Base::Base;

  void runOnOperation() override {
    func::FuncOp func = getOperation();
    bool hasGate = false;
    func.walk([&](GateOp) { hasGate = true; });
    if (!hasGate)
      return;
    if (failed(pipelineLayer(func, chunks)))
      signalPassFailure();
  }
};
} // namespace
