//===- MoeToMoeRT.cpp - Lower a moe layer to a moert plan -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --convert-moe-to-moert. A layer is lowered as a whole
// rather than op by op with the dialect conversion framework: its ops share
// routing buffers, and the backward steps of one op need buffers of another,
// so the plan is built from the layer's structure at once. Functions tagged
// `moe.variant_of` (by --moe-multiversion) become the variants of one plan.
//
//===----------------------------------------------------------------------===//

#include "flex/Conversion/MoeToMoeRT/MoeToMoeRT.h"

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"
#include "flex/Runtime/Core/Capacity.h"
#include "flex/Runtime/Core/KernelArgs.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinOps.h"
#include "llvm/ADT/MapVector.h"
#include "llvm/ADT/StringExtras.h"

namespace flex {
#define GEN_PASS_DEF_CONVERTMOETOMOERTPASS
#include "flex/Conversion/Passes.h.inc"
} // namespace flex

using namespace mlir;
using namespace flex;
using namespace flex::moert;
using moe::ExpandedLayer;

namespace {
MemRefType memref(ArrayRef<int64_t> shape, Type element) {
  return MemRefType::get(shape, element);
}

MemRefType memrefOf(Value tensor) {
  auto type = cast<RankedTensorType>(tensor.getType());
  return memref(type.getShape(), type.getElementType());
}

using Roles = SmallVector<std::pair<StringRef, Value>>;

/// The expert weights an expert step reads, or their gradients.
struct ExpertWeights {
  Value w1, w2, w3, b1, b2;
};

/// One variant of a plan: a layer function lowered in one layout.
struct PlanVariant {
  std::string name;
  ExpandedLayer layer;
  Layout layout;
};

/// Appends the variants of one layer function to `variants`: one in the
/// layout `options` gives, or one per layout of `options.layouts`, the one
/// `auto` would give first (a plan's first variant is its default). `tag`
/// is the function's --moe-multiversion variant, empty for none.
LogicalResult addLayoutVariants(ExpandedLayer layer, StringRef tag,
                                const MoeToMoeRTOptions &options,
                                SmallVectorImpl<PlanVariant> &variants) {
  moe::GateOp gate = layer.gate;
  int64_t ranks = gate.getRanks();
  bool fixed = gate.getCapacity().getMode() == moe::CapacityMode::Fixed;
  // Ranks exchange whole capacity blocks: multi-rank plans are padded.
  Layout automatic = ranks > 1 || fixed ? Layout::Padded : Layout::Ragged;
  if (options.layouts.empty()) {
    Layout layout =
        ranks > 1 ? Layout::Padded : options.layout.value_or(automatic);
    variants.push_back({tag.empty() ? "single" : tag.str(), layer, layout});
    return success();
  }
  auto notPadded = [](Layout layout) { return layout != Layout::Padded; };
  if (ranks > 1 && llvm::any_of(options.layouts, notPadded))
    return gate.emitOpError("[plan-3] ")
           << (llvm::is_contained(options.layouts, Layout::Ragged)
                   ? "a ragged"
                   : "an aligned")
           << " layout variant needs one rank: on " << ranks
           << " ranks tokens move in whole capacity blocks, so every "
              "variant is padded (keep layouts=padded, or lower for one "
              "rank)";
  SmallVector<Layout, 2> ordered;
  if (llvm::is_contained(options.layouts, automatic))
    ordered.push_back(automatic);
  for (Layout layout : options.layouts)
    if (!llvm::is_contained(ordered, layout))
      ordered.push_back(layout);
  for (Layout layout : ordered) {
    std::string name = stringifyLayout(layout).str();
    if (!tag.empty())
      name = (tag + "." + name).str();
    variants.push_back({name, layer, layout});
  }
  return success();
}

/// Builds one plan, with the variants of one or more layer functions, at
/// the builder's insertion point. The first function's arguments are the
/// plan's (every variant has the same, by construction of
/// --moe-multiversion).
class PlanBuilder {
public:
  PlanBuilder(OpBuilder &builder, ExpandedLayer first,
              const MoeToMoeRTOptions &options)
      : b(builder), first(first), options(options), loc(first.gate.getLoc()) {}

