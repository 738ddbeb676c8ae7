//===- Multiversion.cpp - Several parallel variants of each layer ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements --moe-multiversion: one function per variant of a
// layer (parallelism r, pipelining degree D), all with one parameter layout
// and one capacity, so the runtime can switch between them per call and
// get the same result.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/Transforms/LayerTransforms.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"

#include "mlir/IR/BuiltinOps.h"
#include "llvm/ADT/StringExtras.h"

#include <numeric>

namespace flex::moe {
#define GEN_PASS_DEF_MOEMULTIVERSIONPASS
#include "flex/Dialect/Moe/Transforms/Passes.h.inc"
} // namespace flex::moe

using namespace mlir;
using namespace flex::moe;

namespace {
struct Variant {
  std::string name;
  /// r: 0 data parallel; 1 (s for experts sharded over s ranks) expert
  /// parallel.
  int64_t parallelism;
  int64_t chunks;
};

/// Parses `r<R>d<D>` (R >= 0, D >= 1; decimal, no sign).
std::optional<Variant> parseVariant(StringRef text) {
  Variant variant{text.str(), 1, 1};
  if (!text.consume_front("r"))
    return std::nullopt;
  size_t digits = text.find_first_not_of("0123456789");
  if (digits == 0 || digits == StringRef::npos ||
      text.take_front(digits).getAsInteger(10, variant.parallelism))
    return std::nullopt;
  text = text.drop_front(digits);
  if (!text.consume_front("d") || text.empty() ||
      text.find_first_not_of("0123456789") != StringRef::npos ||
      text.getAsInteger(10, variant.chunks) || variant.chunks < 1)
    return std::nullopt;
  return variant;
}

struct MoeMultiversionPass final
    : flex::moe::impl::MoeMultiversionPassBase<MoeMultiversionPass> {
  using Base::Base;

  void runOnOperation() override {
    ModuleOp module = getOperation();
    if (variants.empty()) {
      module.emitError("[par-2] name the variants to keep, e.g. "
                       "variants=r1d1,r1d2,r0d1");
      return signalPassFailure();
    }
    SmallVector<Variant> parsed;
    int64_t alignment = 1;
    for (const std::string &text : variants) {
      std::optional<Variant> variant = parseVariant(text);
      if (!variant) {
        module.emitError("[par-2] variant '")
            << text << "' is not r<R>d<D> (R = 0 data parallel, R = 1 expert "
            << "parallel or R = s = W / E for experts sharded over s ranks, "
            << "D >= 1 the pipelining degree)";
        return signalPassFailure();
      }
      if (variant->parallelism == 0 && variant->chunks > 1) {
        module.emitError("[pipe-1] variant '")
            << text << "': pipelining needs expert parallelism (r >= 1)";
        return signalPassFailure();
      }
      if (llvm::any_of(parsed, [&](const Variant &other) {
            return other.name == variant->name;
          })) {
        module.emitError("[par-2] variant '") << text << "' is listed twice";
        return signalPassFailure();
      }
      alignment = std::lcm(alignment, variant->chunks);
      parsed.push_back(*variant);
    }

    SmallVector<func::FuncOp> layers;
    for (auto func : module.getOps<func::FuncOp>()) {
      if (!func.getOps<LayerOp>().empty())
        layers.push_back(func);
    }
    IRRewriter rewriter(&getContext());
    for (func::FuncOp func : layers) {
      auto layerOps = func.getOps<LayerOp>();
      if (std::next(layerOps.begin()) != layerOps.end()) {
        func.emitOpError("[plan-3] a layer function holds one moe.layer");
        return signalPassFailure();
      }
      // One capacity for every variant: align it to every degree.
      LayerOp layer = *layerOps.begin();
      CapacityAttr capacity = layer.getCapacity();
      int64_t aligned = std::lcm(capacity.getAlignment(), alignment);
      if (aligned != capacity.getAlignment())
        layer.setCapacityAttr(
            CapacityAttr::get(&getContext(), capacity.getMode(),
                              capacity.getMode() == CapacityMode::Dropless
                                  ? 0.0
                                  : capacity.getFactorValue(),
                              aligned));

      rewriter.setInsertionPoint(func);
      for (const Variant &variant : parsed) {
        auto clone = cast<func::FuncOp>(rewriter.clone(*func));
        clone.setSymName((func.getSymName() + "__" + variant.name).str());
        clone->setAttr("moe.variant_of", func.getSymNameAttr());
        clone->setAttr("moe.variant", rewriter.getStringAttr(variant.name));
        expandLayer(*clone.getOps<LayerOp>().begin(), rewriter);
        if (failed(parallelizeLayer(clone, ranks, variant.parallelism)) ||
            failed(pipelineLayer(clone, variant.chunks)))
          return signalPassFailure();
      }
      func.erase();
    }
  }
};
} // namespace
