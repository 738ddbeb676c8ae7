//===- Passes.td - Passes of the moe dialect ---------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the passes that transform `moe` IR.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_TRANSFORMS_PASSES_TD
#define FLEX_DIALECT_MOE_TRANSFORMS_PASSES_TD

include "mlir/Pass/PassBase.td"

def MoeExpandLayerPass : Pass<"moe-expand-layer"> {
  let summary = "Split moe.layer into gate, dispatch, expert and combine";
  let description = [{
    Rewrites each `moe.layer` into the four steps it is made of, with the
    same configuration:

    ```mlir
    %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
        {top_k = 2, capacity = #moe.capacity<fixed 1.0>} : ...
    ```

    becomes

    ```mlir
    %routing, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>}
        : ... -> !moe.routing<tokens = T, experts = E, top_k = 2, capacity = C>
    %d = moe.dispatch %x, %routing : ...
    %y = moe.expert ffn<relu> %d, %w1, %w2 : ...
    %out = moe.combine %y, %routing : ...
    ```

    C is computed from the capacity mode ([cap-1]) when it is static and is
    `?` otherwise.
  }];
  let dependentDialects = ["::flex::moe::MoeDialect"];
}

#endif // FLEX_DIALECT_MOE_TRANSFORMS_PASSES_TD