  FailureOr<PlanOp> build(StringRef name, ArrayRef<PlanVariant> variants);

private:
  Value argument(StringRef name, ArgumentRole role, MemRefType type) {
    return ArgumentOp::create(b, loc, type, name, role).getBuffer();
  }
  /// A workspace buffer of the variant being built (its name prefixed by
  /// the variant's when the plan has several).
  Value alloc(StringRef name, MemRefType type) {
    OpBuilder::InsertionGuard guard(b);
    b.setInsertionPoint(variantOp);
    std::string full = (prefix + name).str();
    return AllocOp::create(b, loc, type, full, IntegerAttr()).getBuffer();
  }
  LayerAttr layerAttr();
  /// Whether the experts are an FFN with a ReLU (its backward reads the
  /// activation's output, not the value before it).
  bool reluExperts();
  void declareArguments();
  void buildVariant(const PlanVariant &variant);
  void buildForward(ExpandedLayer layer);
  void buildBackward(ExpandedLayer layer);
  /// Expert steps over `segments` of `rows`: input `a` -> output `y`.
  void expertsForward(Value a, Value y, std::pair<Value, Value> segments,
                      const ExpertWeights &weights, int64_t chunk);
  /// Their backward: `gradY` -> `gradA`, weight gradients into `grads`
  /// (summed over chunks when `chunk` > 0).
  void expertsBackward(Value a, Value gradY, Value gradA,
                       std::pair<Value, Value> segments,
                       const ExpertWeights &weights, const ExpertWeights &grads,
                       int64_t chunk);
  /// A workspace buffer for the experts of `count` ranks [count * L, ...]
  /// of the rank's `local` [L, ...] (null for a null `local`): every rank
  /// (r = 0) or the rank's shard group (1 <= r < s).
  Value allocAllExperts(StringRef name, Value local, int64_t count) {
    if (!local)
      return local;
    auto type = cast<MemRefType>(local.getType());
    SmallVector<int64_t> shape(type.getShape());
    shape[0] *= count;
    return alloc(name, memref(shape, type.getElementType()));
  }
  /// The ranks a gather of `layer` runs among: W (r = 0), g = s / r
  /// consecutive ranks (1 <= r < s), 1 (none).
  int64_t gatherRanks(ExpandedLayer layer) {
    return layer.gathers.empty() ? 1 : layer.gathers.front().getRanks();
  }
  /// group_size / group_stride of a collective among `count` ranks `stride`
  /// apart; none when they are all W ranks.
  void addGroup(SmallVector<NamedAttribute> &attrs, int64_t count,
                int64_t stride) {
    if (count == ranks)
      return;
    attrs.push_back(b.getNamedAttr("group_size", b.getI64IntegerAttr(count)));
    attrs.push_back(
        b.getNamedAttr("group_stride", b.getI64IntegerAttr(stride)));
  }
  /// The weights the experts of `layer` run on: the rank's own, or the
  /// gathered ones (workspace buffers named `full_*`).
  ExpertWeights gatherWeights(ExpandedLayer layer) {
    int64_t count = gatherRanks(layer);
    if (count == 1)
      return weights;
    auto gather = [&](StringRef name, Value local) -> Value {
      Value full = allocAllExperts(name, local, count);
      if (full) {
        SmallVector<NamedAttribute> attrs;
        addGroup(attrs, count, 1);
        createStep<AllGatherOp>(b, loc, {{"input", local}, {"output", full}},
                                attrs);
      }
      return full;
    };
    return {gather("full_w1", weights.w1), gather("full_w2", weights.w2),
            gather("full_w3", weights.w3), gather("full_b1", weights.b1),
            gather("full_b2", weights.b2)};
  }
  /// Gradient buffers of the gathered weights ([count * L, ...]), or the
  /// rank's own gradients when nothing was gathered.
  ExpertWeights gatheredGrads(ExpandedLayer layer) {
    int64_t count = gatherRanks(layer);
    if (count == 1)
      return weightGrads;
    auto full = [&](StringRef name, Value local) {
      return allocAllExperts(name, local, count);
    };
    return {full("full_grad_w1", weightGrads.w1),
            full("full_grad_w2", weightGrads.w2),
            full("full_grad_w3", weightGrads.w3),
            full("full_grad_b1", weightGrads.b1),
            full("full_grad_b2", weightGrads.b2)};
  }
  /// Each rank keeps the sum over its gather's ranks of its own block.
  void scatterGrads(ExpandedLayer layer, const ExpertWeights &grads) {
    int64_t count = gatherRanks(layer);
    if (count == 1)
      return;
    for (auto [fullGrad, localGrad] : {std::pair{grads.w1, weightGrads.w1},
                                       {grads.w2, weightGrads.w2},
                                       {grads.w3, weightGrads.w3},
                                       {grads.b1, weightGrads.b1},
                                       {grads.b2, weightGrads.b2}}) {
      if (!fullGrad)
        continue;
      SmallVector<NamedAttribute> attrs;
      addGroup(attrs, count, 1);
      createStep<ReduceScatterOp>(
          b, loc, {{"input", fullGrad}, {"output", localGrad}}, attrs);
    }
  }
  /// The attributes of the exchange of chunk `chunk` of `chunks`.
  SmallVector<NamedAttribute> exchangeAttrs(ExpandedLayer layer, int64_t chunks,
                                            int64_t chunk,
                                            Direction direction) {
    SmallVector<NamedAttribute> attrs = {
        b.getNamedAttr("chunks", b.getI64IntegerAttr(chunks)),
        b.getNamedAttr("chunk", b.getI64IntegerAttr(chunk)),
        b.getNamedAttr("direction",
                       DirectionAttr::get(b.getContext(), direction))};
    if (layer.dispatchExchange.getRanksPerNode() > 0)
      attrs.push_back(b.getNamedAttr(
          "ranks_per_node", layer.dispatchExchange.getRanksPerNodeAttr()));
    addGroup(attrs, layer.dispatchExchange.getRanks(),
             layer.dispatchExchange.getGroupStride());
    return attrs;
  }
  Roles withSegments(Roles roles, std::pair<Value, Value> segments) {
    roles.push_back({"expert_offsets", segments.first});
    roles.push_back({"expert_rows", segments.second});
    return roles;
  }

