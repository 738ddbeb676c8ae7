//===- LayerTransforms.h - Find and rewrite one expanded layer --*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the structure of an expanded MoE layer in a function
// (gate, dispatch, optional all-to-alls and weight gathers, experts, combine)
// and the rewrites that parallelize and pipeline it. The passes and the
// lowering to moert share them.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_TRANSFORMS_LAYERTRANSFORMS_H
#define FLEX_DIALECT_MOE_TRANSFORMS_LAYERTRANSFORMS_H

#include "flex/Dialect/Moe/IR/MoeOps.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/PatternMatch.h"

namespace flex::moe {

/// One expanded layer. `experts` has one op per capacity chunk (one without
/// pipelining); the all-to-alls exist for expert parallelism, the gathers
/// for data parallelism (keyed by the gathered weight argument).
struct ExpandedLayer {
  GateOp gate;
  /// Experts sharded over ranks: the gate's routing over their shards.
  ShardRoutingOp shardRouting;
  DispatchOp dispatch;
  AllToAllOp dispatchExchange;
  llvm::SmallVector<ExpertOp> experts;
  AllToAllOp combineExchange;
  CombineOp combine;
  llvm::SmallVector<AllGatherOp> gathers;
  mlir::func::ReturnOp ret;

  int64_t ranks() { return gate.getRanks(); }
  bool isExpertParallel() { return static_cast<bool>(dispatchExchange); }
  /// The weight argument an expert operand comes from (through a gather).
  mlir::Value weightArgument(mlir::Value operand);
};

/// Finds the layer of `func` and checks its structure; diagnostics name the
/// rule ([plan-3]) and the op at fault.
mlir::FailureOr<ExpandedLayer> matchExpandedLayer(mlir::func::FuncOp func);

/// Rewrites `layer` into its four steps.
void expandLayer(LayerOp layer, mlir::RewriterBase &rewriter);

/// Parallelizes a single-rank expanded layer over `ranks` ranks with one
/// parameter layout: each rank's expert weights become its slice [E/W, ...],
/// or, with E < W, its shard [1, ...] of h / s hidden units of one expert
/// (s = W / E ranks per expert; the layer then routes to E * s virtual
/// experts, moe.shard_routing). `parallelism` is r: r = 0 gathers the
/// weights; r = 1 (whole experts) or r = s (sharded) exchanges tokens with
/// all-to-alls. Other r are rejected ([par-1]).
/// `kExchangeOverAllShards` (the pass's default) is r = 1 or r = s.
mlir::LogicalResult parallelizeLayer(mlir::func::FuncOp func, int64_t ranks,
                                     int64_t parallelism);
inline constexpr int64_t kExchangeOverAllShards = -1;

/// Splits the capacity of an expert-parallel layer into `chunks` chunks.
mlir::LogicalResult pipelineLayer(mlir::func::FuncOp func, int64_t chunks);

} // namespace flex::moe

#endif // FLEX_DIALECT_MOE_TRANSFORMS_LAYERTRANSFORMS_H
