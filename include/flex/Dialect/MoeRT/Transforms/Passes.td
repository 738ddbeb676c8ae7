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

def MoeRTFuseDispatchPass : Pass<"moert-fuse-dispatch", "::flex::moert::PlanOp"> {
  let summary = "Add a variant that gathers the dispatched rows in the "
                "grouped GEMMs' A loads";
  let description = [{
    On a plan for one rank (`world_size` 1), for each variant whose forward
    has one `moert.dispatch` writing a workspace buffer D where
    - the routing it reads is a gate's with `layout` ragged,
    - D is bf16 or f16 with K (its columns) a multiple of 8,
    - every other step of the variant (forward and backward) that touches D
      is a `moert.grouped_gemm` or `moert.grouped_gemm_wgrad` reading it as
      `a` (without `row_tokens`), with N (the columns of `c` / `grad_c`) a
      multiple of 8,
    adds after the plan's variants (whose indices so stay) a variant
    `<name>+gather` that computes the same:
    the dispatch becomes `moert.dispatch_rows` (same routing) writing
    `<name>+gather.row_tokens` (i32 [R], R the rows of D), and those GEMMs
    read `a` = the plan's argument `x` with `row_tokens`, so D is never
    written. The new variant has its own copy of every other workspace
    buffer the original uses (`<name>+gather.<buffer>`, the original's
    `<name>.` prefix replaced), which `--moert-plan-memory` overlaps with
    the original's since variants never run together. The original variant
    stays where it was and unchanged (a plan's first variant is its default); the
    runtime's cost model picks between the two per call. Variants that do not
    qualify are left alone, and so is a plan for several ranks (exchanges
    move whole dispatch blocks).

    Runs before `--moert-plan-memory`: a placed plan with a variant to fuse
    is an error.

    ```mlir
    // ragged variant "single": dispatch -> D; grouped_gemm ins(a = D, ...)
    moert.variant "single+gather" forward {
      moert.router ...
      moert.gate ... {layout = #moert<layout ragged>, ...}
      moert.dispatch_rows ins(indices = ..., locations = ..., capacity = ...,
          expert_offsets = ...) outs(row_tokens = %rt : memref<128xi32>)
      moert.grouped_gemm ins(a = %x : memref<64x16xbf16>, ...,
          row_tokens = %rt : memref<128xi32>) outs(c = ...)
      ...
    }
    ```

    With `report`, a remark on each variant says whether it was fused, and
    why not.
  }];
  let options = [
    Option<"report", "report", "bool", /*default=*/"false",
           "Emit a remark per variant: fused, or why not">,
  ];
}

def MoeRTFuseGluPass : Pass<"moert-fuse-glu", "::flex::moert::PlanOp"> {
  let summary = "Add a variant that computes each SwiGLU first layer as one "
                "grouped_gemm_glu step";
  let description = [{
    For each variant (the `+gather` copies of `--moert-fuse-dispatch`
    included) whose forward has a `moert.glu` G that qualifies, adds after
    the plan's variants (whose indices so stay) a variant `<name>+glu` in
    which every qualifying G and the two GEMMs writing its inputs are one
    `moert.grouped_gemm_glu`, placed where G was. G qualifies when
    - its `gate_in` and `up_in` are written last before it, in the same
      forward, as `c` of two `moert.grouped_gemm` steps G1 and G3 reading
      the same `a` (and the same `row_tokens`, or none), with G's
      `expert_offsets` and `expert_rows`, and computing plain products (no
      `bias`, `pre`, `epilogue`, `trans_b`, `accumulate` or `bias_scale`),
    - `gate_in`, `up_in` and `c` are one element type, bf16 or f16, with K
      (the columns of `a`) and N (of `c`) multiples of 8,
    - the fused step would read none of the buffers it writes, and no step
      between G1 / G3 and G touches `gate_in` / `up_in` or writes what G1
      and G3 read.
    Where another step (the backward's `glu_backward`) reads or writes
    `gate_in` or `up_in`, the fused step writes both (training); otherwise
    neither, and the copy has no buffer for them (inference). Every
    qualifying glu of a variant is fused (a pipelined variant has one per
    chunk), on any number of ranks: the step is per expert, local to a
    rank. The new variant has its own copy of every workspace buffer it
    uses (`<name>+glu.<buffer>`, the original's `<name>.` prefix replaced),
    which `--moert-plan-memory` overlaps with the original's since variants
    never run together. The original variant stays where it was and
    unchanged; the runtime's cost model picks between the two per call.

    Runs before `--moert-plan-memory`: a placed plan with a variant to fuse
    is an error.

    ```mlir
    // "single": grouped_gemm (a, w1) -> gate; grouped_gemm (a, w3) -> up;
    //           glu (gate, up) -> h
    moert.variant "single+glu" forward {
      ...
      moert.grouped_gemm_glu ins(a = %d : memref<64x8xbf16>,
          b = %w1 : memref<4x8x16xbf16>, b_up = %w3 : memref<4x8x16xbf16>,
          expert_offsets = ..., expert_rows = ...)
          outs(c = %h : memref<64x16xbf16>)
      ...
    }
    ```

    With `report`, a remark on each variant says whether it was fused, and
    why not (and names each glu left alone in a variant that was fused).
  }];
  let options = [
    Option<"report", "report", "bool", /*default=*/"false",
           "Emit a remark per variant: fused, or why not">,
  ];
}

def MoeRTFuseCombinePass
    : Pass<"moert-fuse-combine", "::flex::moert::PlanOp"> {
  let summary = "Add a variant that computes each expert's second layer "
                "and the combine as one step";
  let description = [{
    For each variant (the other fusions' copies included) whose forward
    has one `moert.combine` C that qualifies, adds after the plan's variants
    (whose indices so stay) a variant `<name>+combine` in which C and the
    GEMM writing its `expert_out` are one `moert.grouped_gemm_combine`,
    placed where C was. C qualifies when
    - its `expert_out` is written once in the forward, before it, as `c` of
      a `moert.grouped_gemm` G (no `pre`, `accumulate` or `row_tokens`;
      `bias`, `epilogue`, `bias_scale` are kept) over the experts of C's
      routing (G's `expert_offsets` are C's): one GEMM wrote every row C
      sums, so a pipelined variant's chunks, or a multi-rank variant whose
      rows arrive by `all_to_all`, do not qualify,
    - G's `a`, `b`, `expert_out` and `out` are one element type, bf16 or
      f16, with K (the columns of `a`) and d multiples of 8,
    - no step between G and C reads or writes `expert_out` or `out`, or
      writes what G reads.
    The fused step still writes `expert_out` (a training plan's
    `combine_backward` reads it). Where the variant has a `dispatch_rows`
    over C's routing before G, its `row_tokens` is passed on: the runtime's
    kernel sums each token's rows in its store once the last is written,
    and needs no map of its own. The new variant has its own copy of every
    workspace buffer it uses (`<name>+combine.<buffer>`). The original
    variant stays where it was and unchanged: the fused step pays where a
    kernel sums in its store, so the runtime's cost model picks between the
    two per call.

    Runs before `--moert-plan-memory`: a placed plan with a variant to fuse
    is an error.

    ```mlir
    // "single+gather": grouped_gemm (hidden, w2) -> expert_out;
    //                  combine (expert_out, routing) -> out
    moert.variant "single+gather+combine" forward {
      ...
      moert.grouped_gemm_combine ins(a = %h : memref<64x16xbf16>,
          b = %w2 : memref<4x16x8xbf16>, expert_offsets = ...,
          expert_rows = ..., row_tokens = %rt : memref<64xi32>,
          indices = ..., locations = ..., gates = ..., capacity = ...)
          outs(c = %eo : memref<64x8xbf16>, out = %out : memref<32x8xbf16>)
    } backward { ... }
    ```

    With `report`, a remark on each variant says whether it was fused, and
    why not.
  }];
  let options = [
    Option<"report", "report", "bool", /*default=*/"false",
           "Emit a remark per variant: fused, or why not">,
  ];
}

def MoeRTFuseActivationBackwardPass
    : Pass<"moert-fuse-activation-backward", "::flex::moert::PlanOp"> {
  let summary = "Add a variant that computes each expert's input gradient "
                "and activation backward as one step";
  let description = [{
    For each variant (the `+gather` copies of `--moert-fuse-dispatch`
    included) whose backward has a `moert.activation_backward` A that
    qualifies, adds after the plan's variants (whose indices so stay) a
    variant `<name>+act_backward` in which every qualifying A and the GEMM
    writing its `grad` are one `moert.grouped_gemm_activation_backward`,
    placed where A was. A qualifies when
    - its `grad` is written last before it, in the same backward, as `c` of
      a `moert.grouped_gemm` G with A's `expert_offsets` and `expert_rows`,
      computing a plain product (no `bias`, `pre`, `epilogue`, `accumulate`
      or `row_tokens`; `trans_b` is kept),
    - `pre`, `grad`, `grad_pre` and G's `a` are one element type, bf16 or
      f16, with K (the columns of `a`) and N (of `grad_pre`) multiples of 8,
    - every other step of the variant that reads or writes `grad` is fused
      too (the fused step does not write it; the chunks of a pipelined
      variant share it, each in its own rows), `grad_pre` is none of the
      buffers the fused step reads, and no step between G and A writes
      what they read.
    Every qualifying pair of a variant is fused (a pipelined variant has one
    per chunk), on any number of ranks. The new variant has its own copy of
    every workspace buffer it uses (`<name>+act_backward.<buffer>`), and
    none for `grad`. The original variant stays where it was and unchanged:
    the fused step pays only where a kernel applies the derivative in its
    store (the wgmma kernel on Hopper), so the runtime's cost model picks
    between the two per call.

    Runs before `--moert-plan-memory`: a placed plan with a variant to fuse
    is an error.

    ```mlir
    // "single": grouped_gemm (grad_out, w2, trans_b) -> grad_hidden;
    //           activation_backward (hidden, grad_hidden) -> grad_hidden_pre
    moert.variant "single+act_backward" forward { ... } backward {
      ...
      moert.grouped_gemm_activation_backward ins(a = %g : memref<64x8xbf16>,
          b = %w2 : memref<4x16x8xbf16>, pre = %h : memref<64x16xbf16>,
          expert_offsets = ..., expert_rows = ...)
          outs(c = %ghp : memref<64x16xbf16>)
          {activation = #moe.activation<relu>, trans_b}
      ...
    }
    ```

    With `report`, a remark on each variant says whether it was fused, and
    why not (and names each activation_backward left alone in a variant
    that was fused).
  }];
  let options = [
    Option<"report", "report", "bool", /*default=*/"false",
           "Emit a remark per variant: fused, or why not">,
  ];
}

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
