//===- PlanMemory.cpp - Place workspace buffers by liveness ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moert-plan-memory: every moert.alloc of a plan gets
// a byte offset in one workspace block, and buffers whose lives do not
// overlap share bytes. The runtime then needs one allocation per executable.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "mlir/IR/Builders.h"
#include "llvm/ADT/DenseMap.h"
#include "llvm/Support/MathExtras.h"

namespace flex::moert {
#define GEN_PASS_DEF_MOERTPLANMEMORYPASS
#include "flex/Dialect/MoeRT/Transforms/Passes.h.inc"
} // namespace flex::moert

using namespace mlir;
using namespace flex::moert;

namespace {
struct Interval {
  AllocOp alloc;
  int64_t bytes = 0;
  int64_t first = -1; ///< index of the first step that touches it
  int64_t last = -1;  ///< index of the last step that touches it
  int64_t offset = 0;

  bool overlaps(const Interval &other) const {
    return first <= other.last && other.first <= last;
  }
};

struct MoeRTPlanMemoryPass final
    : flex::moert::impl::MoeRTPlanMemoryPassBase<MoeRTPlanMemoryPass> {
  using Base::Base;

  void runOnOperation() override {
    PlanOp plan = getOperation();
    int64_t alignment = plan.getWorkspaceAlignment();

    // Live ranges over the steps in the order the runtime may run them:
    // forward, then backward, of each variant.
    SmallVector<Interval> intervals;
    DenseMap<Value, size_t> intervalOf;
    for (AllocOp alloc : plan.getBody().getOps<AllocOp>()) {
      auto type = cast<MemRefType>(alloc.getBuffer().getType());
      int64_t bytes =
          type.getNumElements() *
          int64_t(llvm::divideCeil(type.getElementTypeBitWidth(), 8));
      intervalOf[alloc.getBuffer()] = intervals.size();
      intervals.push_back({alloc, bytes});
    }
    int64_t stepIndex = 0;
    for (VariantOp variant : plan.getBody().getOps<VariantOp>()) {
      for (Region *region : {&variant.getForward(), &variant.getBackward()}) {
        for (Operation &step : region->front()) {
          for (Value operand : step.getOperands()) {
            auto it = intervalOf.find(operand);
            if (it == intervalOf.end())
              continue;
            Interval &interval = intervals[it->second];
            if (interval.first < 0)
              interval.first = stepIndex;
            interval.last = stepIndex;
          }
          ++stepIndex;
        }
      }
    }

    // Largest first, each at the lowest aligned offset that no placed buffer
    // with an overlapping life occupies: the classic greedy by size.
    SmallVector<Interval *> order;
    for (Interval &interval : intervals)
      order.push_back(&interval);
    llvm::stable_sort(order, [](const Interval *a, const Interval *b) {
      return a->bytes > b->bytes;
    });
    SmallVector<Interval *> placed;
    int64_t peak = 0, unshared = 0;
    for (Interval *interval : order) {
      unshared += llvm::alignTo(interval->bytes, alignment);
      if (interval->first < 0) {
        interval->alloc.emitWarning("workspace buffer '")
            << interval->alloc.getName() << "' is never used";
      }
      SmallVector<std::pair<int64_t, int64_t>> busy;
      for (Interval *other : placed)
        if (other->overlaps(*interval) || interval->first < 0 ||
            other->first < 0)
          busy.push_back({other->offset, other->offset + other->bytes});
      llvm::sort(busy);
      int64_t offset = 0;
      for (auto [begin, end] : busy) {
        if (offset + interval->bytes <= begin)
          break;
        offset = std::max(offset, int64_t(llvm::alignTo(end, alignment)));
      }
      interval->offset = offset;
      peak = std::max(peak, offset + interval->bytes);
      placed.push_back(interval);
    }

    Builder builder(&getContext());
    for (Interval &interval : intervals)
      interval.alloc.setOffsetAttr(builder.getI64IntegerAttr(interval.offset));
    int64_t total = llvm::alignTo(peak, alignment);
    plan.setWorkspaceBytesAttr(builder.getI64IntegerAttr(total));
    // Each variant's own peak: the variants never run at once, so the
    // placement above lets each start at offset 0, and a workspace of a
    // variant's peak runs it (a plan carrying a memory-hungry layout beside
    // a lean one costs the hungry one's bytes only where it runs).
    std::string perVariant;
    for (VariantOp variant : plan.getBody().getOps<VariantOp>()) {
      int64_t variantPeak = 0;
      variant.walk([&](Operation *step) {
        for (Value operand : step->getOperands())
          if (auto it = intervalOf.find(operand); it != intervalOf.end())
            variantPeak =
                std::max(variantPeak, intervals[it->second].offset +
                                          intervals[it->second].bytes);
      });
      variantPeak = llvm::alignTo(variantPeak, alignment);
      variant.setWorkspaceBytesAttr(builder.getI64IntegerAttr(variantPeak));
      perVariant += (perVariant.empty() ? "" : ", ") + variant.getName().str() +
                    " " + std::to_string(variantPeak);
    }
    if (report)
      plan.emitRemark("workspace: ")
          << total << " bytes for " << intervals.size() << " buffers ("
          << unshared << " bytes without reuse); per variant: " << perVariant;
  }
};
} // namespace
