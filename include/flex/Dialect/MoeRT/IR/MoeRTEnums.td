//===- MoeRTEnums.td - Enums of the moert dialect ----------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the enums of the `moert` dialect. They live apart from
// the ops so that enum generation sees only moert's own (the ops also include
// moe's attributes).
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_IR_MOERTENUMS_TD
#define FLEX_DIALECT_MOERT_IR_MOERTENUMS_TD

include "flex/Dialect/MoeRT/IR/MoeRTDialect.td"
include "mlir/IR/EnumAttr.td"

//===----------------------------------------------------------------------===//
// Enums
//===----------------------------------------------------------------------===//

def MoeRT_ArgumentRole : I32EnumAttr<"ArgumentRole", "who writes an argument", [
    I32EnumAttrCase<"Input", 0, "input">,
    I32EnumAttrCase<"Output", 1, "output">,
    I32EnumAttrCase<"GradInput", 2, "grad_input">,
    I32EnumAttrCase<"GradOutput", 3, "grad_output">]> {
  let cppNamespace = "::flex::moert";
  let genSpecializedAttr = 0;
}
def MoeRT_ArgumentRoleAttr : EnumAttr<MoeRT_Dialect, MoeRT_ArgumentRole, "role"> {
  let assemblyFormat = "$value";
}

def MoeRT_Layout : I32EnumAttr<"Layout", "how experts' rows are laid out", [
    I32EnumAttrCase<"Padded", 0, "padded">,
    I32EnumAttrCase<"Ragged", 1, "ragged">,
    I32EnumAttrCase<"Aligned", 2, "aligned">]> {
  let cppNamespace = "::flex::moert";
  let genSpecializedAttr = 0;
}
def MoeRT_LayoutAttr : EnumAttr<MoeRT_Dialect, MoeRT_Layout, "layout"> {
  let assemblyFormat = "$value";
}

def MoeRT_Direction : I32EnumAttr<"Direction",
    "which way an all-to-all moves expert rows", [
    I32EnumAttrCase<"Dispatch", 0, "dispatch">,
    I32EnumAttrCase<"Combine", 1, "combine">]> {
  let cppNamespace = "::flex::moert";
  let genSpecializedAttr = 0;
}
def MoeRT_DirectionAttr : EnumAttr<MoeRT_Dialect, MoeRT_Direction, "direction"> {
  let assemblyFormat = "$value";
}

#endif // FLEX_DIALECT_MOERT_IR_MOERTENUMS_TD
