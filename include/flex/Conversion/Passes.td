//===- Passes.td - Conversion passes of Flex ---------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the passes that convert between Flex's dialects.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_CONVERSION_PASSES_TD
#define FLEX_CONVERSION_PASSES_TD

include "mlir/Pass/PassBase.td"

def ConvertMoeToMoeRTPass : Pass<"convert-moe-to-moert", "::mlir::ModuleOp"> {
  let summary = "Lower each function holding one MoE layer to a moert.plan";
  let description = [{
    Each `func.func` whose body is one expanded layer (`moe.gate`,
    `moe.dispatch`, `moe.expert`, `moe.combine`; run `--moe-expand-layer`
    first) becomes a `moert.plan` of the same name: its arguments named as
    in docs/PlanFormat.md (`x`, `wg`, `w1`, ..., `out`, `l_aux`), workspace
    buffers for the routing and the expert activations, and one variant
    whose forward (and, with `training`, backward) steps compute the layer.

    `layout` chooses how expert rows are laid out: `padded` (E * C rows, the
    layout of [dispatch-1]), `ragged` (the kept rows only, no padding),
    `aligned` (ragged with every expert's first row a multiple of 128, so
    a GPU runs the GEMMs as one batched call over 128-row blocks sized on
    the device: no host read, at most 127 rows more per expert), or `auto`:
    padded for a fixed capacity, ragged otherwise (dropless and bounded
    capacities would pad to T rows per expert).

    `layouts` keeps several layouts as variants of one plan, with one
    parameter layout, so the runtime can pick per call (`variant=auto`):
    `layouts=padded,ragged` makes a variant `padded` and a variant
    `ragged`. The variant `layout=auto` would give comes first, the plan's
    default; the others follow in the order listed. With functions made by
    `--moe-multiversion`, each of its variants is kept in every layout,
    named `<variant>.<layout>` (`r1d1.padded`, `r1d1.ragged`). Ragged
    and aligned variants need one rank: ranks exchange whole capacity
    blocks, so multi-rank plans are padded ([plan-3]). `layout` and `layouts` are
    exclusive.

    ```
    moe-opt layer.mlir --moe-lower-to-plan="training=true layouts=padded,ragged"
    ```
  }];
  let options = [
    Option<"training", "training", "bool", /*default=*/"false",
           "Also emit the backward steps and keep what they read">,
    Option<"layout", "layout", "std::string", /*default=*/"\"auto\"",
           "Expert row layout: auto, padded, ragged or aligned">,
    ListOption<"layouts", "layouts", "std::string",
               "Several layouts, one variant each: padded,ragged">,
  ];
  let dependentDialects = ["::flex::moert::MoeRTDialect"];
}

#endif // FLEX_CONVERSION_PASSES_TD
