//===- MoeAttrs.td - Attributes of the moe dialect ---------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the enums and attributes of the `moe` dialect: how the
// expert capacity is chosen, the expert kind and its activation.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOEATTRS_TD
#define FLEX_DIALECT_MOE_IR_MOEATTRS_TD

include "flex/Dialect/Moe/IR/MoeDialect.td"
include "mlir/IR/AttrTypeBase.td"
include "mlir/IR/EnumAttr.td"

//===----------------------------------------------------------------------===//
// Enums
//===----------------------------------------------------------------------===//

def Moe_CapacityMode : I32EnumAttr<"CapacityMode",
    "how the per-expert capacity is chosen ([cap-1])", [
      I32EnumAttrCase<"Fixed", 0, "fixed">,
      I32EnumAttrCase<"Dropless", 1, "dropless">,
      I32EnumAttrCase<"Bounded", 2, "bounded">]> {
  let cppNamespace = "::flex::moe";
  let genSpecializedAttr = 0;
}

def Moe_ExpertKind : I32EnumAttr<"ExpertKind", "the expert network ([expert-1])", [
      I32EnumAttrCase<"FFN", 0, "ffn">,
      I32EnumAttrCase<"Gated", 1, "gated">]> {
  let cppNamespace = "::flex::moe";
  let genSpecializedAttr = 0;
}

def Moe_Activation : I32EnumAttr<"Activation", "activation of an FFN expert", [
      I32EnumAttrCase<"Relu", 0, "relu">,
      I32EnumAttrCase<"Gelu", 1, "gelu">,
      I32EnumAttrCase<"Silu", 2, "silu">]> {
  let cppNamespace = "::flex::moe";
  let genSpecializedAttr = 0;
}

def Moe_AllToAllDirection : I32EnumAttr<"AllToAllDirection",
    "which way an all-to-all moves expert rows", [
      I32EnumAttrCase<"Dispatch", 0, "dispatch">,
      I32EnumAttrCase<"Combine", 1, "combine">]> {
  let cppNamespace = "::flex::moe";
  let genSpecializedAttr = 0;
}

def Moe_AllToAllDirectionAttr
    : EnumAttr<Moe_Dialect, Moe_AllToAllDirection, "all_to_all_direction"> {
  let assemblyFormat = "$value";
}

def Moe_ExpertKindAttr : EnumAttr<Moe_Dialect, Moe_ExpertKind, "expert_kind"> {
  let assemblyFormat = "$value";
}
def Moe_ActivationAttr : EnumAttr<Moe_Dialect, Moe_Activation, "activation"> {
  let assemblyFormat = "$value";
}

//===----------------------------------------------------------------------===//
// CapacityAttr
//===----------------------------------------------------------------------===//

def Moe_CapacityAttr : AttrDef<Moe_Dialect, "Capacity"> {
  let mnemonic = "capacity";
  let summary = "how the per-expert capacity C is chosen ([cap-1])";
  let description = [{
    With `spe = ceil(T / E)` tokens per expert:

    * `#moe.capacity<fixed 1.25>`: `C = k * int(1.25 * spe)`; slots past C
      are dropped.
    * `#moe.capacity<dropless>`: C is the largest per-expert count; nothing is
      dropped.
    * `#moe.capacity<bounded 2.0>`: `C = min(largest count, k * int(2.0 * spe))`.

    `align = n` rounds C up to a multiple of n (pipelining and sharding need
    it): `#moe.capacity<fixed 1.0, align = 4>`.
  }];
  let parameters = (ins
    EnumParameter<Moe_CapacityMode>:$mode,
    APFloatParameter<"capacity factor (0 when dropless)">:$factor,
    DefaultValuedParameter<"int64_t", "1">:$alignment);
  let hasCustomAssemblyFormat = 1;
  let genVerifyDecl = 1;
  let builders = [
    AttrBuilder<(ins "CapacityMode":$mode, "double":$factor,
                     CArg<"int64_t", "1">:$alignment), [{
      return $_get($_ctxt, mode, ::llvm::APFloat(factor), alignment);
    }]>
  ];
  let skipDefaultBuilders = 0;
  let extraClassDeclaration = [{
    double getFactorValue() const { return getFactor().convertToDouble(); }
    /// C for T tokens, E experts and top-k when it is known before routing
    /// (fixed mode), std::nullopt otherwise. Fails on int64 overflow.
    std::optional<int64_t> getStaticCapacity(int64_t tokens, int64_t experts,
                                             int64_t topK) const;
    /// k * int(factor * ceil(T/E)) rounded up to the alignment: the fixed C
    /// and the bound of the bounded mode; std::nullopt if it overflows int64.
    std::optional<int64_t> getCapacityBound(int64_t tokens, int64_t experts,
                                            int64_t topK) const;
  }];
}

#endif // FLEX_DIALECT_MOE_IR_MOEATTRS_TD
