//===- moe-translate.cpp - Translate Flex IR to plan files ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements moe-translate: `--moert-to-plan` writes the plan file
// (docs/PlanFormat.md) of a module holding one placed moert.plan.
//
//===----------------------------------------------------------------------===//

#include "flex/Target/Plan/PlanEmitter.h"

#include "mlir/Tools/mlir-translate/MlirTranslateMain.h"

int main(int argc, char **argv) {
  flex::registerPlanTranslation();
  return mlir::failed(
      mlir::mlirTranslateMain(argc, argv, "Flex plan translation\n"));
}
