//===- MoeTypes.td - Types of the moe dialect --------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the routing type: what the gate decided for every token.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOETYPES_TD
#define FLEX_DIALECT_MOE_IR_MOETYPES_TD

include "flex/Dialect/Moe/IR/MoeDialect.td"
include "mlir/IR/AttrTypeBase.td"

def Moe_RoutingType : TypeDef<Moe_Dialect, "Routing"> {
  let mnemonic = "routing";
  let summary = "the routing of T tokens to their top-k of E experts";
  let description = [{
    A routing value holds, for each token t and choice j < k, the expert
    `indices[t, j]`, the slot `locations[t, j]` in that expert ([loc-1]), the
    gate `gates[t, j]` ([gate-3]), and the capacity C of every expert
    ([cap-1]). C is static when the capacity mode fixes it before routing and
    `?` when it depends on the routing (dropless and bounded modes).

    ```mlir
    !moe.routing<tokens = 16384, experts = 8, top_k = 2, capacity = 4096>
    !moe.routing<tokens = 1000, experts = 64, top_k = 6, capacity = ?>
    ```
  }];
  let parameters = (ins "int64_t":$tokens, "int64_t":$experts,
                        "int64_t":$topK, "int64_t":$capacity);
  let hasCustomAssemblyFormat = 1;
  let genVerifyDecl = 1;
  let extraClassDeclaration = [{
    bool hasStaticCapacity() const {
      return !::mlir::ShapedType::isDynamic(getCapacity());
    }
  }];
}

#endif // FLEX_DIALECT_MOE_IR_MOETYPES_TD
