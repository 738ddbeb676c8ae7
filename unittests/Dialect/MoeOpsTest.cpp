//===- MoeOpsTest.cpp - Building and verifying moe ops from C++ -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the C++ API of the moe dialect: ops built with
// Op::create verify when the contract holds and report the rule when it
// does not, and the capacity attribute computes [cap-1].
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/IR/MoeOps.h"
#include "flex/InitAll.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/Diagnostics.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/Verifier.h"
#include "mlir/Parser/Parser.h"

#include <gtest/gtest.h>

using namespace mlir;
using namespace flex::moe;

namespace {

class MoeOpsTest : public ::testing::Test {
protected:
  MoeOpsTest() : builder(&context) {
    DialectRegistry registry;
    flex::registerAllDialects(registry);
    context.appendDialectRegistry(registry);
    context.loadAllAvailableDialects();
    module = ModuleOp::create(builder.getUnknownLoc());
    builder.setInsertionPointToEnd(module->getBody());
  }

  RankedTensorType tensor(ArrayRef<int64_t> shape, Type element) {
    return RankedTensorType::get(shape, element);
  }

  /// A function with one argument of each type; returns its entry block.
  Block *makeFunction(ArrayRef<Type> argTypes) {
    auto fn = func::FuncOp::create(builder, builder.getUnknownLoc(), "f",
                                   builder.getFunctionType(argTypes, {}));
    Block *entry = fn.addEntryBlock();
    builder.setInsertionPointToStart(entry);
    return entry;
  }

  /// Verifies `op` and returns the first diagnostic, or "" when it verifies.
  std::string verifyAndGetError(Operation *op) {
    std::string message;
    ScopedDiagnosticHandler handler(&context, [&](Diagnostic &diag) {
      if (message.empty())
        message = diag.str();
      return success();
    });
    if (succeeded(mlir::verify(op)))
      return "";
    return message;
  }