  OpBuilder &b;
  ExpandedLayer first;
  const MoeToMoeRTOptions &options;
  Location loc;
  VariantOp variantOp;
  std::string prefix;

  // Sizes and types. With experts sharded over `shards` = s ranks, hiddenDim
  // is a shard's (h / s) and the routing after the gate counts E * s virtual
  // experts (`virtualExperts`) with k * s choices.
  int64_t tokens, modelDim, hiddenDim, experts, topK, ranks, shards,
      virtualExperts;
  Type element, routerElement, f32, i32;
  bool gated, bias;
  moe::CapacityAttr capacityAttr;
  int64_t capacityBound;

  // Arguments.
  Value x, wg, out, lAux, gradOut, gradLAux, gradX, gradWg;
  ExpertWeights weights, weightGrads;

  // Per variant: layout, rows of the dispatch-side buffers, buffers.
  Layout layout;
  int64_t rows;
  Value logits, scores, indices, locations, gates, capacity, offsets,
      expertRows, dispatched, expertOut;
  // The routing dispatch and combine use: the gate's, or shard_routing's.
  Value rowIndices, rowLocations, rowGates, rowOffsets, rowRows;
  // Per variant and chunk: activations the backward reads.
  struct ChunkBuffers {
    std::pair<Value, Value> segments;
    Value input, hidden, hiddenPre, gateProj, upProj, output;
  };
  SmallVector<ChunkBuffers> chunks;
  Value gradHidden, gradHiddenPre, gradGateProj, gradUpProj;
  ExpertWeights fullWeights; // data parallel: gathered
};

bool PlanBuilder::reluExperts() {
  auto attr = first.experts.front().getActivationAttr();
  return first.experts.front().getKind() != moe::ExpertKind::Gated && attr &&
         attr.getValue() == moe::Activation::Relu;
}

LayerAttr PlanBuilder::layerAttr() {
  moe::GateOp gate = first.gate;
  moe::ExpertOp expert = first.experts.front();
  std::optional<moe::Activation> act;
  if (auto attr = expert.getActivationAttr())
    act = attr.getValue();
  // getChecked: the moe verifiers do not bound every field the runtime does
  // (the dtype, for one), so a layer the runtime would reject fails here.
  return LayerAttr::getChecked(
      [&] { return gate.emitOpError(); }, b.getContext(), tokens, modelDim,
      hiddenDim * shards, experts, topK, capacityAttr, expert.getKind(),
      act.value_or(moe::Activation::Silu), element, bias, routerElement.isF32(),
      gate.getNormalize(), gate.getBatchPrioritized(), gate.getNoise(),
      static_cast<int64_t>(gate.getSeed()));
}

void PlanBuilder::declareArguments() {
  moe::ExpertOp expert = first.experts.front();
  MemRefType tokensType = memref({tokens, modelDim}, element);
  x = argument("x", ArgumentRole::Input, tokensType);
  wg = argument("wg", ArgumentRole::Input,
                memref({modelDim, experts}, routerElement));
  // Each rank's slice [E / W, ...] of the expert parameters, or its shard
  // [1, ...] of one expert (E < W).
  auto weightArgument = [&](StringRef name, Value operand, ArgumentRole role) {
    Value argument = first.weightArgument(operand);
    return argument ? this->argument(name, role, memrefOf(argument)) : Value();
  };
  weights.w1 = weightArgument("w1", expert.getFc1Weight(), ArgumentRole::Input);
  weights.b1 = weightArgument("b1", expert.getFc1Bias(), ArgumentRole::Input);
  weights.w2 = weightArgument("w2", expert.getFc2Weight(), ArgumentRole::Input);
  weights.b2 = weightArgument("b2", expert.getFc2Bias(), ArgumentRole::Input);
  weights.w3 = weightArgument("w3", expert.getUpWeight(), ArgumentRole::Input);
  out = argument("out", ArgumentRole::Output, tokensType);
  lAux = argument("l_aux", ArgumentRole::Output, memref({1}, f32));
  if (!options.training)
    return;
  gradOut = argument("grad_out", ArgumentRole::GradInput, tokensType);
  gradLAux = argument("grad_l_aux", ArgumentRole::GradInput, memref({1}, f32));
  gradX = argument("grad_x", ArgumentRole::GradOutput, tokensType);
  gradWg = argument("grad_wg", ArgumentRole::GradOutput,
                    memref({modelDim, experts}, routerElement));
  ArgumentRole grad = ArgumentRole::GradOutput;
  weightGrads.w1 = weightArgument("grad_w1", expert.getFc1Weight(), grad);
  weightGrads.b1 = weightArgument("grad_b1", expert.getFc1Bias(), grad);
  weightGrads.w2 = weightArgument("grad_w2", expert.getFc2Weight(), grad);
  weightGrads.b2 = weightArgument("grad_b2", expert.getFc2Bias(), grad);
  weightGrads.w3 = weightArgument("grad_w3", expert.getUpWeight(), grad);
}

FailureOr<PlanOp> PlanBuilder::build(StringRef name,
                                     ArrayRef<PlanVariant> variants) {
  moe::GateOp gate = first.gate;
  auto input = cast<RankedTensorType>(gate.getInput().getType());
  auto router = cast<RankedTensorType>(gate.getRouterWeight().getType());
  moe::RoutingType routingType = gate.getRouting().getType();
  tokens = input.getDimSize(0);
  modelDim = input.getDimSize(1);
  experts = routingType.getExperts();
  topK = routingType.getTopK();
  ranks = gate.getRanks();
  hiddenDim = first.experts.front().getHiddenDim();
  shards = first.shardRouting ? first.shardRouting.getShards() : 1;
  virtualExperts = experts * shards;
  element = input.getElementType();
  routerElement = router.getElementType();
  f32 = b.getF32Type();
  i32 = b.getI32Type();
  gated = first.experts.front().getKind() == moe::ExpertKind::Gated;
  bias = static_cast<bool>(first.experts.front().getFc1Bias());
  capacityAttr = gate.getCapacity();

  // [cap-1]: no expert gets more than T slots; C is aligned up.
  int64_t bound = tokens;
  if (auto capBound = capacityAttr.getCapacityBound(tokens, experts, topK))
    bound = capacityAttr.getMode() == moe::CapacityMode::Fixed
                ? *capBound
                : std::min(*capBound, tokens);
  int64_t align = capacityAttr.getAlignment();
  capacityBound = (bound + align - 1) / align * align;

  LayerAttr layer = layerAttr();
  if (!layer)
    return failure();
  auto plan = PlanOp::create(b, loc, b.getStringAttr(name), layer,
                             options.training ? b.getUnitAttr() : UnitAttr(),
                             b.getI64IntegerAttr(ranks), IntegerAttr(),
                             b.getI64IntegerAttr(256));
  plan.getBody().push_back(new Block());
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(&plan.getBody().front());
  declareArguments();
  for (const PlanVariant &variant : variants) {
    moe::GateOp variantGate = variant.layer.gate;
    if (static_cast<int64_t>(variantGate.getRanks()) != ranks)
      return variantGate.emitOpError(
          "[plan-3] every variant of a plan runs on the same ranks");
    variantOp = VariantOp::create(b, loc, b.getStringAttr(variant.name),
                                  /*workspace_bytes=*/nullptr);
    variantOp.getForward().push_back(new Block());
    variantOp.getBackward().push_back(new Block());
    prefix = variants.size() > 1 ? variant.name + "." : "";
    buildVariant(variant);
    b.setInsertionPointAfter(variantOp);
  }
  return plan;
}

void PlanBuilder::buildVariant(const PlanVariant &variant) {
  ExpandedLayer layer = variant.layer;
  layout = variant.layout;
  rows = virtualExperts * capacityBound;
  if (layout != Layout::Padded)
    rows = std::min(rows, tokens * topK);
  if (layout == Layout::Aligned)
    rows = alignedLayoutRows(rows, virtualExperts, capacityBound,
                             kAlignedLayoutRows);

  logits = alloc("logits", memref({tokens, experts}, f32));
  scores = alloc("scores", memref({tokens, experts}, f32));
  indices = alloc("indices", memref({tokens, topK}, i32));
  locations = alloc("locations", memref({tokens, topK}, i32));
  gates = alloc("gates", memref({tokens, topK}, f32));
  capacity = alloc("capacity", memref({1}, i32));
  offsets = alloc("expert_offsets", memref({experts + 1}, i32));
  expertRows = alloc("expert_rows", memref({experts}, i32));
  rowIndices = indices;
  rowLocations = locations;
  rowGates = gates;
  rowOffsets = offsets;
  rowRows = expertRows;
  if (shards > 1) {
    int64_t choices = topK * shards;
    rowIndices = alloc("shard_indices", memref({tokens, choices}, i32));
    rowLocations = alloc("shard_locations", memref({tokens, choices}, i32));
    rowGates = alloc("shard_gates", memref({tokens, choices}, f32));
    rowOffsets =
        alloc("shard_expert_offsets", memref({virtualExperts + 1}, i32));
    rowRows = alloc("shard_expert_rows", memref({virtualExperts}, i32));
  }
  dispatched = alloc("dispatched", memref({rows, modelDim}, element));
  expertOut = alloc("expert_out", memref({rows, modelDim}, element));

  b.setInsertionPointToStart(&variantOp.getForward().front());
  buildForward(layer);
  if (options.training) {
    b.setInsertionPointToStart(&variantOp.getBackward().front());
    buildBackward(layer);
  }
}

void PlanBuilder::expertsForward(Value a, Value y,
                                 std::pair<Value, Value> segments,
                                 const ExpertWeights &w, int64_t chunk) {
  // Chunks write disjoint rows of one set of activation buffers.
  MemRefType hiddenType = memref({rows, hiddenDim}, element);
  ChunkBuffers &c = chunks[chunk];
  c.input = a;
  c.output = y;
  c.segments = segments;
  if (chunk > 0) {
    c.hidden = chunks[0].hidden;
    c.hiddenPre = chunks[0].hiddenPre;
    c.gateProj = chunks[0].gateProj;
    c.upProj = chunks[0].upProj;
  } else {
    c.hidden = alloc("hidden", hiddenType);
    if (gated) {
      c.gateProj = alloc("gate_proj", hiddenType);
      c.upProj = alloc("up_proj", hiddenType);
    } else if (options.training && !reluExperts()) {
      c.hiddenPre = alloc("hidden_pre", hiddenType);
    }
  }
  if (gated) {
    createStep<GroupedGemmOp>(
        b, loc,
        withSegments({{"a", a}, {"b", w.w1}, {"c", c.gateProj}}, segments));
    createStep<GroupedGemmOp>(
        b, loc,
        withSegments({{"a", a}, {"b", w.w3}, {"c", c.upProj}}, segments));
    createStep<GluOp>(
        b, loc,
        withSegments(
            {{"gate_in", c.gateProj}, {"up_in", c.upProj}, {"c", c.hidden}},
            segments));
  } else {
    // With training, the GEMM also keeps the value before the activation
    // for activation_backward; a ReLU's derivative reads its output instead
    // (relu'(relu(x)) = relu'(x)), which the backward keeps anyway (fc2's
    // weight gradient), so fc1 writes hidden once and no pre.
    createStep<GroupedGemmOp>(
        b, loc,
        withSegments({{"a", a},
                      {"b", w.w1},
                      {"bias", w.b1},
                      {"c", c.hidden},
                      {"pre", c.hiddenPre}},
                     segments),
        {b.getNamedAttr("epilogue",
                        first.experts.front().getActivationAttr())});
  }
  // Each of s shards adds b2 / s: their sum adds b2 once.
  SmallVector<NamedAttribute> fc2Attrs;
  if (shards > 1 && w.b2)
    fc2Attrs.push_back(b.getNamedAttr(
        "bias_scale", b.getF64FloatAttr(1.0 / static_cast<double>(shards))));
  createStep<GroupedGemmOp>(
      b, loc,
      withSegments({{"a", c.hidden}, {"b", w.w2}, {"bias", w.b2}, {"c", y}},
                   segments),
      fc2Attrs);
}

void PlanBuilder::expertsBackward(Value a, Value gradY, Value gradA,
                                  std::pair<Value, Value> segments,
                                  const ExpertWeights &w,
                                  const ExpertWeights &grads, int64_t chunk) {
  MemRefType hiddenType = memref({rows, hiddenDim}, element);
  ChunkBuffers &c = chunks[chunk];
  NamedAttribute transB = b.getNamedAttr("trans_b", b.getUnitAttr());
  SmallVector<NamedAttribute> sum;
  if (chunk > 0)
    sum.push_back(b.getNamedAttr("accumulate", b.getUnitAttr()));
  // Chunks use disjoint rows of one set of gradient buffers.
  if (chunk == 0) {
    gradHidden = alloc("grad_hidden", hiddenType);
    if (gated) {
      gradGateProj = alloc("grad_gate_proj", hiddenType);
      gradUpProj = alloc("grad_up_proj", hiddenType);
    } else {
      gradHiddenPre = alloc("grad_hidden_pre", hiddenType);
    }
  }

  createStep<GroupedGemmWgradOp>(b, loc,
                                 withSegments({{"a", c.hidden},
                                               {"grad_c", gradY},
                                               {"grad_b", grads.w2},
                                               {"grad_bias", grads.b2}},
                                              segments),
                                 sum);
  createStep<GroupedGemmOp>(
      b, loc,
      withSegments({{"a", gradY}, {"b", w.w2}, {"c", gradHidden}}, segments),
      {transB});
  if (gated) {
    createStep<GluBackwardOp>(b, loc,
                              withSegments({{"gate_in", c.gateProj},
                                            {"up_in", c.upProj},
                                            {"grad", gradHidden},
                                            {"grad_gate_in", gradGateProj},
                                            {"grad_up_in", gradUpProj}},
                                           segments));
    createStep<GroupedGemmWgradOp>(
        b, loc,
        withSegments({{"a", a}, {"grad_c", gradGateProj}, {"grad_b", grads.w1}},
                     segments),
        sum);
    createStep<GroupedGemmWgradOp>(
        b, loc,
        withSegments({{"a", a}, {"grad_c", gradUpProj}, {"grad_b", grads.w3}},
                     segments),
        sum);
    createStep<GroupedGemmOp>(
        b, loc,
        withSegments({{"a", gradGateProj}, {"b", w.w1}, {"c", gradA}},
                     segments),
        {transB});
    createStep<GroupedGemmOp>(
        b, loc,
        withSegments({{"a", gradUpProj}, {"b", w.w3}, {"c", gradA}}, segments),
        {transB, b.getNamedAttr("accumulate", b.getUnitAttr())});
    return;
  }
  createStep<ActivationBackwardOp>(
      b, loc,
      withSegments({{"pre", reluExperts() ? c.hidden : c.hiddenPre},
                    {"grad", gradHidden},
                    {"grad_pre", gradHiddenPre}},
                   segments),
      {b.getNamedAttr("activation",
                      first.experts.front().getActivationAttr())});
  createStep<GroupedGemmWgradOp>(b, loc,
                                 withSegments({{"a", a},
                                               {"grad_c", gradHiddenPre},
                                               {"grad_b", grads.w1},
                                               {"grad_bias", grads.b1}},
                                              segments),
                                 sum);
  createStep<GroupedGemmOp>(
      b, loc,
      withSegments({{"a", gradHiddenPre}, {"b", w.w1}, {"c", gradA}}, segments),
      {transB});
}

void PlanBuilder::buildForward(ExpandedLayer layer) {
  moe::GateOp gate = layer.gate;
  createStep<RouterOp>(b, loc, {{"x", x}, {"wg", wg}, {"logits", logits}});
  auto gateStep = createStep<GateOp>(
      b, loc,
      {{"logits", logits},
       {"scores", scores},
       {"indices", indices},
       {"locations", locations},
       {"gates", gates},
       {"capacity", capacity},
       {"expert_offsets", offsets},
       {"expert_rows", expertRows},
       {"l_aux", lAux}},
      {b.getNamedAttr("top_k", b.getI64IntegerAttr(topK)),
       b.getNamedAttr("capacity", gate.getCapacityAttr()),
       b.getNamedAttr("noise", gate.getNoiseAttr()),
       b.getNamedAttr("seed", gate.getSeedAttr()),
       b.getNamedAttr("layout", LayoutAttr::get(b.getContext(), layout))});
  gateStep.setNormalize(gate.getNormalize());
  gateStep.setBatchPrioritized(gate.getBatchPrioritized());
  // One capacity for every rank when it depends on the routing.
  if (ranks > 1 && !gate.getRouting().getType().hasStaticCapacity())
    createStep<SyncCapacityOp>(
        b, loc, {{"capacity", capacity}, {"expert_offsets", offsets}});
  // Sharded experts: route to the s shards of each chosen expert (the same
  // role names in and out; inputs first).
  if (shards > 1)
    createStep<ShardRoutingOp>(
        b, loc,
        {{"indices", indices},
         {"locations", locations},
         {"gates", gates},
         {"capacity", capacity},
         {"expert_rows", expertRows},
         {"indices", rowIndices},
         {"locations", rowLocations},
         {"gates", rowGates},
         {"expert_offsets", rowOffsets},
         {"expert_rows", rowRows}},
        {b.getNamedAttr("shards", b.getI64IntegerAttr(shards))});

  createStep<DispatchOp>(b, loc,
                         {{"x", x},
                          {"indices", rowIndices},
                          {"locations", rowLocations},
                          {"capacity", capacity},
                          {"expert_offsets", rowOffsets},
                          {"dispatched", dispatched}});

  // r = 0 gathers every rank's experts; 1 <= r < s the shards of the
  // rank's shard group.
  fullWeights = gatherWeights(layer);
  if (!layer.isExpertParallel()) {
    ExpertWeights w = fullWeights;
    chunks.assign(1, {});
    expertsForward(dispatched, expertOut, {rowOffsets, rowRows}, w, 0);
  } else {
    // r = 1: per capacity chunk, exchange rows, run this rank's experts on
    // the rows of every rank, exchange back. Every chunk's rows are sent
    // first, so a device runtime that queues exchanges on their own stream
    // receives chunk q + 1 while the experts of chunk q run, and returns
    // chunk q while the experts of chunk q + 1 run.
    int64_t numChunks = layer.experts.size();
    // All W ranks, or (1 <= r < s) the W / g ranks of the token class.
    int64_t exchangeRanks = layer.dispatchExchange.getRanks();
    int64_t localExperts = virtualExperts / exchangeRanks;
    Value received = alloc("received", memref({rows, modelDim}, element));
    Value produced = alloc("produced", memref({rows, modelDim}, element));
    chunks.assign(numChunks, {});
    auto direction = [&](int64_t q, Direction d) {
      return exchangeAttrs(layer, numChunks, q, d);
    };
    for (int64_t q = 0; q < numChunks; ++q)
      createStep<AllToAllOp>(
          b, loc,
          {{"input", dispatched}, {"capacity", capacity}, {"output", received}},
          direction(q, Direction::Dispatch));
    for (int64_t q = 0; q < numChunks; ++q) {
      std::string suffix = numChunks > 1 ? "." + std::to_string(q) : "";
      Value segmentOffsets =
          alloc("segment_offsets" + suffix, memref({localExperts + 1}, i32));
      Value segmentRows =
          alloc("segment_rows" + suffix, memref({localExperts}, i32));
      SmallVector<NamedAttribute> segmentAttrs = {
          b.getNamedAttr("chunks", b.getI64IntegerAttr(numChunks)),
          b.getNamedAttr("chunk", b.getI64IntegerAttr(q))};
      segmentAttrs.push_back(
          b.getNamedAttr("groups", b.getI64IntegerAttr(localExperts)));
      segmentAttrs.push_back(
          b.getNamedAttr("ranks", b.getI64IntegerAttr(exchangeRanks)));
      createStep<UniformSegmentsOp>(b, loc,
                                    {{"capacity", capacity},
                                     {"expert_offsets", segmentOffsets},
                                     {"expert_rows", segmentRows}},
                                    segmentAttrs);
      expertsForward(received, produced, {segmentOffsets, segmentRows},
                     fullWeights, q);
      createStep<AllToAllOp>(
          b, loc,
          {{"input", produced}, {"capacity", capacity}, {"output", expertOut}},
          direction(q, Direction::Combine));
    }
  }
  createStep<CombineOp>(b, loc,
                        {{"expert_out", expertOut},
                         {"indices", rowIndices},
                         {"locations", rowLocations},
                         {"gates", rowGates},
                         {"capacity", capacity},
                         {"expert_offsets", rowOffsets},
                         {"out", out}});
}

void PlanBuilder::buildBackward(ExpandedLayer layer) {
  MemRefType rowsType = memref({rows, modelDim}, element);
  Value gradExpertOut = alloc("grad_expert_out", rowsType);
  Value gradGates = alloc("grad_gates", memref({tokens, topK}, f32));
  Value gradDispatched = alloc("grad_dispatched", rowsType);
  Value gradLogits = alloc("grad_logits", memref({tokens, experts}, f32));
  // Sharded experts: combine's gate gradients are per shard, [T, k * s].
  Value rowGradGates = gradGates;
  if (shards > 1)
    rowGradGates =
        alloc("shard_grad_gates", memref({tokens, topK * shards}, f32));

  createStep<CombineBackwardOp>(b, loc,
                                {{"grad_out", gradOut},
                                 {"expert_out", expertOut},
                                 {"indices", rowIndices},
                                 {"locations", rowLocations},
                                 {"gates", rowGates},
                                 {"capacity", capacity},
                                 {"expert_offsets", rowOffsets},
                                 {"grad_expert_out", gradExpertOut},
                                 {"grad_gates", rowGradGates}});
  if (shards > 1)
    createStep<ShardRoutingBackwardOp>(
        b, loc, {{"grad_gates", rowGradGates}, {"grad_gates", gradGates}},
        {b.getNamedAttr("shards", b.getI64IntegerAttr(shards))});

  if (!layer.isExpertParallel()) {
    // r = 0: gradients of every expert, then each rank keeps the sum over
    // ranks of its own.
    ExpertWeights grads = gatheredGrads(layer);
    expertsBackward(dispatched, gradExpertOut, gradDispatched,
                    {rowOffsets, rowRows}, fullWeights, grads, 0);
    scatterGrads(layer, grads);
  } else {
    // 1 <= r < s: gradients of the shard group's shards, summed over the
    // group (its g token classes), each rank keeping its own; for b2 (the
    // same on every shard) the sum of the class partials is the whole
    // gradient.
    ExpertWeights grads = gatheredGrads(layer);
    int64_t numChunks = chunks.size();
    Value gradProduced = alloc("grad_produced", rowsType);
    Value gradReceived = alloc("grad_received", rowsType);
    auto direction = [&](int64_t q, Direction d) {
      return exchangeAttrs(layer, numChunks, q, d);
    };
    // The backward of the combine exchange is a dispatch exchange; as in
    // the forward, every chunk is sent before the experts run.
    for (int64_t q = 0; q < numChunks; ++q)
      createStep<AllToAllOp>(b, loc,
                             {{"input", gradExpertOut},
                              {"capacity", capacity},
                              {"output", gradProduced}},
                             direction(q, Direction::Dispatch));
    for (int64_t q = 0; q < numChunks; ++q) {
      expertsBackward(chunks[q].input, gradProduced, gradReceived,
                      chunks[q].segments, fullWeights, grads, q);
      createStep<AllToAllOp>(b, loc,
                             {{"input", gradReceived},
                              {"capacity", capacity},
                              {"output", gradDispatched}},
                             direction(q, Direction::Combine));
    }
    scatterGrads(layer, grads);
  }

  createStep<DispatchBackwardOp>(b, loc,
                                 {{"grad_dispatched", gradDispatched},
                                  {"indices", rowIndices},
                                  {"locations", rowLocations},
                                  {"capacity", capacity},
                                  {"expert_offsets", rowOffsets},
                                  {"grad_x", gradX}});
  auto gateBackward = createStep<GateBackwardOp>(
      b, loc,
      {{"grad_gates", gradGates},
       {"grad_l_aux", gradLAux},
       {"scores", scores},
       {"indices", indices},
       {"grad_logits", gradLogits}},
      {b.getNamedAttr("top_k", b.getI64IntegerAttr(topK))});
  gateBackward.setNormalize(layer.gate.getNormalize());
  createStep<RouterBackwardOp>(b, loc,
                               {{"x", x},
                                {"wg", wg},
                                {"grad_logits", gradLogits},
                                {"grad_x", gradX},
                                {"grad_wg", gradWg}});
}

/// Lowers the layer functions of one plan (one, or the variants of one
/// layer) and erases them.
LogicalResult lowerPlan(StringRef name, ArrayRef<func::FuncOp> functions,
                        const MoeToMoeRTOptions &options) {
  SmallVector<PlanVariant> variants;
  func::FuncOp firstFunction = functions.front();
  for (func::FuncOp func : functions) {
    FailureOr<ExpandedLayer> layer = moe::matchExpandedLayer(func);
    if (failed(layer))
      return failure();
    if (func.getFunctionType() != firstFunction.getFunctionType())
      return func.emitOpError("[plan-3] every variant of a plan has the same "
                              "arguments (one parameter layout), expected ")
             << firstFunction.getFunctionType();
    StringRef tag;
    if (auto attr = func->getAttrOfType<StringAttr>("moe.variant"))
      tag = attr.getValue();
    if (failed(addLayoutVariants(*layer, tag, options, variants)))
      return failure();
  }
  OpBuilder builder(functions.front());
  PlanBuilder planBuilder(builder, variants.front().layer, options);
  if (failed(planBuilder.build(name, variants)))
    return failure();
  for (func::FuncOp func : functions)
    func.erase();
  return success();
}

struct ConvertMoeToMoeRTPass final
    : flex::impl::ConvertMoeToMoeRTPassBase<ConvertMoeToMoeRTPass> {
  using Base::Base;

  /// `layout` and `layouts` into `lowering`, or a diagnostic.
  LogicalResult parseLayouts(MoeToMoeRTOptions &lowering) {
    ModuleOp module = getOperation();
    if (layout == "padded")
      lowering.layout = Layout::Padded;
    else if (layout == "ragged")
      lowering.layout = Layout::Ragged;
    else if (layout == "aligned")
      lowering.layout = Layout::Aligned;
    else if (layout != "auto")
      return module.emitError("[plan-3] layout must be auto, padded, ragged "
                              "or aligned, got '")
             << layout << "'";
    if (layouts.empty())
      return success();
    if (lowering.layout)
      return module.emitError("[plan-3] give layout or layouts, not both: "
                              "layout=")
             << layout << " with layouts=" << llvm::join(layouts, ",");
    for (const std::string &text : layouts) {
      std::optional<Layout> parsed = symbolizeLayout(text);
      if (!parsed)
        return module.emitError("[plan-3] layouts lists padded, ragged and "
                                "aligned (one variant each), got '")
               << text << "'";
      if (llvm::is_contained(lowering.layouts, *parsed))
        return module.emitError("[plan-3] layout '")
               << text << "' is listed twice in layouts";
      lowering.layouts.push_back(*parsed);
    }
    return success();
  }

  void runOnOperation() override {
    MoeToMoeRTOptions lowering;
    lowering.training = training;
    if (failed(parseLayouts(lowering)))
      return signalPassFailure();
    // Plans by name: a function's own, or the layer it is a variant of.
    llvm::MapVector<StringRef, SmallVector<func::FuncOp>> plans;
    getOperation().walk([&](func::FuncOp func) {
      bool hasMoe = false;
      func.walk([&](Operation *op) {
        hasMoe |= isa<moe::MoeDialect>(op->getDialect());
      });
      if (!hasMoe)
        return;
      StringRef name = func.getSymName();
      if (auto of = func->getAttrOfType<StringAttr>("moe.variant_of"))
        name = of.getValue();
      plans[name].push_back(func);
    });
    for (auto &[name, functions] : plans) {
      if (failed(lowerPlan(name, functions, lowering)))
        return signalPassFailure();
    }
  }
};
} // namespace

FailureOr<PlanOp> flex::lowerLayerToPlan(func::FuncOp func,
                                         const MoeToMoeRTOptions &options) {
  FailureOr<ExpandedLayer> layer = moe::matchExpandedLayer(func);
  if (failed(layer))
    return failure();
  SmallVector<PlanVariant> variants;
  if (failed(addLayoutVariants(*layer, "", options, variants)))
    return failure();
  OpBuilder builder(func);
  PlanBuilder planBuilder(builder, *layer, options);
  return planBuilder.build(func.getSymName(), variants);
}
