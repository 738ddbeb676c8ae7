//===- MoeDialect.td - The moe dialect ---------------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the `moe` dialect: Mixture-of-Experts layers at tensor
// level, as a framework emits them and as the parallelizing passes see them.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOEDIALECT_TD
#define FLEX_DIALECT_MOE_IR_MOEDIALECT_TD

include "mlir/IR/OpBase.td"

def Moe_Dialect : Dialect {
  let name = "moe";
  let cppNamespace = "::flex::moe";
  let summary = "Mixture-of-Experts layers at tensor level";
  let description = [{
    The `moe` dialect models one Mixture-of-Experts layer: a router (`moe.gate`)
    chooses the top-k experts of each token and the slot it takes in each
    expert's capacity; `moe.dispatch` gathers tokens into per-expert buffers;
    `moe.expert` runs every expert's feed-forward network; `moe.combine`
    scatters the expert outputs back to the tokens, scaled by their gates.
    `moe.layer` carries a whole layer, as a framework emits it, and
    `--moe-expand-layer` splits it into those four steps.

    The semantics of every op are the contract of DESIGN.md section 3; each
    verifier error names the rule it enforces (for example `[gate-2]`).
  }];
  let useDefaultAttributePrinterParser = 1;
  let useDefaultTypePrinterParser = 1;
  let hasCanonicalizer = 0;
}

class Moe_Op<string mnemonic, list<Trait> traits = []>
    : Op<Moe_Dialect, mnemonic, traits>;

#endif // FLEX_DIALECT_MOE_IR_MOEDIALECT_TD
