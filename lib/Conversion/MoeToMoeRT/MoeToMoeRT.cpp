//===- MoeToMoeRT.cpp - Lower a moe layer to a moert plan -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --convert-moe-to-moert. A layer is lowered as a whole
// rather than op by op with the dialect conversion framework: its four ops
// share routing buffers, and the backward steps of one op need buffers of
// another, so the plan is built from the layer's structure at once.
//
//===----------------------------------------------------------------------===//

#include "flex/Conversion/MoeToMoeRT/MoeToMoeRT.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinOps.h"
#include "llvm/ADT/TypeSwitch.h"

namespace flex {
#define GEN_PASS_DEF_CONVERTMOETOMOERTPASS
#include "flex/Conversion/Passes.h.inc"
} // namespace flex

using namespace mlir;
using namespace flex;
using namespace flex::moert;

namespace {
/// The four ops of one expanded layer and the function's return.
struct LayerOps {
  moe::GateOp gate;
  moe::DispatchOp dispatch;
  moe::ExpertOp expert;
  moe::CombineOp combine;
  func::ReturnOp ret;
};

/// Finds the layer in `func` and checks that it is one chain over the
/// function's arguments.
FailureOr<LayerOps> matchLayer(func::FuncOp func) {
  LayerOps ops;
  auto once = [&](auto &slot, auto op) -> LogicalResult {
    if (slot)
      return op.emitOpError("[plan-3] a plan holds one layer; this function "
                            "has a second ")
             << op->getName();
    slot = op;
    return success();
  };
  if (!func.getBody().hasOneBlock())
    return func.emitOpError("[plan-3] a layer function has one block");
  for (Operation &op : func.getBody().front()) {
    LogicalResult matched =
        llvm::TypeSwitch<Operation *, LogicalResult>(&op)
            .Case([&](moe::GateOp gate) { return once(ops.gate, gate); })
            .Case([&](moe::DispatchOp d) { return once(ops.dispatch, d); })
            .Case([&](moe::ExpertOp e) { return once(ops.expert, e); })
            .Case([&](moe::CombineOp c) { return once(ops.combine, c); })
            .Case([&](func::ReturnOp r) { return once(ops.ret, r); })
            .Case([&](moe::LayerOp layer) {
              return layer.emitOpError(
                  "[plan-3] expand moe.layer first (--moe-expand-layer)");
            })
            .Default([&](Operation *other) {
              return other->emitOpError(
                  "[plan-3] cannot be lowered into a plan: a layer function "
                  "holds only moe.gate, moe.dispatch, moe.expert and "
                  "moe.combine");
            });
    if (failed(matched))
      return failure();
  }
  if (!ops.gate || !ops.dispatch || !ops.expert || !ops.combine)
    return func.emitOpError("[plan-3] a layer function needs one moe.gate, "
                            "moe.dispatch, moe.expert and moe.combine");

  Value routing = ops.gate.getRouting();
  if (ops.dispatch.getInput() != ops.gate.getInput() ||
      ops.dispatch.getRouting() != routing)
    return ops.dispatch.emitOpError(
        "[plan-3] must dispatch the gate's input with the gate's routing");
  if (ops.expert.getInput() != ops.dispatch.getResult())
    return ops.expert.emitOpError("[plan-3] must read the dispatch buffer");
  if (ops.combine.getInput() != ops.expert.getResult() ||
      ops.combine.getRouting() != routing)
    return ops.combine.emitOpError(
        "[plan-3] must combine the experts' output with the gate's routing");

  // Tokens and weights are the caller's buffers, bound by name.
  for (Value value : {ops.gate.getInput(), ops.gate.getRouterWeight(),
                      ops.expert.getFc1Weight(), ops.expert.getFc2Weight(),
                      ops.expert.getUpWeight(), ops.expert.getFc1Bias(),
                      ops.expert.getFc2Bias()}) {
    if (value && !isa<BlockArgument>(value))
      return value.getDefiningOp()->emitOpError(
          "[plan-3] tokens and weights of a plan must be function arguments");
  }
  for (Value result : ops.ret.getOperands()) {
    if (result != ops.combine.getResult() && result != ops.gate.getAuxLoss())
      return ops.ret.emitOpError("[plan-3] a layer function returns the "
                                 "combined output and the aux loss only");
  }
  return ops;
}

MemRefType memref(ArrayRef<int64_t> shape, Type element) {
  return MemRefType::get(shape, element);
}

/// Builds a plan for `ops` at the builder's insertion point.
class PlanBuilder {
public:
  PlanBuilder(OpBuilder &builder, LayerOps ops,
              const MoeToMoeRTOptions &options)
      : b(builder), ops(ops), options(options),
        loc(ops.gate.getLoc()) {}

