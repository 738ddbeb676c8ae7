//===- LayerTransforms.cpp - Find and rewrite one expanded layer ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the structure of an expanded layer and the rewrites
// that parallelize it over ranks (one parameter layout for every variant,
// DESIGN.md section 4) and pipeline its expert exchange (section 5).
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"

#include "mlir/IR/Builders.h"
#include "llvm/ADT/TypeSwitch.h"

using namespace mlir;
using namespace flex::moe;

//===----------------------------------------------------------------------===//
// Matching
//===----------------------------------------------------------------------===//

Value ExpandedLayer::weightArgument(Value operand) {
  if (!operand)
    return operand;
  if (auto gather = operand.getDefiningOp<AllGatherOp>())
    return gather.getInput();
  return operand;
}

FailureOr<ExpandedLayer> flex::moe::matchExpandedLayer(func::FuncOp func) {
  ExpandedLayer ops;
  auto once = [&](auto &slot, auto op) -> LogicalResult {
    if (slot)
      return op.emitOpError("[plan-3] a layer function holds one layer; "
                            "this one has a second ")
             << op->getName();
    slot = op;
    return success();
  };
  if (!func.getBody().hasOneBlock())
    return func.emitOpError("[plan-3] a layer function has one block");
  for (Operation &op : func.getBody().front()) {
    LogicalResult matched =
        llvm::TypeSwitch<Operation *, LogicalResult>(&op)
            .Case([&](GateOp gate) { return once(ops.gate, gate); })
            .Case([&](ShardRoutingOp shard) {
              return once(ops.shardRouting, shard);
            })
            .Case([&](DispatchOp d) { return once(ops.dispatch, d); })
            .Case([&](ExpertOp e) {
              ops.experts.push_back(e);
              return success();
            })
            .Case([&](AllToAllOp exchange) {
              return exchange.getDirection() == AllToAllDirection::Dispatch
                         ? once(ops.dispatchExchange, exchange)
                         : once(ops.combineExchange, exchange);
            })
            .Case([&](AllGatherOp gather) {
              ops.gathers.push_back(gather);
              return success();
            })
            .Case([&](CombineOp c) { return once(ops.combine, c); })
            .Case([&](func::ReturnOp r) { return once(ops.ret, r); })
            .Case([&](LayerOp layer) {
              return layer.emitOpError(
                  "[plan-3] expand moe.layer first (--moe-expand-layer)");
            })
            .Default([&](Operation *other) {
              return other->emitOpError(
                  "[plan-3] is not part of a layer: a layer function holds "
                  "moe.gate, moe.shard_routing, moe.dispatch, "
                  "moe.all_to_all, moe.all_gather, moe.expert and "
                  "moe.combine only");
            });
    if (failed(matched))
      return failure();
  }
  if (!ops.gate || !ops.dispatch || ops.experts.empty() || !ops.combine)
    return func.emitOpError("[plan-3] a layer function needs one moe.gate, "
                            "moe.dispatch, moe.expert and moe.combine");
  if (static_cast<bool>(ops.dispatchExchange) !=
      static_cast<bool>(ops.combineExchange))
    return func.emitOpError("[plan-3] an expert-parallel layer exchanges "
                            "rows both ways: one dispatch and one combine "
                            "moe.all_to_all");

  // Dispatch and combine use the gate's routing, or its expansion to the
  // shards of each expert.
  Value routing = ops.gate.getRouting();
  if (ops.shardRouting) {
    if (ops.shardRouting.getRouting() != routing)
      return ops.shardRouting.emitOpError(
          "[plan-3] must expand the gate's routing");
    routing = ops.shardRouting.getResult();
  }
  if (ops.dispatch.getInput() != ops.gate.getInput() ||
      ops.dispatch.getRouting() != routing)
    return ops.dispatch.emitOpError(
        "[plan-3] must dispatch the gate's input with the gate's routing "
        "(or its moe.shard_routing)");
  if (ops.combine.getRouting() != routing)
    return ops.combine.emitOpError(
        "[plan-3] must combine with the gate's routing (or its "
        "moe.shard_routing)");

  // The experts read the dispatch buffer (or its chunks) and feed combine
  // (or the combine exchange), chunk by chunk.
  if (ops.isExpertParallel()) {
    if (ops.dispatchExchange.getInputs().front() != ops.dispatch.getResult() ||
        ops.combine.getInput() != ops.combineExchange.getResults().front())
      return ops.dispatchExchange.emitOpError(
          "[plan-3] must exchange the dispatch buffer and feed combine");
    if (ops.dispatchExchange.getResults().size() != ops.experts.size() ||
        ops.combineExchange.getInputs().size() != ops.experts.size())
      return ops.dispatchExchange.emitOpError(
          "[plan-3] one expert op per exchanged chunk");
    for (auto [index, expert] : llvm::enumerate(ops.experts)) {
      if (expert.getInput() != ops.dispatchExchange.getResult(index) ||
          ops.combineExchange.getInputs()[index] != expert.getResult())
        return expert.emitOpError("[plan-3] must run on chunk ")
               << index << " of the exchange";
    }
  } else {
    if (ops.experts.size() != 1)
      return ops.experts[1].emitOpError(
          "[plan-3] a layer without exchange has one moe.expert");
    if (ops.experts[0].getInput() != ops.dispatch.getResult() ||
        ops.combine.getInput() != ops.experts[0].getResult())
      return ops.experts[0].emitOpError(
          "[plan-3] must read the dispatch buffer and feed combine");
  }
  for (AllGatherOp gather : ops.gathers) {
    if (!isa<BlockArgument>(gather.getInput()))
      return gather.emitOpError("[plan-3] gathers a weight argument");
  }

  // Tokens and weights are the caller's buffers, bound by name.
  ExpertOp expert = ops.experts.front();
  for (Value value :
       {Value(ops.gate.getInput()), Value(ops.gate.getRouterWeight()),
        ops.weightArgument(expert.getFc1Weight()),
        ops.weightArgument(expert.getFc2Weight()),
        ops.weightArgument(expert.getUpWeight()),
        ops.weightArgument(expert.getFc1Bias()),
        ops.weightArgument(expert.getFc2Bias())}) {
    if (value && !isa<BlockArgument>(value))
      return value.getDefiningOp()->emitOpError(
          "[plan-3] tokens and weights of a layer must be function arguments");
  }
  for (ExpertOp other : ops.experts) {
    if (other.getFc1Weight() != expert.getFc1Weight() ||
        other.getFc2Weight() != expert.getFc2Weight() ||
        other.getUpWeight() != expert.getUpWeight() ||
        other.getFc1Bias() != expert.getFc1Bias() ||
        other.getFc2Bias() != expert.getFc2Bias() ||
        other.getKindAttr() != expert.getKindAttr() ||
        other.getActivationAttr() != expert.getActivationAttr() ||
        other.getHiddenShards() != expert.getHiddenShards())
      return other.emitOpError("[plan-3] every chunk runs the same experts");
  }
  // b2 / s in every shard's fc2 adds b2 once to the sum of s shards.
  int64_t shards = ops.shardRouting ? ops.shardRouting.getShards() : 1;
  if (expert.getHiddenShards() != shards)
    return expert.emitOpError("[plan-3] hidden_shards ")
           << expert.getHiddenShards()
           << " must equal the shards of the routing (" << shards << ")";
  if (ops.ret) {
    for (Value result : ops.ret.getOperands()) {
      if (result != ops.combine.getResult() && result != ops.gate.getAuxLoss())
        return ops.ret.emitOpError("[plan-3] a layer function returns the "
                                   "combined output and the aux loss only");
    }
  }
  return ops;
}

