//===- MoeOps.cpp - Operations of the moe dialect -------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the verifiers, custom syntax and canonicalization
// patterns of the `moe` ops. Every diagnostic names the rule of DESIGN.md
// section 3 it enforces.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/IR/MoeOps.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/OpImplementation.h"
#include "mlir/IR/PatternMatch.h"

#include <cmath>
#include <limits>

using namespace mlir;
using namespace flex::moe;

//===----------------------------------------------------------------------===//
// Shared checks
//===----------------------------------------------------------------------===//

namespace {
/// `[a, b, c]` for diagnostics, with `?` for dynamic sizes.
std::string formatShape(ArrayRef<int64_t> shape) {
  std::string text = "[";
  llvm::raw_string_ostream os(text);
  llvm::interleaveComma(shape, os, [&](int64_t dim) {
    if (ShapedType::isDynamic(dim))
      os << '?';
    else
      os << dim;
  });
  os << ']';
  return text;
}

RankedTensorType tensorType(Value value) {
  return cast<RankedTensorType>(value.getType());
}

/// [shape-1]: plans are static, so every size must be known (except the
/// capacity dimension, which `allowDynamicDim` names) and the element count
/// must fit in int64.
LogicalResult verifyStaticShape(Operation *op, StringRef what,
                                RankedTensorType type,
                                int64_t allowDynamicDim = -1) {
  int64_t elements = 1;
  for (auto [dim, size] : llvm::enumerate(type.getShape())) {
    if (ShapedType::isDynamic(size)) {
      if (int64_t(dim) == allowDynamicDim)
        continue;
      return op->emitOpError("[shape-1] ")
             << what << " must have a static shape, got "
             << formatShape(type.getShape());
    }
    if (size < 1)
      return op->emitOpError("[shape-1] ")
             << what << " must have sizes >= 1, got "
             << formatShape(type.getShape());
    if (llvm::MulOverflow(elements, size, elements))
      return op->emitOpError("[size-1] ")
             << what << " of shape " << formatShape(type.getShape())
             << " has more elements than int64 can count";
  }
  return success();
}

/// Checks that `actual` has the shape `expected`; `?` in `expected` matches
/// anything.
LogicalResult verifyShape(Operation *op, StringRef rule, StringRef what,
                          RankedTensorType actual, ArrayRef<int64_t> expected) {
  bool same = actual.getRank() == int64_t(expected.size());
  for (size_t i = 0; same && i < expected.size(); ++i)
    same = ShapedType::isDynamic(expected[i]) ||
           actual.getDimSize(i) == expected[i];
  if (same)
    return success();
  return op->emitOpError("[")
         << rule << "] " << what << " must have shape " << formatShape(expected)
         << ", got " << formatShape(actual.getShape());
}

LogicalResult verifySameElementType(Operation *op, StringRef rule,
                                    StringRef what, RankedTensorType actual,
                                    Type expected) {
  if (actual.getElementType() == expected)
    return success();
  return op->emitOpError("[")
         << rule << "] " << what << " must have element type " << expected
         << ", got " << actual.getElementType();
}

/// [gate-1]: input [T, d], router weight [d, E] of f32 or the input's type.
LogicalResult verifyRouter(Operation *op, RankedTensorType input,
                           RankedTensorType routerWeight) {
  if (failed(verifyStaticShape(op, "input", input)) ||
      failed(verifyStaticShape(op, "router weight", routerWeight)))
    return failure();
  if (routerWeight.getDimSize(0) != input.getDimSize(1))
    return op->emitOpError("[gate-1] router weight must be [d, E] with d = ")
           << input.getDimSize(1) << " from the input, got "
           << formatShape(routerWeight.getShape());
  Type routerElement = routerWeight.getElementType();
  if (!routerElement.isF32() && routerElement != input.getElementType())
    return op->emitOpError("[gate-1] router weight must be f32 or the "
                           "input's element type ")
           << input.getElementType() << ", got " << routerElement;
  return success();
}

LogicalResult verifyNoise(Operation *op, double noise) {
  if (!std::isfinite(noise) || noise < 0.0)
    return op->emitOpError("[gate-1] gate noise must be finite and >= 0, got ")
           << noise;
  return success();
}

/// [expert-1]: weights of E experts for model dim d; returns h.
LogicalResult verifyExpertWeights(Operation *op, ExpertKind kind,
                                  std::optional<Activation> activation,
                                  int64_t experts, int64_t modelDim,
                                  Type element, Value fc1, Value fc2, Value up,
                                  Value fc1Bias, Value fc2Bias) {
  RankedTensorType fc1Type = tensorType(fc1);
  if (failed(verifyStaticShape(op, "fc1 weight", fc1Type)))
    return failure();
  int64_t hidden = fc1Type.getDimSize(2);
  if (failed(verifyShape(op, "expert-1", "fc1 weight [E, d, h]", fc1Type,
                         {experts, modelDim, hidden})) ||
      failed(verifyShape(op, "expert-1", "fc2 weight [E, h, d]",
                         tensorType(fc2), {experts, hidden, modelDim})))
    return failure();
  if (failed(verifySameElementType(op, "expert-1", "fc1 weight", fc1Type,
                                   element)) ||
      failed(verifySameElementType(op, "expert-1", "fc2 weight",
                                   tensorType(fc2), element)))
    return failure();

  if (kind == ExpertKind::Gated) {
    if (!up)
      return op->emitOpError("[expert-1] a gated expert needs the up "
                             "projection W3: add up(%w3)");
    if (activation)
      return op->emitOpError("[expert-1] a gated expert uses silu (SwiGLU) "
                             "and takes no activation, got ")
             << stringifyActivation(*activation);
    if (fc1Bias || fc2Bias)
      return op->emitOpError("[expert-1] a gated expert takes no biases");
    if (failed(verifyShape(op, "expert-1", "up weight [E, d, h]",
                           tensorType(up), {experts, modelDim, hidden})) ||
        failed(verifySameElementType(op, "expert-1", "up weight",
                                     tensorType(up), element)))
      return failure();
    return success();
  }

  if (up)
    return op->emitOpError("[expert-1] an ffn expert takes no up projection; "
                           "use 'gated' for SwiGLU");
  if (!activation)
    return op->emitOpError("[expert-1] an ffn expert needs an activation: "
                           "ffn<relu>, ffn<gelu> or ffn<silu>");
  if (fc1Bias) {
    if (failed(verifyShape(op, "expert-1", "fc1 bias [E, h]",
                           tensorType(fc1Bias), {experts, hidden})) ||
        failed(verifyShape(op, "expert-1", "fc2 bias [E, d]",
                           tensorType(fc2Bias), {experts, modelDim})) ||
        failed(verifySameElementType(op, "expert-1", "fc1 bias",
                                     tensorType(fc1Bias), element)) ||
        failed(verifySameElementType(op, "expert-1", "fc2 bias",
                                     tensorType(fc2Bias), element)))
      return failure();
  }
  return success();
}

/// [cap-1]: the routing capacity must be what the capacity mode gives.
LogicalResult verifyCapacity(Operation *op, CapacityAttr capacity,
                             int64_t tokens, int64_t experts, int64_t topK,
                             std::optional<int64_t> routingCapacity) {
  if (capacity.getMode() != CapacityMode::Dropless) {
    std::optional<int64_t> bound =
        capacity.getCapacityBound(tokens, experts, topK);
    if (!bound)
      return op->emitOpError("[cap-1] capacity factor ")
             << capacity.getFactorValue()
             << " gives a capacity that overflows int64";
    // A zero capacity drops every token: the layer would output zeros.
    if (*bound == 0)
      return op->emitOpError("[cap-1] capacity factor ")
             << capacity.getFactorValue() << " gives capacity 0 (k * int(f * "
             << "ceil(T/E)) with T = " << tokens << ", E = " << experts
             << ", k = " << topK
             << "): every token would be dropped; raise the factor";
  }
  if (!routingCapacity)
    return success();
  std::optional<int64_t> expected =
      capacity.getStaticCapacity(tokens, experts, topK);
  if (capacity.getMode() == CapacityMode::Fixed && !expected)
    return op->emitOpError("[cap-1] fixed capacity overflows int64");
  int64_t actual = *routingCapacity;
  if (expected && actual != *expected)
    return op->emitOpError("[cap-1] fixed capacity ")
           << capacity << " needs routing capacity " << *expected
           << " (k * int(f * ceil(T/E)) with T = " << tokens
           << ", E = " << experts << ", k = " << topK << "), got "
           << (ShapedType::isDynamic(actual) ? std::string("?")
                                             : std::to_string(actual));
  if (!expected && !ShapedType::isDynamic(actual))
    return op->emitOpError("[cap-1] the ")
           << stringifyCapacityMode(capacity.getMode())
           << " capacity depends on the routing: routing capacity must be "
              "'?', got "
           << actual;
  return success();
}
} // namespace

