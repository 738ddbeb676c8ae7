//===- A2A2DH.cpp - Hierarchical all-to-all over nodes --------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moe-a2a-2dh: the expert exchanges of a layer use the
// two-dimensional hierarchical algorithm (within a node, then across nodes)
// when the ranks span several nodes. Only the algorithm changes, not the
// result, so the pass just records the node size on each exchange.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/Passes.h"

#include "mlir/IR/Builders.h"

namespace flex::moe {
#define GEN_PASS_DEF_MOEA2A2DHPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct MoeA2A2DHPass final : flex::moe::impl::MoeA2A2DHPassBase<MoeA2A2DHPass> {
  using Base::Base;

  void runOnOperation() override {
    Builder builder(&getContext());
    WalkResult result = getOperation().walk([&](AllToAllOp exchange) {
      int64_t ranks = exchange.getRanks();
      // A grouped exchange (experts sharded with 1 <= r < s) runs among
      // ranks `group_stride` apart, which nodes of consecutive ranks do not
      // describe: it stays flat.
      if (exchange.getGroupStride() > 1)
        return WalkResult::advance();
      if (ranksPerNode < 1 || ranks % ranksPerNode != 0) {
        exchange.emitOpError("[a2a-1] ranks-per-node must divide the ")
            << ranks << " ranks, got " << int64_t(ranksPerNode);
        return WalkResult::interrupt();
      }
      // One node: the flat exchange is already the intra-node one.
      if (ranksPerNode < ranks)
        exchange.setRanksPerNode(ranksPerNode);
      return WalkResult::advance();
    });
    if (result.wasInterrupted())
      signalPassFailure();
  }
};
} // namespace
