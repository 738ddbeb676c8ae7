//===- ExpandLayer.cpp - Split moe.layer into its four steps --------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moe-expand-layer: each moe.layer becomes moe.gate,
// moe.dispatch, moe.expert and moe.combine with the same configuration, so
// the parallelizing passes see the steps they rearrange.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"

namespace flex::moe {
#define GEN_PASS_DEF_MOEEXPANDLAYERPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct MoeExpandLayerPass final
    : flex::moe::impl::MoeExpandLayerPassBase<MoeExpandLayerPass> {
  using Base::Base;

  void runOnOperation() override {
    SmallVector<LayerOp> layers;
    getOperation()->walk([&](LayerOp layer) { layers.push_back(layer); });
    IRRewriter rewriter(&getContext());
    for (LayerOp layer : layers)
      expandLayer(layer, rewriter);
  }
};
} // namespace