  MLIRContext context;
  OpBuilder builder;
  OwningOpRef<ModuleOp> module;
};

TEST_F(MoeOpsTest, CapacityAttrComputesFixedCapacity) {
  auto fixed = CapacityAttr::get(&context, CapacityMode::Fixed, 1.0, 1);
  // T = 1000, E = 8: spe = 125, C = 2 * int(1.0 * 125).
  EXPECT_EQ(fixed.getStaticCapacity(1000, 8, 2), 250);
  // T = 1001: spe = ceil(1001/8) = 126.
  EXPECT_EQ(fixed.getStaticCapacity(1001, 8, 2), 252);
  auto aligned = CapacityAttr::get(&context, CapacityMode::Fixed, 1.25, 8);
  // int(1.25 * 13) = 16, k = 3: 48, aligned to 8 stays 48; T = 100, E = 8.
  EXPECT_EQ(aligned.getStaticCapacity(100, 8, 3), 48);
  auto alignedUp = CapacityAttr::get(&context, CapacityMode::Fixed, 1.0, 7);
  EXPECT_EQ(alignedUp.getStaticCapacity(100, 8, 1), 14); // 13 -> 14
  auto dropless = CapacityAttr::get(&context, CapacityMode::Dropless, 0.0, 1);
  EXPECT_FALSE(dropless.getStaticCapacity(1000, 8, 2).has_value());
  auto bounded = CapacityAttr::get(&context, CapacityMode::Bounded, 2.0, 1);
  EXPECT_FALSE(bounded.getStaticCapacity(1000, 8, 2).has_value());
  EXPECT_EQ(bounded.getCapacityBound(1000, 8, 2), 500);
}

TEST_F(MoeOpsTest, CapacityAttrOverflowIsReported) {
  auto huge = CapacityAttr::get(&context, CapacityMode::Fixed, 1e300, 1);
  EXPECT_FALSE(huge.getCapacityBound(1000, 8, 2).has_value());
  auto big = CapacityAttr::get(&context, CapacityMode::Fixed, 1e15, 1);
  // int(1e15 * 125) * 2 < 2^62 fits; * 100000 overflows.
  EXPECT_TRUE(big.getCapacityBound(1000, 8, 2).has_value());
  EXPECT_FALSE(big.getCapacityBound(1000, 8, 100000).has_value());
}

TEST_F(MoeOpsTest, CapacityAttrVerifierNamesTheRule) {
  std::string message;
  auto emitError = [&]() { return mlir::emitError(UnknownLoc::get(&context)); };
  ScopedDiagnosticHandler handler(&context, [&](Diagnostic &diag) {
    message = diag.str();
    return success();
  });
  EXPECT_FALSE(CapacityAttr::getChecked(emitError, &context,
                                        CapacityMode::Fixed,
                                        llvm::APFloat(-1.0), int64_t(1)));
  EXPECT_NE(message.find("[cap-1]"), std::string::npos) << message;
  EXPECT_FALSE(CapacityAttr::getChecked(emitError, &context,
                                        CapacityMode::Bounded,
                                        llvm::APFloat(1.0), int64_t(0)));
  EXPECT_NE(message.find("alignment"), std::string::npos) << message;
}

TEST_F(MoeOpsTest, BuildsAndVerifiesExpandedLayer) {
  Type f32 = builder.getF32Type();
  Type bf16 = builder.getBF16Type();
  const int64_t tokens = 100, dim = 16, hidden = 32, experts = 4, topK = 2;
  Block *entry =
      makeFunction({tensor({tokens, dim}, bf16), tensor({dim, experts}, f32),
                    tensor({experts, dim, hidden}, bf16),
                    tensor({experts, hidden, dim}, bf16)});
  Location loc = builder.getUnknownLoc();
  auto capacity = CapacityAttr::get(&context, CapacityMode::Fixed, 1.0, 1);
  int64_t c = *capacity.getStaticCapacity(tokens, experts, topK);
  auto routingType = RoutingType::get(&context, tokens, experts, topK, c);
  auto gate = GateOp::create(
      builder, loc, routingType, RankedTensorType::get({}, f32),
      entry->getArgument(0), entry->getArgument(1), capacity,
      /*normalize=*/builder.getUnitAttr(),
      /*batch_prioritized=*/nullptr, builder.getF64FloatAttr(0.0),
      builder.getI64IntegerAttr(0));
  auto bufferType = tensor({experts, c, dim}, bf16);
  auto dispatch = DispatchOp::create(builder, loc, bufferType,
                                     entry->getArgument(0), gate.getRouting());
  auto expert = ExpertOp::create(
      builder, loc, bufferType, dispatch.getResult(), entry->getArgument(2),
      entry->getArgument(3), Value(), Value(), Value(),
      ExpertKindAttr::get(&context, ExpertKind::FFN),
      ActivationAttr::get(&context, Activation::Gelu));
  auto combine = CombineOp::create(builder, loc, tensor({tokens, dim}, bf16),
                                   expert.getResult(), gate.getRouting());
  func::ReturnOp::create(builder, loc);
  EXPECT_EQ(verifyAndGetError(*module), "");
  EXPECT_EQ(c, 50);
  EXPECT_EQ(expert.getHiddenDim(), hidden);

  // Breaking one rule at a time names that rule.
  gate->setAttr("noise", builder.getF64FloatAttr(-1.0));
  EXPECT_NE(verifyAndGetError(gate).find("[gate-1] gate noise"),
            std::string::npos);
  gate->setAttr("noise", builder.getF64FloatAttr(0.0));

  expert->removeAttr("activation");
  EXPECT_NE(verifyAndGetError(expert).find("[expert-1] an ffn expert needs"),
            std::string::npos);
  expert->setAttr("activation",
                  ActivationAttr::get(&context, Activation::Relu));
  EXPECT_EQ(verifyAndGetError(*module), "");
  (void)combine;
}

TEST_F(MoeOpsTest, RoutingTypeRejectsTopKAboveExperts) {
  std::string message;
  ScopedDiagnosticHandler handler(&context, [&](Diagnostic &diag) {
    message = diag.str();
    return success();
  });
  auto emitError = [&]() { return mlir::emitError(UnknownLoc::get(&context)); };
  EXPECT_FALSE(RoutingType::getChecked(emitError, &context, int64_t(10),
                                       int64_t(4), int64_t(5), int64_t(3)));
  EXPECT_NE(message.find("[gate-2] top_k must be in [1, experts = 4], got 5"),
            std::string::npos)
      << message;
  EXPECT_TRUE(RoutingType::getChecked(emitError, &context, int64_t(10),
                                      int64_t(4), int64_t(4),
                                      ShapedType::kDynamic));
}

TEST_F(MoeOpsTest, ParsedLayerRoundTrips) {
  const char *text = R"mlir(
    func.func @layer(%x: tensor<64x8xf32>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>,
                     %w3: tensor<4x8x16xf32>) -> (tensor<64x8xf32>, tensor<f32>) {
      %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
          {top_k = 2, capacity = #moe.capacity<bounded 1.5, align = 4>, normalize}
          : (tensor<64x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>,
             tensor<4x16x8xf32>, tensor<4x8x16xf32>) -> (tensor<64x8xf32>, tensor<f32>)
      return %out, %aux : tensor<64x8xf32>, tensor<f32>
    })mlir";
  OwningOpRef<ModuleOp> parsed = parseSourceString<ModuleOp>(text, &context);
  ASSERT_TRUE(parsed);
  LayerOp layer;
  parsed->walk([&](LayerOp op) { layer = op; });
  ASSERT_TRUE(layer);
  EXPECT_EQ(layer.getKind(), ExpertKind::Gated);
  EXPECT_EQ(layer.getCapacity().getMode(), CapacityMode::Bounded);
  EXPECT_EQ(layer.getCapacity().getAlignment(), 4);
  EXPECT_EQ(layer.getNumExperts(), 4);
  std::string printed;
  llvm::raw_string_ostream os(printed);
  parsed->print(os);
  OwningOpRef<ModuleOp> reparsed =
      parseSourceString<ModuleOp>(printed, &context);
  ASSERT_TRUE(reparsed);
  std::string reprinted;
  llvm::raw_string_ostream os2(reprinted);
  reparsed->print(os2);
  EXPECT_EQ(printed, reprinted);
}

} // namespace