//===----------------------------------------------------------------------===//
// custom<ExpertKind>: `ffn<relu>` or `gated`
//===----------------------------------------------------------------------===//

static ParseResult parseExpertKind(OpAsmParser &parser, ExpertKindAttr &kind,
                                   ActivationAttr &activation) {
  SMLoc loc = parser.getCurrentLocation();
  StringRef keyword;
  if (parser.parseKeyword(&keyword))
    return failure();
  std::optional<ExpertKind> parsedKind = symbolizeExpertKind(keyword);
  if (!parsedKind)
    return parser.emitError(loc, "[expert-1] unknown expert kind '")
           << keyword << "'; expected ffn<relu|gelu|silu> or gated";
  MLIRContext *context = parser.getContext();
  kind = ExpertKindAttr::get(context, *parsedKind);
  if (failed(parser.parseOptionalLess()))
    return success();
  SMLoc actLoc = parser.getCurrentLocation();
  StringRef actName;
  if (parser.parseKeyword(&actName))
    return failure();
  std::optional<Activation> act = symbolizeActivation(actName);
  if (!act)
    return parser.emitError(actLoc, "[expert-1] unknown activation '")
           << actName << "'; expected relu, gelu or silu";
  activation = ActivationAttr::get(context, *act);
  return parser.parseGreater();
}