  PlanOp build(StringRef name);

private:
  Value argument(StringRef name, ArgumentRole role, MemRefType type) {
    return ArgumentOp::create(b, loc, type, name, role).getBuffer();
  }
  Value alloc(StringRef name, MemRefType type) {
    return AllocOp::create(b, loc, type, name, IntegerAttr()).getBuffer();
  }
  DictionaryAttr layerAttr();
  void buildForward();
  void buildBackward();

  OpBuilder &b;
  LayerOps ops;
  const MoeToMoeRTOptions &options;
  Location loc;

  // Sizes and types.
  int64_t tokens, modelDim, hiddenDim, experts, topK, rows;
  Type element, routerElement, f32, i32;
  Layout layout;
  bool gated, bias;

  // Arguments.
  Value x, wg, w1, b1, w2, b2, w3, out, lAux;
  Value gradOut, gradLAux, gradX, gradWg, gradW1, gradB1, gradW2, gradB2,
      gradW3;
  // Workspace.
  Value logits, scores, indices, locations, gates, capacity, offsets,
      expertRows, dispatched, hidden, hiddenPre, gateProj, upProj, expertOut;
};

DictionaryAttr PlanBuilder::layerAttr() {
  moe::CapacityAttr cap = ops.gate.getCapacity();
  std::optional<moe::Activation> act;
  if (auto attr = ops.expert.getActivationAttr())
    act = attr.getValue();
  auto dtypeName = [](Type type) -> StringRef {
    if (type.isF32())
      return "f32";
    if (type.isBF16())
      return "bf16";
    return "f16";
  };
  SmallVector<NamedAttribute> fields = {
      b.getNamedAttr("tokens", b.getI64IntegerAttr(tokens)),
      b.getNamedAttr("model_dim", b.getI64IntegerAttr(modelDim)),
      b.getNamedAttr("hidden_dim", b.getI64IntegerAttr(hiddenDim)),
      b.getNamedAttr("experts", b.getI64IntegerAttr(experts)),
      b.getNamedAttr("top_k", b.getI64IntegerAttr(topK)),
      b.getNamedAttr("capacity_mode",
                     b.getStringAttr(moe::stringifyCapacityMode(cap.getMode()))),
      b.getNamedAttr("capacity_factor",
                     b.getF64FloatAttr(cap.getMode() == moe::CapacityMode::Dropless
                                           ? 1.0
                                           : cap.getFactorValue())),
      b.getNamedAttr("expert_kind", b.getStringAttr(gated ? "gated" : "ffn")),
      b.getNamedAttr("activation",
                     b.getStringAttr(moe::stringifyActivation(
                         act.value_or(moe::Activation::Silu)))),
      b.getNamedAttr("bias", b.getBoolAttr(bias)),
      b.getNamedAttr("dtype", b.getStringAttr(dtypeName(element))),
      b.getNamedAttr("router_fp32", b.getBoolAttr(routerElement.isF32())),
      b.getNamedAttr("batch_prioritized",
                     b.getBoolAttr(ops.gate.getBatchPrioritized())),
      b.getNamedAttr("normalize_gate", b.getBoolAttr(ops.gate.getNormalize())),
      b.getNamedAttr("gate_noise", ops.gate.getNoiseAttr()),
      b.getNamedAttr("seed", ops.gate.getSeedAttr()),
  };
  return b.getDictionaryAttr(fields);
}

PlanOp PlanBuilder::build(StringRef name) {
  auto input = cast<RankedTensorType>(ops.gate.getInput().getType());
  auto router = cast<RankedTensorType>(ops.gate.getRouterWeight().getType());
  auto routingType = ops.gate.getRouting().getType();
  tokens = input.getDimSize(0);
  modelDim = input.getDimSize(1);
  experts = routingType.getExperts();
  topK = routingType.getTopK();
  hiddenDim = ops.expert.getHiddenDim();
  element = input.getElementType();
  routerElement = router.getElementType();
  f32 = b.getF32Type();
  i32 = b.getI32Type();
  gated = ops.expert.getKind() == moe::ExpertKind::Gated;
  bias = static_cast<bool>(ops.expert.getFc1Bias());

  // Rows of the dispatch buffer: E * C_bound padded, T * k ragged (the
  // kept rows never exceed either). [cap-1]: no expert gets more than T.
  moe::CapacityAttr cap = ops.gate.getCapacity();
  int64_t bound = tokens;
  if (auto capBound = cap.getCapacityBound(tokens, experts, topK))
    bound = cap.getMode() == moe::CapacityMode::Fixed
                ? *capBound
                : std::min(*capBound, tokens);
  int64_t align = cap.getAlignment();
  int64_t alignedBound = (bound + align - 1) / align * align;
  layout = options.layout.value_or(cap.getMode() == moe::CapacityMode::Fixed
                                       ? Layout::Padded
                                       : Layout::Ragged);
  rows = experts * alignedBound;
  if (layout == Layout::Ragged)
    rows = std::min(rows, tokens * topK);

  auto plan = PlanOp::create(b, loc, b.getStringAttr(name), layerAttr(),
                             options.training ? b.getUnitAttr() : UnitAttr(),
                             IntegerAttr(), b.getI64IntegerAttr(256));
  Block *body = new Block();
  plan.getBody().push_back(body);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(body);

  auto weight = [&](Value tensor) {
    return memref(cast<RankedTensorType>(tensor.getType()).getShape(),
                  element);
  };
  MemRefType tokensType = memref({tokens, modelDim}, element);
  x = argument("x", ArgumentRole::Input, tokensType);
  wg = argument("wg", ArgumentRole::Input,
                memref({modelDim, experts}, routerElement));
  w1 = argument("w1", ArgumentRole::Input, weight(ops.expert.getFc1Weight()));
  if (bias)
    b1 = argument("b1", ArgumentRole::Input, weight(ops.expert.getFc1Bias()));
  w2 = argument("w2", ArgumentRole::Input, weight(ops.expert.getFc2Weight()));
  if (bias)
    b2 = argument("b2", ArgumentRole::Input, weight(ops.expert.getFc2Bias()));
  if (gated)
    w3 = argument("w3", ArgumentRole::Input, weight(ops.expert.getUpWeight()));
  out = argument("out", ArgumentRole::Output, tokensType);
  lAux = argument("l_aux", ArgumentRole::Output, memref({1}, f32));
  if (options.training) {
    gradOut = argument("grad_out", ArgumentRole::GradInput, tokensType);
    gradLAux = argument("grad_l_aux", ArgumentRole::GradInput, memref({1}, f32));
    gradX = argument("grad_x", ArgumentRole::GradOutput, tokensType);
    gradWg = argument("grad_wg", ArgumentRole::GradOutput,
                      memref({modelDim, experts}, routerElement));
    gradW1 = argument("grad_w1", ArgumentRole::GradOutput,
                      weight(ops.expert.getFc1Weight()));
    if (bias)
      gradB1 = argument("grad_b1", ArgumentRole::GradOutput,
                        weight(ops.expert.getFc1Bias()));
    gradW2 = argument("grad_w2", ArgumentRole::GradOutput,
                      weight(ops.expert.getFc2Weight()));
    if (bias)
      gradB2 = argument("grad_b2", ArgumentRole::GradOutput,
                        weight(ops.expert.getFc2Bias()));
    if (gated)
      gradW3 = argument("grad_w3", ArgumentRole::GradOutput,
                        weight(ops.expert.getUpWeight()));
  }

  logits = alloc("logits", memref({tokens, experts}, f32));
  scores = alloc("scores", memref({tokens, experts}, f32));
  indices = alloc("indices", memref({tokens, topK}, i32));
  locations = alloc("locations", memref({tokens, topK}, i32));
  gates = alloc("gates", memref({tokens, topK}, f32));
  capacity = alloc("capacity", memref({1}, i32));
  offsets = alloc("expert_offsets", memref({experts + 1}, i32));
  expertRows = alloc("expert_rows", memref({experts}, i32));
  dispatched = alloc("dispatched", memref({rows, modelDim}, element));
  MemRefType hiddenType = memref({rows, hiddenDim}, element);
  if (gated) {
    gateProj = alloc("gate_proj", hiddenType);
    upProj = alloc("up_proj", hiddenType);
  } else if (options.training) {
    hiddenPre = alloc("hidden_pre", hiddenType);
  }
  hidden = alloc("hidden", hiddenType);
  expertOut = alloc("expert_out", memref({rows, modelDim}, element));

  auto variant = VariantOp::create(b, loc, b.getStringAttr("single"));
  variant.getForward().push_back(new Block());
  variant.getBackward().push_back(new Block());
  b.setInsertionPointToStart(&variant.getForward().front());
  buildForward();
  if (options.training) {
    b.setInsertionPointToStart(&variant.getBackward().front());
    buildBackward();
  }
  return plan;
}

void PlanBuilder::buildForward() {
  createStep<RouterOp>(b, loc, {{"x", x}, {"wg", wg}, {"logits", logits}});
  moe::GateOp gate = ops.gate;
  createStep<GateOp>(
      b, loc,
      {{"logits", logits}, {"scores", scores}, {"indices", indices},
       {"locations", locations}, {"gates", gates}, {"capacity", capacity},
       {"expert_offsets", offsets}, {"expert_rows", expertRows},
       {"l_aux", lAux}},
      {b.getNamedAttr("top_k", b.getI64IntegerAttr(topK)),
       b.getNamedAttr("capacity", gate.getCapacityAttr()),
       b.getNamedAttr("noise", gate.getNoiseAttr()),
       b.getNamedAttr("seed", gate.getSeedAttr()),
       b.getNamedAttr("layout", LayoutAttr::get(b.getContext(), layout))});
  if (gate.getNormalize())
    cast<GateOp>(b.getInsertionBlock()->back()).setNormalize(true);
  if (gate.getBatchPrioritized())
    cast<GateOp>(b.getInsertionBlock()->back()).setBatchPrioritized(true);

  createStep<DispatchOp>(b, loc,
                         {{"x", x}, {"indices", indices},
                          {"locations", locations}, {"capacity", capacity},
                          {"expert_offsets", offsets},
                          {"dispatched", dispatched}});
  auto segments = [&](std::initializer_list<std::pair<StringRef, Value>> roles) {
    SmallVector<std::pair<StringRef, Value>> all(roles);
    all.push_back({"expert_offsets", offsets});
    all.push_back({"expert_rows", expertRows});
    return all;
  };
  if (gated) {
    createStep<GroupedGemmOp>(
        b, loc, segments({{"a", dispatched}, {"b", w1}, {"c", gateProj}}));
    createStep<GroupedGemmOp>(
        b, loc, segments({{"a", dispatched}, {"b", w3}, {"c", upProj}}));
    createStep<GluOp>(b, loc,
                      segments({{"gate_in", gateProj},
                                {"up_in", upProj},
                                {"c", hidden}}));
  } else {
    // With training, the GEMM also keeps the value before the activation
    // for activation_backward.
    createStep<GroupedGemmOp>(
        b, loc,
        segments({{"a", dispatched}, {"b", w1}, {"bias", b1}, {"c", hidden},
                  {"pre", hiddenPre}}),
        {b.getNamedAttr("epilogue", ops.expert.getActivationAttr())});
  }
  createStep<GroupedGemmOp>(
      b, loc,
      segments({{"a", hidden}, {"b", w2}, {"bias", b2}, {"c", expertOut}}));
  createStep<CombineOp>(b, loc,
                        {{"expert_out", expertOut}, {"indices", indices},
                         {"locations", locations}, {"gates", gates},
                         {"capacity", capacity}, {"expert_offsets", offsets},
                         {"out", out}});
}

void PlanBuilder::buildBackward() {
  MemRefType hiddenType = memref({rows, hiddenDim}, element);
  MemRefType rowsType = memref({rows, modelDim}, element);
  // Backward-only buffers: the memory plan may reuse forward-only bytes.
  OpBuilder::InsertionGuard guard(b);
  Block *backward = b.getInsertionBlock();
  b.setInsertionPoint(backward->getParentOp());
  Value gradExpertOut = alloc("grad_expert_out", rowsType);
  Value gradGates = alloc("grad_gates", memref({tokens, topK}, f32));
  Value gradHidden = alloc("grad_hidden", hiddenType);
  Value gradHiddenPre, gradGateProj, gradUpProj;
  if (gated) {
    gradGateProj = alloc("grad_gate_proj", hiddenType);
    gradUpProj = alloc("grad_up_proj", hiddenType);
  } else {
    gradHiddenPre = alloc("grad_hidden_pre", hiddenType);
  }
  Value gradDispatched = alloc("grad_dispatched", rowsType);
  Value gradLogits = alloc("grad_logits", memref({tokens, experts}, f32));
  b.setInsertionPointToEnd(backward);

  auto segments = [&](std::initializer_list<std::pair<StringRef, Value>> roles) {
    SmallVector<std::pair<StringRef, Value>> all(roles);
    all.push_back({"expert_offsets", offsets});
    all.push_back({"expert_rows", expertRows});
    return all;
  };
  NamedAttribute transB = b.getNamedAttr("trans_b", b.getUnitAttr());

  createStep<CombineBackwardOp>(
      b, loc,
      {{"grad_out", gradOut}, {"expert_out", expertOut}, {"indices", indices},
       {"locations", locations}, {"gates", gates}, {"capacity", capacity},
       {"expert_offsets", offsets}, {"grad_expert_out", gradExpertOut},
       {"grad_gates", gradGates}});
  createStep<GroupedGemmWgradOp>(
      b, loc,
      segments({{"a", hidden}, {"grad_c", gradExpertOut}, {"grad_b", gradW2},
                {"grad_bias", gradB2}}));
  createStep<GroupedGemmOp>(
      b, loc, segments({{"a", gradExpertOut}, {"b", w2}, {"c", gradHidden}}),
      {transB});
  if (gated) {
    createStep<GluBackwardOp>(
        b, loc,
        segments({{"gate_in", gateProj}, {"up_in", upProj},
                  {"grad", gradHidden}, {"grad_gate_in", gradGateProj},
                  {"grad_up_in", gradUpProj}}));
    createStep<GroupedGemmWgradOp>(
        b, loc,
        segments({{"a", dispatched}, {"grad_c", gradGateProj},
                  {"grad_b", gradW1}}));
    createStep<GroupedGemmWgradOp>(
        b, loc,
        segments({{"a", dispatched}, {"grad_c", gradUpProj},
                  {"grad_b", gradW3}}));
    createStep<GroupedGemmOp>(
        b, loc,
        segments({{"a", gradGateProj}, {"b", w1}, {"c", gradDispatched}}),
        {transB});
    createStep<GroupedGemmOp>(
        b, loc, segments({{"a", gradUpProj}, {"b", w3}, {"c", gradDispatched}}),
        {transB, b.getNamedAttr("accumulate", b.getUnitAttr())});
  } else {
    createStep<ActivationBackwardOp>(
        b, loc,
        segments({{"pre", hiddenPre}, {"grad", gradHidden},
                  {"grad_pre", gradHiddenPre}}),
        {b.getNamedAttr("activation", ops.expert.getActivationAttr())});
    createStep<GroupedGemmWgradOp>(
        b, loc,
        segments({{"a", dispatched}, {"grad_c", gradHiddenPre},
                  {"grad_b", gradW1}, {"grad_bias", gradB1}}));
    createStep<GroupedGemmOp>(
        b, loc,
        segments({{"a", gradHiddenPre}, {"b", w1}, {"c", gradDispatched}}),
        {transB});
  }
  createStep<DispatchBackwardOp>(
      b, loc,
      {{"grad_dispatched", gradDispatched}, {"indices", indices},
       {"locations", locations}, {"capacity", capacity},
       {"expert_offsets", offsets}, {"grad_x", gradX}});
  auto gateBackward = createStep<GateBackwardOp>(
      b, loc,
      {{"grad_gates", gradGates}, {"grad_l_aux", gradLAux}, {"scores", scores},
       {"indices", indices}, {"grad_logits", gradLogits}},
      {b.getNamedAttr("top_k", b.getI64IntegerAttr(topK))});
  gateBackward.setNormalize(ops.gate.getNormalize());
  createStep<RouterBackwardOp>(b, loc,
                               {{"x", x}, {"wg", wg},
                                {"grad_logits", gradLogits},
                                {"grad_x", gradX}, {"grad_wg", gradWg}});
}

struct ConvertMoeToMoeRTPass final
    : flex::impl::ConvertMoeToMoeRTPassBase<ConvertMoeToMoeRTPass> {
  using Base::Base;

  void runOnOperation() override {
    MoeToMoeRTOptions lowering;
    lowering.training = training;
    if (layout == "padded")
      lowering.layout = Layout::Padded;
    else if (layout == "ragged")
      lowering.layout = Layout::Ragged;
    else if (layout != "auto") {
      getOperation().emitError("[plan-3] layout must be auto, padded or "
                               "ragged, got '")
          << layout << "'";
      return signalPassFailure();
    }
    SmallVector<func::FuncOp> layers;
    getOperation().walk([&](func::FuncOp func) {
      bool hasMoe = false;
      func.walk([&](Operation *op) {
        hasMoe |= isa<moe::MoeDialect>(op->getDialect());
      });
      if (hasMoe)
        layers.push_back(func);
    });
    for (func::FuncOp func : layers) {
      if (failed(lowerLayerToPlan(func, lowering)))
        return signalPassFailure();
      func.erase();
    }
  }
};
} // namespace

FailureOr<PlanOp> flex::lowerLayerToPlan(func::FuncOp func,
                                         const MoeToMoeRTOptions &options) {
  FailureOr<LayerOps> ops = matchLayer(func);
  if (failed(ops))
    return failure();
  OpBuilder builder(func);
  PlanBuilder planBuilder(builder, *ops, options);
  return planBuilder.build(func.getSymName());
}
