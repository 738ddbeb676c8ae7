//===- moe-opt.cpp - The Flex optimizer driver ----------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements moe-opt: parse moe IR, run Flex passes, print the
// result. It registers only the dialects and passes Flex uses.
//
//===----------------------------------------------------------------------===//

#include "flex/InitAll.h"

#include "mlir/IR/DialectRegistry.h"
#include "mlir/Tools/mlir-opt/MlirOptMain.h"

int main(int argc, char **argv) {
  mlir::DialectRegistry registry;
  flex::registerAllDialects(registry);
  flex::registerAllPasses();
  return mlir::asMainReturnCode(
      mlir::MlirOptMain(argc, argv, "Flex MoE optimizer driver\n", registry));
}