static void printExpertKind(OpAsmPrinter &printer, Operation *,
                            ExpertKindAttr kind, ActivationAttr activation) {
  printer << stringifyExpertKind(kind.getValue());
  if (activation)
    printer << '<' << stringifyActivation(activation.getValue()) << '>';
}

#define GET_OP_CLASSES
#include "flex/Dialect/Moe/IR/MoeOps.cpp.inc"

//===----------------------------------------------------------------------===//
// GateOp
//===----------------------------------------------------------------------===//

LogicalResult GateOp::verify() {
  RankedTensorType input = tensorType(getInput());
  RankedTensorType routerWeight = tensorType(getRouterWeight());
  if (failed(verifyRouter(*this, input, routerWeight)) ||
      failed(verifyNoise(*this, getNoise().convertToDouble())))
    return failure();
  RoutingType routing = getRouting().getType();
  int64_t tokens = input.getDimSize(0);
  int64_t experts = routerWeight.getDimSize(1);
  // Whole experts per rank (E % W == 0), or each expert sharded over
  // s = W / E ranks (W % E == 0).
  int64_t ranks = getRanks();
  if (ranks < 1 || (experts % ranks != 0 && ranks % experts != 0))
    return emitOpError("[par-1] ")
           << experts << " experts cannot be split evenly over " << ranks
           << " ranks (ranks >= 1 and E % W == 0, or W % E == 0 with each "
              "expert sharded over W / E ranks)";
  if (routing.getTokens() != tokens || routing.getExperts() != experts)
    return emitOpError("[gate-1] routing must be for T = ")
           << tokens << " tokens and E = " << experts
           << " experts from the operands, got " << routing;
  if (failed(verifyCapacity(*this, getCapacity(), tokens, experts,
                            routing.getTopK(), routing.getCapacity())))
    return failure();
  // The routing buffers are i32: the rows of both layouts (T * k kept
  // choices, E * C padded slots, E * s * C once experts are sharded over
  // s = W / E ranks) must fit, or the plan's offsets would wrap.
  constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
  int64_t choices = 0, slots = 0;
  int64_t shards = ranks > experts ? ranks / experts : 1;
  if (llvm::MulOverflow(tokens, routing.getTopK(), choices) ||
      choices > kI32Max)
    return emitOpError("[size-1] tokens * top_k = ")
           << tokens << " * " << routing.getTopK()
           << " exceeds the i32 range of the routing buffers";
  if (routing.hasStaticCapacity() &&
      (llvm::MulOverflow(experts * shards, routing.getCapacity(), slots) ||
       slots > kI32Max))
    return emitOpError("[size-1] experts * shards * capacity = ")
           << experts << " * " << shards << " * " << routing.getCapacity()
           << " exceeds the i32 range of the routing buffers";
  return success();
}