//===----------------------------------------------------------------------===//
// Expansion
//===----------------------------------------------------------------------===//

void flex::moe::expandLayer(LayerOp layer, RewriterBase &rewriter) {
  OpBuilder::InsertionGuard guard(rewriter);
  rewriter.setInsertionPoint(layer);
  Location loc = layer.getLoc();
  auto input = cast<RankedTensorType>(layer.getInput().getType());
  int64_t tokens = layer.getNumTokens();
  int64_t experts = layer.getNumExperts();
  int64_t topK = layer.getTopK();
  std::optional<int64_t> capacity =
      layer.getCapacity().getStaticCapacity(tokens, experts, topK);
  auto routingType =
      RoutingType::get(rewriter.getContext(), tokens, experts, topK,
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
      rewriter, loc, bufferType, dispatch.getResult(), layer.getFc1Weight(),
      layer.getFc2Weight(), layer.getUpWeight(), layer.getFc1Bias(),
      layer.getFc2Bias(), layer.getKindAttr(), layer.getActivationAttr());
  auto combine = CombineOp::create(rewriter, loc, input, expert.getResult(),
                                   gate.getRouting());
  rewriter.replaceOp(layer, ValueRange{combine.getResult(), gate.getAuxLoss()});
}

//===----------------------------------------------------------------------===//
// Parallelization
//===----------------------------------------------------------------------===//

