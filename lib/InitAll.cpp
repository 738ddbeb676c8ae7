//===- InitAll.cpp - Register every Flex dialect and pass -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the one registration point of Flex. It registers only
// what Flex uses: pulling in every upstream dialect costs minutes per build.
//
//===----------------------------------------------------------------------===//

#include "flex/InitAll.h"

#include "flex/Conversion/Passes.h"
#include "flex/Dialect/Moe/IR/MoeDialect.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"
#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"
#include "flex/Dialect/MoeRT/Transforms/Passes.h"
#include "flex/Pipelines/Pipelines.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/DialectRegistry.h"
#include "mlir/Transforms/Passes.h"

void flex::registerAllDialects(mlir::DialectRegistry &registry) {
  registry
      .insert<mlir::func::FuncDialect, moe::MoeDialect, moert::MoeRTDialect>();
}

void flex::registerAllPasses() {
  moe::registerMoePasses();
  moert::registerMoeRTPasses();
  registerConversionPasses();
  registerPipelines();
  mlir::registerCanonicalizerPass();
  mlir::registerCSEPass();
}