//===----------------------------------------------------------------------===//
// DispatchOp
//===----------------------------------------------------------------------===//

LogicalResult DispatchOp::verify() {
  RankedTensorType input = tensorType(getInput());
  RankedTensorType result = getResult().getType();
  RoutingType routing = getRouting().getType();
  if (failed(verifyStaticShape(*this, "input", input)) ||
      failed(verifyStaticShape(*this, "result", result,
                               /*allowDynamicDim=*/1)))
    return failure();
  if (input.getDimSize(0) != routing.getTokens())
    return emitOpError("[dispatch-1] input has ")
           << input.getDimSize(0) << " tokens but the routing has "
           << routing.getTokens();
  if (routing.hasStaticCapacity() != !result.isDynamicDim(1))
    return emitOpError("[dispatch-1] result capacity must be ")
           << (routing.hasStaticCapacity() ? "static" : "'?'")
           << " as the routing's, got " << formatShape(result.getShape());
  if (failed(verifyShape(
          *this, "dispatch-1", "result [E, C, d]", result,
          {routing.getExperts(), routing.getCapacity(), input.getDimSize(1)})))
    return failure();
  return verifySameElementType(*this, "dispatch-1", "result", result,
                               input.getElementType());
}

//===----------------------------------------------------------------------===//
// ExpertOp
//===----------------------------------------------------------------------===//

LogicalResult ExpertOp::verify() {
  RankedTensorType input = tensorType(getInput());
  if (failed(verifyStaticShape(*this, "input", input, /*allowDynamicDim=*/1)))
    return failure();
  if (getResult().getType() != input)
    return emitOpError("[expert-1] result must have the input's type ")
           << input << ", got " << getResult().getType();
  if (getHiddenShards() < 1)
    return emitOpError("[par-1] hidden_shards must be >= 1, got ")
           << getHiddenShards();
  std::optional<Activation> activation;
  if (getActivationAttr())
    activation = getActivationAttr().getValue();
  return verifyExpertWeights(*this, getKind(), activation, input.getDimSize(0),
                             input.getDimSize(2), input.getElementType(),
                             getFc1Weight(), getFc2Weight(), getUpWeight(),
                             getFc1Bias(), getFc2Bias());
}

//===----------------------------------------------------------------------===//
// ShardRoutingOp
//===----------------------------------------------------------------------===//

LogicalResult ShardRoutingOp::verify() {
  int64_t shards = getShards();
  if (shards < 1)
    return emitOpError("[par-1] shards must be >= 1, got ") << shards;
  RoutingType routing = getRouting().getType();
  RoutingType result = getResult().getType();
  int64_t experts, topK;
  if (llvm::MulOverflow(routing.getExperts(), shards, experts) ||
      llvm::MulOverflow(routing.getTopK(), shards, topK))
    return emitOpError("[size-1] ")
           << shards << " shards of " << routing << " overflow int64";
  if (result.getTokens() != routing.getTokens() ||
      result.getExperts() != experts || result.getTopK() != topK ||
      result.getCapacity() != routing.getCapacity())
    return emitOpError("[par-1] result must be routing<tokens = T, experts = "
                       "E * s, top_k = k * s, capacity = C> = ")
           << RoutingType::get(getContext(), routing.getTokens(), experts, topK,
                               routing.getCapacity())
           << " for s = " << shards << " shards, got " << result;
  return success();
}

//===----------------------------------------------------------------------===//
// CombineOp
//===----------------------------------------------------------------------===//

LogicalResult CombineOp::verify() {
  RankedTensorType input = tensorType(getInput());
  RankedTensorType result = getResult().getType();
  RoutingType routing = getRouting().getType();
  if (failed(verifyStaticShape(*this, "input", input, /*allowDynamicDim=*/1)) ||
      failed(verifyStaticShape(*this, "result", result)))
    return failure();
  if (routing.hasStaticCapacity() != !input.isDynamicDim(1))
    return emitOpError("[combine-1] input capacity must be ")
           << (routing.hasStaticCapacity() ? "static" : "'?'")
           << " as the routing's, got " << formatShape(input.getShape());
  if (failed(verifyShape(
          *this, "combine-1", "input [E, C, d]", input,
          {routing.getExperts(), routing.getCapacity(), result.getDimSize(1)})))
    return failure();
  if (result.getDimSize(0) != routing.getTokens())
    return emitOpError("[combine-1] result has ")
           << result.getDimSize(0) << " tokens but the routing has "
           << routing.getTokens();
  return verifySameElementType(*this, "combine-1", "result", result,
                               input.getElementType());
}

