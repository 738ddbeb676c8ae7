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

#include "flex/Dialect/Moe/Transforms/Passes.h"

#include "mlir/IR/PatternMatch.h"
#include "mlir/Transforms/WalkPatternRewriteDriver.h"

namespace flex::moe {
#define GEN_PASS_DEF_MOEEXPANDLAYERPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct ExpandLayer : OpRewritePattern<LayerOp> {
  using OpRewritePattern::OpRewritePattern;

  LogicalResult matchAndRewrite(LayerOp layer,
                                PatternRewriter &rewriter) const override {
    Location loc = layer.getLoc();
    auto input = cast<RankedTensorType>(layer.getInput().getType());
    int64_t tokens = layer.getNumTokens();
    int64_t experts = layer.getNumExperts();
    int64_t topK = layer.getTopK();
    std::optional<int64_t> capacity =
        layer.getCapacity().getStaticCapacity(tokens, experts, topK);
    auto routingType = RoutingType::get(
        rewriter.getContext(), tokens, experts, topK,
        capacity.value_or(ShapedType::kDynamic));

    auto gate = GateOp::create(
        rewriter, loc, routingType, layer.getAuxLoss().getType(),
        layer.getInput(), layer.getRouterWeight(), layer.getCapacityAttr(),
        layer.getNormalizeAttr(), layer.getBatchPrioritizedAttr(),
        layer.getGateNoiseAttr(), layer.getSeedAttr());

    auto bufferType = RankedTensorType::get(
        {experts, routingType.getCapacity(), input.getDimSize(1)},
        input.getElementType());
    auto dispatch = DispatchOp::create(rewriter, loc, bufferType,
                                       layer.getInput(), gate.getRouting());
    auto expert = ExpertOp::create(
        rewriter, loc, bufferType, dispatch.getResult(),
        layer.getFc1Weight(), layer.getFc2Weight(), layer.getUpWeight(),
        layer.getFc1Bias(), layer.getFc2Bias(), layer.getKindAttr(),
        layer.getActivationAttr());
    auto combine = CombineOp::create(rewriter, loc, input, expert.getResult(),
                                     gate.getRouting());
    rewriter.replaceOp(layer,
                       ValueRange{combine.getResult(), gate.getAuxLoss()});
    return success();
  }
};

struct MoeExpandLayerPass final
    : flex::moe::impl::MoeExpandLayerPassBase<MoeExpandLayerPass> {
  using Base::Base;

  void runOnOperation() override {
    RewritePatternSet patterns(&getContext());
    patterns.add<ExpandLayer>(&getContext());
    walkAndApplyPatterns(getOperation(), std::move(patterns));
  }
};
} // namespace