namespace {
RankedTensorType withDim(Type type, int64_t dim, int64_t size) {
  auto tensor = cast<RankedTensorType>(type);
  SmallVector<int64_t> shape(tensor.getShape());
  shape[dim] = size;
  return RankedTensorType::get(shape, tensor.getElementType());
}

/// Every expert weight argument of `expert`: W1, W2 and, when present, W3,
/// b1, b2 (all [E, ...]).
SmallVector<Value> expertWeights(ExpertOp expert) {
  SmallVector<Value> weights;
  for (Value value :
       {expert.getFc1Weight(), expert.getFc2Weight(), expert.getUpWeight(),
        expert.getFc1Bias(), expert.getFc2Bias()})
    if (value)
      weights.push_back(value);
  return weights;
}
} // namespace

LogicalResult flex::moe::parallelizeLayer(func::FuncOp func, int64_t ranks,
                                          int64_t parallelism) {
  FailureOr<ExpandedLayer> layer = matchExpandedLayer(func);
  if (failed(layer))
    return failure();
  if (layer->ranks() != 1 || layer->isExpertParallel() ||
      !layer->gathers.empty() || layer->shardRouting)
    return func.emitOpError("[par-1] the layer is parallelized already");
  if (ranks < 1)
    return func.emitOpError("[par-1] ranks must be >= 1, got ") << ranks;
  if (parallelism < 0 && parallelism != kExchangeOverAllShards)
    return func.emitOpError("[par-2] r must be >= 0, got ") << parallelism;
  if (ranks == 1)
    return success();
  RoutingType routing = layer->gate.getRouting().getType();
  int64_t experts = routing.getExperts();
  if (experts % ranks != 0 && ranks % experts != 0)
    return func.emitOpError("[par-1] ")
           << experts << " experts cannot be split evenly over " << ranks
           << " ranks (E % W must be 0, or W % E for experts sharded over "
              "W / E ranks)";
  // s ranks share each expert, each holding h / s of its hidden units.
  int64_t shards = experts < ranks ? ranks / experts : 1;
  ExpertOp expert = layer->experts.front();
  int64_t hidden = expert.getHiddenDim();
  if (hidden % shards != 0)
    return func.emitOpError("[par-1] ")
           << experts << " experts on " << ranks << " ranks shard each expert "
           << "over s = " << shards << " ranks, but the hidden size " << hidden
           << " is not a multiple of s";
  // r: 0 gathers the weights; r > 0 exchanges tokens over r shards of each
  // expert (DESIGN.md section 4: r in the divisors of s).
  if (parallelism == kExchangeOverAllShards)
    parallelism = shards;
  if (parallelism > 0 && shards % parallelism != 0)
    return func.emitOpError("[par-1] r = ")
           << parallelism << " does not divide s = " << shards
           << " (the ranks that share each expert, W / E for E < W, else 1); "
              "allowed: 0 or a divisor of s";
  int64_t virtualExperts = experts * shards;
  int64_t localExperts = virtualExperts / ranks;

  // One layout for every variant: each rank holds its slice of experts, or
  // its shard (hidden units q*h/s .. (q+1)*h/s) of one expert, with b2
  // whole.
  OpBuilder builder(func.getContext());
  auto localType = [&](Value weight) {
    RankedTensorType type =
        withDim(weight.getType(), 0, shards > 1 ? 1 : localExperts);
    if (weight == expert.getFc1Weight() || weight == expert.getUpWeight())
      return withDim(type, 2, hidden / shards);
    if (weight == expert.getFc2Weight() || weight == expert.getFc1Bias())
      return withDim(type, 1, hidden / shards);
    return type;
  };
  for (Value weight : expertWeights(expert)) {
    auto argument = cast<BlockArgument>(weight);
    argument.setType(localType(weight));
  }
  func.setType(builder.getFunctionType(
      func.getBody().front().getArgumentTypes(), func.getResultTypes()));
  layer->gate.setRanks(ranks);

  Location loc = expert.getLoc();
  auto buffer = cast<RankedTensorType>(expert.getInput().getType());
  if (shards > 1) {
    // The E * s virtual experts, one per rank: dispatch writes each token
    // to the s shards of each chosen expert, combine sums them.
    builder.setInsertionPointAfter(layer->gate);
    RoutingType virtualRouting =
        RoutingType::get(func.getContext(), routing.getTokens(), virtualExperts,
                         routing.getTopK() * shards, routing.getCapacity());
    auto shardRouting = ShardRoutingOp::create(
        builder, layer->gate.getLoc(), virtualRouting, layer->gate.getRouting(),
        builder.getI64IntegerAttr(shards));
    layer->dispatch.getRoutingMutable().assign(shardRouting.getResult());
    layer->combine.getRoutingMutable().assign(shardRouting.getResult());
    buffer = withDim(buffer, 0, virtualExperts);
    layer->dispatch.getResult().setType(buffer);
    expert.getResult().setType(buffer);
    expert.setHiddenShards(shards);
  }

  // Every rank gathers the shards of `gatherRanks` consecutive ranks as
  // local virtual experts: all W for r = 0, the g = s / r ranks of its
  // shard group for 1 <= r < s, none for r = s.
  int64_t gatherRanks = parallelism == 0 ? ranks : shards / parallelism;
  if (gatherRanks > 1) {
    builder.setInsertionPoint(expert);
    for (OpOperand &operand : expert->getOpOperands()) {
      if (operand.getOperandNumber() == 0)
        continue;
      auto type = cast<RankedTensorType>(operand.get().getType());
      auto full = withDim(type, 0, type.getDimSize(0) * gatherRanks);
      auto gather = AllGatherOp::create(builder, loc, full, operand.get(),
                                        builder.getI64IntegerAttr(gatherRanks));
      operand.set(gather.getResult());
    }
  }
  if (parallelism == 0)
    return success();

  // r = 1 (r = s sharded): this rank's experts get the rows of every rank.
  // 1 <= r < s: rank p exchanges with the W / g ranks of its token class
  // p % g (ranks g apart), which hold every virtual expert once: g of them
  // each, its shard group's.
  int64_t exchangeRanks = ranks / gatherRanks;
  localExperts = virtualExperts / exchangeRanks;
  int64_t capacity = buffer.getDimSize(1);
  int64_t rows = ShapedType::isDynamic(capacity) ? ShapedType::kDynamic
                                                 : exchangeRanks * capacity;
  auto local = RankedTensorType::get({localExperts, rows, buffer.getDimSize(2)},
                                     buffer.getElementType());
  builder.setInsertionPoint(expert);
  IntegerAttr ranksAttr = builder.getI64IntegerAttr(exchangeRanks);
  auto exchange =
      AllToAllOp::create(builder, loc, TypeRange{local},
                         AllToAllDirectionAttr::get(
                             func.getContext(), AllToAllDirection::Dispatch),
                         ValueRange{expert.getInput()}, ranksAttr);
  exchange.setGroupStride(gatherRanks);
  expert.getInputMutable().assign(exchange.getResult(0));
  expert.getResult().setType(local);
  builder.setInsertionPointAfter(expert);
  auto back = AllToAllOp::create(
      builder, loc, TypeRange{buffer},
      AllToAllDirectionAttr::get(func.getContext(), AllToAllDirection::Combine),
      ValueRange{expert.getResult()}, ranksAttr);
  back.setGroupStride(gatherRanks);
  layer->combine.getInputMutable().assign(back.getResult(0));
  return success();
}

