//===- Passes.td - Passes of the moert dialect -------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the passes that transform `moert` IR.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_TD
#define FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_TD

include "mlir/Pass/PassBase.td"

def MoeRTPlanMemoryPass : Pass<"moert-plan-memory", "::flex::moert::PlanOp"> {
  let summary = "Place workspace buffers in one block by liveness";
  let description = [{
    Gives every `moert.alloc` of a plan a byte `offset` in one workspace
    block and sets the plan's `workspace_bytes` to the peak. Two buffers
    share bytes only when no step between the first and the last use of one
    touches the other. Steps run in the order forward then backward of each
    variant; a buffer that backward reads from forward stays live until
    then. Offsets are multiples of the plan's `workspace_alignment`.

    With `report`, a remark gives the peak bytes and what a plan without
    reuse would need.
  }];
  let options = [
    Option<"report", "report", "bool", /*default=*/"false",
           "Emit a remark with the peak workspace bytes">,
  ];
}

#endif // FLEX_DIALECT_MOERT_TRANSFORMS_PASSES_TD