//===----------------------------------------------------------------------===//
// AllToAllOp
//===----------------------------------------------------------------------===//

LogicalResult AllToAllOp::verify() {
  int64_t ranks = getRanks();
  if (ranks < 1)
    return emitOpError("[par-1] ranks must be >= 1, got ") << ranks;
  int64_t perNode = getRanksPerNode();
  if (perNode < 0 || (perNode > 0 && ranks % perNode != 0))
    return emitOpError("[a2a-1] ranks_per_node must be 0 (flat) or divide "
                       "the ranks ")
           << ranks << ", got " << perNode;
  // Ranks group_stride apart (experts sharded with 1 <= r < s); 2DH runs
  // over all ranks, so a grouped exchange is flat.
  int64_t stride = getGroupStride();
  if (stride < 1)
    return emitOpError("[par-1] group_stride must be >= 1, got ") << stride;
  if (stride > 1 && perNode != 0)
    return emitOpError("[a2a-1] a grouped all-to-all (group_stride ")
           << stride << ") is flat: ranks_per_node must be 0, got " << perNode;
  bool dispatch = getDirection() == AllToAllDirection::Dispatch;
  ValueRange whole = dispatch ? getInputs() : ValueRange(getResults());
  ValueRange chunks = dispatch ? ValueRange(getResults()) : getInputs();
  if (whole.size() != 1)
    return emitOpError("[par-1] a ")
           << stringifyAllToAllDirection(getDirection())
           << " all-to-all has one " << (dispatch ? "input" : "result")
           << " [E, C, d], got " << whole.size();
  if (chunks.empty())
    return emitOpError("[pipe-1] an all-to-all moves at least one chunk");
  RankedTensorType buffer = tensorType(whole[0]);
  if (failed(verifyStaticShape(*this, "expert buffer", buffer,
                               /*allowDynamicDim=*/1)))
    return failure();
  int64_t experts = buffer.getDimSize(0);
  if (experts % ranks != 0)
    return emitOpError("[par-1] ")
           << experts << " experts cannot be split evenly over " << ranks
           << " ranks (E % W must be 0)";
  int64_t numChunks = chunks.size();
  int64_t capacity = buffer.getDimSize(1);
  int64_t rows = ShapedType::kDynamic;
  if (!ShapedType::isDynamic(capacity)) {
    if (capacity % numChunks != 0)
      return emitOpError("[pipe-1] ")
             << numChunks << " chunks must divide the capacity " << capacity;
    rows = ranks * (capacity / numChunks);
  }
  for (Value chunk : chunks) {
    RankedTensorType type = tensorType(chunk);
    if (failed(verifyShape(*this, "par-1", "chunk [L, W * C / D, d]", type,
                           {experts / ranks, rows, buffer.getDimSize(2)})) ||
        failed(verifySameElementType(*this, "par-1", "chunk", type,
                                     buffer.getElementType())))
      return failure();
    if (ShapedType::isDynamic(rows) != type.isDynamicDim(1))
      return emitOpError("[par-1] chunk rows must be ")
             << (ShapedType::isDynamic(rows) ? "'?'" : "static")
             << " as the capacity, got " << formatShape(type.getShape());
  }
  return success();
}

//===----------------------------------------------------------------------===//
// AllGatherOp
//===----------------------------------------------------------------------===//

LogicalResult AllGatherOp::verify() {
  int64_t ranks = getRanks();
  if (ranks < 1)
    return emitOpError("[par-1] ranks must be >= 1, got ") << ranks;
  int64_t stride = getGroupStride();
  if (stride < 1)
    return emitOpError("[par-1] group_stride must be >= 1, got ") << stride;
  RankedTensorType input = tensorType(getInput());
  RankedTensorType result = getResult().getType();
  if (failed(verifyStaticShape(*this, "input", input)))
    return failure();
  SmallVector<int64_t> expected(input.getShape());
  int64_t gathered;
  if (llvm::MulOverflow(expected[0], ranks, gathered))
    return emitOpError("[size-1] gathering ")
           << expected[0] << " rows from " << ranks << " ranks overflows";
  expected[0] = gathered;
  if (failed(
          verifyShape(*this, "par-1", "result [W * L, ...]", result, expected)))
    return failure();
  return verifySameElementType(*this, "par-1", "result", result,
                               input.getElementType());
}