//===----------------------------------------------------------------------===//
// Pipelining
//===----------------------------------------------------------------------===//

LogicalResult flex::moe::pipelineLayer(func::FuncOp func, int64_t chunks) {
  FailureOr<ExpandedLayer> layer = matchExpandedLayer(func);
  if (failed(layer))
    return failure();
  if (chunks < 1)
    return func.emitOpError("[pipe-1] chunks must be >= 1, got ") << chunks;
  if (chunks == 1)
    return success();
  if (!layer->isExpertParallel())
    return func.emitOpError("[pipe-1] pipelining overlaps the all-to-all "
                            "with experts: it needs an expert-parallel "
                            "layer (--moe-parallelize=\"r=1\")");
  if (layer->experts.size() != 1)
    return func.emitOpError("[pipe-1] the layer is pipelined already");
  RoutingType routing = layer->gate.getRouting().getType();
  CapacityAttr capacity = layer->gate.getCapacity();
  if (routing.hasStaticCapacity()) {
    if (routing.getCapacity() % chunks != 0)
      return layer->gate.emitOpError("[pipe-1] ")
             << chunks << " chunks must divide the capacity "
             << routing.getCapacity()
             << ": align it (#moe.capacity<..., align = " << chunks << ">)";
  } else if (capacity.getAlignment() % chunks != 0) {
    return layer->gate.emitOpError("[pipe-1] ")
           << chunks << " chunks must divide the capacity: align it to a "
           << "multiple of " << chunks
           << " (#moe.capacity<..., align = " << chunks
           << ">), got align = " << capacity.getAlignment();
  }

  AllToAllOp dispatch = layer->dispatchExchange;
  AllToAllOp combine = layer->combineExchange;
  ExpertOp expert = layer->experts.front();
  auto whole = cast<RankedTensorType>(expert.getInput().getType());
  int64_t rows = whole.getDimSize(1);
  auto chunkType =
      withDim(whole, 1, ShapedType::isDynamic(rows) ? rows : rows / chunks);

  OpBuilder builder(dispatch);
  SmallVector<Type> chunkTypes(chunks, chunkType);
  auto split = AllToAllOp::create(
      builder, dispatch.getLoc(), chunkTypes, dispatch.getDirectionAttr(),
      dispatch.getInputs(), dispatch.getRanksAttr());
  split.setGroupStride(dispatch.getGroupStride());
  SmallVector<Value> outputs;
  builder.setInsertionPoint(expert);
  for (int64_t q = 0; q < chunks; ++q) {
    auto chunk = cast<ExpertOp>(builder.clone(*expert));
    chunk.getInputMutable().assign(split.getResult(q));
    chunk.getResult().setType(chunkType);
    outputs.push_back(chunk.getResult());
  }
  builder.setInsertionPoint(combine);
  auto merged = AllToAllOp::create(
      builder, combine.getLoc(), combine.getResultTypes(),
      combine.getDirectionAttr(), outputs, combine.getRanksAttr());
  merged.setGroupStride(combine.getGroupStride());
  combine.getResult(0).replaceAllUsesWith(merged.getResult(0));
  combine.erase();
  expert.erase();
  dispatch.erase();
  return success();
}
