//===- Pipelines.cpp - Flex pass pipelines --------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the pass pipelines of Flex.
//
//===----------------------------------------------------------------------===//

#include "flex/Pipelines/Pipelines.h"

#include "flex/Conversion/Passes.h"
#include "flex/Dialect/Moe/Transforms/Passes.h"
#include "flex/Dialect/MoeRT/Transforms/Passes.h"

#include "mlir/Pass/PassRegistry.h"
#include "mlir/Transforms/Passes.h"

void flex::buildLowerToPlanPipeline(mlir::OpPassManager &pm,
                                    const LowerToPlanOptions &options) {
  pm.addPass(moe::createMoeExpandLayerPass());
  pm.addPass(mlir::createCanonicalizerPass());
  ConvertMoeToMoeRTPassOptions lowering;
  lowering.training = options.training;
  lowering.layout = options.layout;
  lowering.layouts.assign(options.layouts.begin(), options.layouts.end());
  pm.addPass(createConvertMoeToMoeRTPass(lowering));
  // Before the memory plan: the fused variants' buffers are placed with
  // the others.
  if (options.fuseDispatch)
    pm.addNestedPass<moert::PlanOp>(moert::createMoeRTFuseDispatchPass());
  // After the dispatch fusion, so that its `+gather` variants get a `+glu`
  // copy too.
  if (options.fuseGlu)
    pm.addNestedPass<moert::PlanOp>(moert::createMoeRTFuseGluPass());
  // After those: a `+gather` variant's row_tokens serves the combine too.
  if (options.fuseCombine)
    pm.addNestedPass<moert::PlanOp>(moert::createMoeRTFuseCombinePass());
  // Last: every forward fusion's variants get a backward-fused copy too.
  if (options.fuseActivationBackward)
    pm.addNestedPass<moert::PlanOp>(
        moert::createMoeRTFuseActivationBackwardPass());
  pm.addNestedPass<moert::PlanOp>(moert::createMoeRTPlanMemoryPass());
}

void flex::registerPipelines() {
  mlir::PassPipelineRegistration<LowerToPlanOptions>(
      "moe-lower-to-plan",
      "Lower moe layers to placed moert plans, ready for moe-translate "
      "--moert-to-plan",
      buildLowerToPlanPipeline);
}