//===----------------------------------------------------------------------===//
// LayerOp
//===----------------------------------------------------------------------===//

LogicalResult LayerOp::verify() {
  RankedTensorType input = tensorType(getInput());
  RankedTensorType routerWeight = tensorType(getRouterWeight());
  if (failed(verifyRouter(*this, input, routerWeight)) ||
      failed(verifyNoise(*this, getGateNoise().convertToDouble())))
    return failure();
  int64_t tokens = getNumTokens();
  int64_t experts = getNumExperts();
  int64_t topK = getTopK();
  if (topK < 1 || topK > experts)
    return emitOpError("[gate-2] top_k must be in [1, experts = ")
           << experts << "], got " << topK;
  if (failed(verifyCapacity(*this, getCapacity(), tokens, experts, topK,
                            std::nullopt)))
    return failure();
  std::optional<Activation> activation;
  if (getActivationAttr())
    activation = getActivationAttr().getValue();
  if (failed(verifyExpertWeights(*this, getKind(), activation, experts,
                                 input.getDimSize(1), input.getElementType(),
                                 getFc1Weight(), getFc2Weight(), getUpWeight(),
                                 getFc1Bias(), getFc2Bias())))
    return failure();
  if (getResult().getType() != input)
    return emitOpError("[combine-1] result must have the input's type ")
           << input << ", got " << getResult().getType();
  return success();
}

//===----------------------------------------------------------------------===//
// Canonicalization
//===----------------------------------------------------------------------===//

namespace {
/// [gate-3] normalizes over the k choices only when k > 1: with k = 1 the
/// flag changes nothing, so the canonical form drops it.
template <typename OpTy>
struct DropNormalizeForTopOne : OpRewritePattern<OpTy> {
  using OpRewritePattern<OpTy>::OpRewritePattern;
  LogicalResult matchAndRewrite(OpTy op,
                                PatternRewriter &rewriter) const override {
    if (!op.getNormalize() || topK(op) != 1)
      return failure();
    rewriter.modifyOpInPlace(op, [&] { op.setNormalize(false); });
    return success();
  }
  static int64_t topK(GateOp op) { return op.getRouting().getType().getTopK(); }
  static int64_t topK(LayerOp op) { return op.getTopK(); }
};

/// [cap-1] bounded: C = min(max count, bound). No expert gets more than T
/// slots, so a bound >= T never binds and the layer is dropless.
template <typename OpTy>
struct BoundedCapacityCoveringAllTokensIsDropless : OpRewritePattern<OpTy> {
  using OpRewritePattern<OpTy>::OpRewritePattern;
  LogicalResult matchAndRewrite(OpTy op,
                                PatternRewriter &rewriter) const override {
    CapacityAttr capacity = op.getCapacity();
    if (capacity.getMode() != CapacityMode::Bounded)
      return failure();
    auto [tokens, experts, topK] = sizes(op);
    std::optional<int64_t> bound =
        capacity.getCapacityBound(tokens, experts, topK);
    if (!bound || *bound < tokens)
      return failure();
    auto dropless = CapacityAttr::get(op.getContext(), CapacityMode::Dropless,
                                      /*factor=*/0.0, capacity.getAlignment());
    rewriter.modifyOpInPlace(op, [&] { op.setCapacityAttr(dropless); });
    return success();
  }
  static std::tuple<int64_t, int64_t, int64_t> sizes(GateOp op) {
    RoutingType routing = op.getRouting().getType();
    return {routing.getTokens(), routing.getExperts(), routing.getTopK()};
  }
  static std::tuple<int64_t, int64_t, int64_t> sizes(LayerOp op) {
    return {op.getNumTokens(), op.getNumExperts(), op.getTopK()};
  }
};
} // namespace

void GateOp::getCanonicalizationPatterns(RewritePatternSet &results,
                                         MLIRContext *context) {
  results.add<DropNormalizeForTopOne<GateOp>,
              BoundedCapacityCoveringAllTokensIsDropless<GateOp>>(context);
}

void LayerOp::getCanonicalizationPatterns(RewritePatternSet &results,
                                          MLIRContext *context) {
  results.add<DropNormalizeForTopOne<LayerOp>,
              BoundedCapacityCoveringAllTokensIsDropless<LayerOp>>(context);
}
