//===- MoeRTOps.td - Operations of the moert dialect -------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the plan structure (plan, variant, argument, alloc) and
// the steps of the `moert` dialect, one op per step of docs/PlanFormat.md.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_IR_MOERTOPS_TD
#define FLEX_DIALECT_MOERT_IR_MOERTOPS_TD

include "flex/Dialect/MoeRT/IR/MoeRTAttrs.td"
include "mlir/IR/EnumAttr.td"
include "mlir/IR/SymbolInterfaces.td"
include "mlir/IR/RegionKindInterface.td"

//===----------------------------------------------------------------------===//
// Plan structure
//===----------------------------------------------------------------------===//

def MoeRT_PlanOp : MoeRT_Op<"plan", [Symbol, SymbolTable, SingleBlock,
    NoTerminator, IsolatedFromAbove, NoRegionArguments]> {
  let summary = "one MoE layer lowered for the runtime";
  let description = [{
    Holds the layer's configuration (`layer`, a `#moert.layer` with every
    field of `flex::LayerConfig`), its arguments and workspace buffers, and
    its variants. `workspace_bytes` is set by `--moert-plan-memory`.

    ```mlir
    moert.plan @c1 attributes {layer = #moert.layer<tokens = 16384, ...>,
                               training} {
      %x = moert.argument "x" input : memref<16384x4096xbf16>
      %logits = moert.alloc "logits" : memref<16384x8xf32>
      moert.variant "single" forward {
        moert.router ins(x = %x : ..., wg = %wg : ...) outs(logits = %logits : ...)
        ...
      } backward {
        ...
      }
    }
    ```
  }];
  let arguments = (ins SymbolNameAttr:$sym_name, MoeRT_LayerAttr:$layer,
                       UnitAttr:$training,
                       DefaultValuedAttr<I64Attr, "1">:$world_size,
                       OptionalAttr<I64Attr>:$workspace_bytes,
                       DefaultValuedAttr<I64Attr, "256">:$workspace_alignment);
  let regions = (region SizedRegion<1>:$body);
  let assemblyFormat = "$sym_name attr-dict-with-keyword $body";
  let hasVerifier = 1;
}

def MoeRT_VariantOp : MoeRT_Op<"variant", [HasParent<"PlanOp">, SingleBlock, NoTerminator,
    NoRegionArguments]> {
  let summary = "one way to run the plan's layer: forward and backward steps";
  let description = [{
    `forward` and `backward` hold steps in the order the runtime runs them.
    A plan for inference leaves `backward` empty. `--moert-plan-memory` sets
    `workspace_bytes`: the end of the last workspace buffer the variant's
    steps use, so the runtime can run it on a workspace of that size.
  }];
  let arguments = (ins StrAttr:$name,
                   OptionalAttr<I64Attr>:$workspace_bytes);
  let regions = (region SizedRegion<1>:$forward, SizedRegion<1>:$backward);
  let assemblyFormat = [{
    $name (`workspace_bytes` `=` $workspace_bytes^)? attr-dict-with-keyword
    `forward` $forward `backward` $backward
  }];
}

def MoeRT_ArgumentOp : MoeRT_Op<"argument", [HasParent<"PlanOp">]> {
  let summary = "a buffer the caller binds by name";
  let description = [{
    Names are fixed by docs/PlanFormat.md (`x`, `wg`, `w1`, `out`, `grad_x`,
    ...); the role says whether the runtime reads or writes it, in forward or
    in backward. The runtime never writes an `input`.
  }];
  let arguments = (ins StrAttr:$name, MoeRT_ArgumentRoleAttr:$role);
  let results = (outs AnyStaticShapeMemRef:$buffer);
  let assemblyFormat = "$name `` $role attr-dict `:` type($buffer)";
}

def MoeRT_AllocOp : MoeRT_Op<"alloc", [HasParent<"PlanOp">]> {
  let summary = "a workspace buffer";
  let description = [{
    A buffer in the plan's workspace block, at byte `offset` once
    `--moert-plan-memory` has placed it. Shapes are static upper bounds: the
    valid rows of expert buffers are known only after the gate.
  }];
  let arguments = (ins StrAttr:$name, OptionalAttr<I64Attr>:$offset);
  let results = (outs AnyStaticShapeMemRef:$buffer);
  let assemblyFormat = "$name attr-dict `:` type($buffer)";
}

//===----------------------------------------------------------------------===//
// Steps
//===----------------------------------------------------------------------===//

def MoeRT_StepOpInterface : OpInterface<"StepOpInterface"> {
  let cppNamespace = "::flex::moert";
  let description = [{
    A step of a variant: its operands named by role, as in the plan file.
  }];
  let methods = [
    InterfaceMethod<"The step's operands with their roles, inputs first.",
      "::llvm::SmallVector<::flex::moert::StepOperand>", "getStepOperands",
      (ins), [{}], [{
        return ::flex::moert::detail::collectStepOperands(
            ::llvm::cast<ConcreteOp>($_op));
      }]>,
    InterfaceMethod<"The op's name in the plan file.", "::llvm::StringRef",
      "getStepName", (ins), [{}], [{ return ConcreteOp::getOperationName().drop_front(6); }]>,
  ];
}

// A step whose operands are the memrefs of `inRoles` then `outRoles`, in that
// order. A role ending in `?` is optional. The roles give the custom syntax
// `ins(role = %v : type, ...) outs(...)` and the plan file's role names.
class MoeRT_StepOp<string mnemonic, list<string> inRoles,
                   list<string> outRoles, list<Trait> traits = []>
    : MoeRT_Op<mnemonic, !listconcat(traits,
          [DeclareOpInterfaceMethods<MoeRT_StepOpInterface>])> {
  list<string> allRoles = !listconcat(inRoles, outRoles);
  let extraClassDeclaration = [{
    static constexpr ::llvm::StringLiteral kRoles[] = {}] #
      !interleave(!foreach(role, allRoles, "\"" # role # "\""), ", ") # [{};
    static constexpr unsigned kNumInputRoles = }] # !size(inRoles) # [{;
  }];
  let hasCustomAssemblyFormat = 1;
  let hasVerifier = 1;
  let extraClassDefinition = [{
    ::mlir::ParseResult $cppClass::parse(::mlir::OpAsmParser &parser,
                                         ::mlir::OperationState &result) {
      return ::flex::moert::detail::parseStepOp<$cppClass>(parser, result);
    }
    void $cppClass::print(::mlir::OpAsmPrinter &printer) {
      ::flex::moert::detail::printStepOp(*this, printer);
    }
  }];
}

defvar Buf = AnyStaticShapeMemRef;
defvar OptBuf = Optional<AnyStaticShapeMemRef>;

def MoeRT_RouterOp : MoeRT_StepOp<"router", ["x", "wg"], ["logits"]> {
  let summary = "logits = x @ wg with fp32 accumulation ([gate-1])";
  let arguments = (ins Buf:$x, Buf:$wg, Buf:$logits);
}

def MoeRT_GateOp : MoeRT_StepOp<"gate", ["logits"],
    ["scores", "indices", "locations", "gates", "capacity", "expert_offsets",
     "expert_rows", "l_aux"]> {
  let summary = "softmax, top-k, locations, capacity and aux loss";
  let description = [{
    [gate-1..3], [loc-1], [cap-1], [loss-1] of DESIGN.md; the routing buffers
    it writes are described in docs/PlanFormat.md.
  }];
  let arguments = (ins Buf:$logits, Buf:$scores, Buf:$indices, Buf:$locations,
      Buf:$gates, Buf:$capacity_out, Buf:$expert_offsets, Buf:$expert_rows,
      Buf:$l_aux, I64Attr:$top_k, Moe_CapacityAttr:$capacity,
      UnitAttr:$normalize, UnitAttr:$batch_prioritized,
      DefaultValuedAttr<F64Attr, "0.0">:$noise,
      DefaultValuedAttr<I64Attr, "0">:$seed, MoeRT_LayoutAttr:$layout);
}

def MoeRT_DispatchOp : MoeRT_StepOp<"dispatch",
    ["x", "indices", "locations", "capacity", "expert_offsets"], ["dispatched"]> {
  let summary = "copy each kept slot's token to its row ([dispatch-1])";
  let arguments = (ins Buf:$x, Buf:$indices, Buf:$locations, Buf:$capacity,
                       Buf:$expert_offsets, Buf:$dispatched);
}

def MoeRT_DispatchRowsOp : MoeRT_StepOp<"dispatch_rows",
    ["indices", "locations", "capacity", "expert_offsets"], ["row_tokens"]> {
  let summary = "the token of each kept dispatch row, for gather-fused GEMMs";
  let description = [{
    `row_tokens[expert_offsets[indices[t, j]] + locations[t, j]] = t` for
    every kept slot (t, j) (`locations[t, j] < capacity`): the rows
    `dispatch` would write, without copying them. The grouped GEMMs given
    `row_tokens` then load row r of their A operand from `x[row_tokens[r]]`
    (`--moert-fuse-dispatch`). `row_tokens` is [R], R the dispatch rows of
    the gate's layout.

    ```mlir
    moert.dispatch_rows ins(indices = %i : memref<64x2xi32>, ...)
        outs(row_tokens = %rt : memref<128xi32>)
    ```
  }];
  let arguments = (ins Buf:$indices, Buf:$locations, Buf:$capacity,
                       Buf:$expert_offsets, Buf:$row_tokens);
}

def MoeRT_GroupedGemmOp : MoeRT_StepOp<"grouped_gemm",
    ["a", "b", "bias?", "expert_offsets", "expert_rows", "row_tokens?"],
    ["c", "pre?"], [AttrSizedOperandSegments]> {
  let summary = "per expert: c = epilogue(a @ b[e] + bias_scale * bias[e])";
  let description = [{
    Over the valid rows of each expert. `trans_b` reads b as [E, N, K];
    `accumulate` adds to c; `pre`, when given, receives the value before the
    epilogue (kept for the backward of the activation). `bias_scale` (> 0,
    default 1) scales the bias: 1 / s in fc2 of experts sharded over s
    ranks, whose s partial outputs then add b2 once. With `row_tokens` ([R]
    i32, from `dispatch_rows`), `a` is the layer's tokens [T, K] and row r of
    the product reads `a[row_tokens[r]]`: the dispatch gathered into the
    GEMM's A load.
  }];
  let arguments = (ins Buf:$a, Buf:$b, OptBuf:$bias, Buf:$expert_offsets,
      Buf:$expert_rows, OptBuf:$row_tokens, Buf:$c, OptBuf:$pre,
      UnitAttr:$trans_b,
      UnitAttr:$accumulate, OptionalAttr<Moe_ActivationAttr>:$epilogue,
      OptionalAttr<F64Attr>:$bias_scale);
}

def MoeRT_GluOp : MoeRT_StepOp<"glu",
    ["gate_in", "up_in", "expert_offsets", "expert_rows"], ["c"]> {
  let summary = "c = silu(gate_in) * up_in (SwiGLU)";
  let arguments = (ins Buf:$gate_in, Buf:$up_in, Buf:$expert_offsets,
                       Buf:$expert_rows, Buf:$c);
}

def MoeRT_GroupedGemmGluOp : MoeRT_StepOp<"grouped_gemm_glu",
    ["a", "b", "b_up", "expert_offsets", "expert_rows", "row_tokens?"],
    ["c", "gate_in?", "up_in?"], [AttrSizedOperandSegments]> {
  let summary = "per expert: c = silu(a @ b[e]) * (a @ b_up[e]) (SwiGLU)";
  let description = [{
    The first layer of a gated (SwiGLU) expert as one step, over the valid
    rows of each expert: gate = a @ b[e] and up = a @ b_up[e] (b and b_up
    [G, K, N], never transposed), each rounded to c's element type, then
    c = silu(gate) * up as `moert.glu` computes it. `gate_in` and `up_in`,
    given both or neither, receive the rounded products (a training plan's
    `glu_backward` reads them). Bit for bit
    `grouped_gemm(a, b) -> gate_in; grouped_gemm(a, b_up) -> up_in;
    glu(gate_in, up_in) -> c` on the same GEMM engine
    (`--moert-fuse-glu`). With `row_tokens` ([R] i32, from
    `dispatch_rows`), `a` is the layer's tokens [T, K] and row r reads
    `a[row_tokens[r]]`, as in `grouped_gemm`.

    ```mlir
    moert.grouped_gemm_glu ins(a = %d : memref<128x16xbf16>,
        b = %w1 : memref<4x16x32xbf16>, b_up = %w3 : memref<4x16x32xbf16>,
        expert_offsets = %o : memref<5xi32>, expert_rows = %r : memref<4xi32>)
        outs(c = %h : memref<128x32xbf16>)
    ```
  }];
  let arguments = (ins Buf:$a, Buf:$b, Buf:$b_up, Buf:$expert_offsets,
      Buf:$expert_rows, OptBuf:$row_tokens, Buf:$c, OptBuf:$gate_in,
      OptBuf:$up_in);
}

def MoeRT_CombineOp : MoeRT_StepOp<"combine",
    ["expert_out", "indices", "locations", "gates", "capacity",
     "expert_offsets"], ["out"]> {
  let summary = "out[t] = sum of kept gates * expert rows ([combine-1])";
  let arguments = (ins Buf:$expert_out, Buf:$indices, Buf:$locations,
                       Buf:$gates, Buf:$capacity, Buf:$expert_offsets,
                       Buf:$out);
}

def MoeRT_GroupedGemmCombineOp : MoeRT_StepOp<"grouped_gemm_combine",
    ["a", "b", "bias?", "expert_offsets", "expert_rows", "row_tokens?",
     "indices", "locations", "gates", "capacity"], ["c", "out"],
    [AttrSizedOperandSegments]> {
  let summary = "per expert: c = epilogue(a @ b[e] + bias_scale * bias[e]), "
                "then out = combine(c) (fc2 and the combine as one step)";
  let description = [{
    An expert's second layer and the combine as one step, for inference:
    `c` is what `moert.grouped_gemm` computes from the same operands and
    attributes (no `pre`, no `accumulate`), and `out[t]` the sum of t's kept
    gates times its rows of `c`, as `moert.combine` computes it from the
    routing (`indices`, `locations`, `gates`, `capacity`, and the experts'
    `expert_offsets`). Bit for bit the two steps on the same GEMM engine
    (`--moert-fuse-combine`). `row_tokens` ([R] i32, `dispatch_rows`'), when
    given, is the token of each row: a kernel sums a token's rows in its
    store once the last of them is written. Here it does not gather `a`.
    Every float operand has one element type; `c` and `out` are none of the
    operands it reads.

    ```mlir
    moert.grouped_gemm_combine ins(a = %h : memref<128x32xbf16>,
        b = %w2 : memref<4x32x16xbf16>, expert_offsets = %o : memref<5xi32>,
        expert_rows = %r : memref<4xi32>, indices = %i : memref<64x2xi32>,
        locations = %l : memref<64x2xi32>, gates = %g : memref<64x2xf32>,
        capacity = %cap : memref<1xi32>)
        outs(c = %eo : memref<128x16xbf16>, out = %out : memref<64x16xbf16>)
    ```
  }];
  let arguments = (ins Buf:$a, Buf:$b, OptBuf:$bias, Buf:$expert_offsets,
      Buf:$expert_rows, OptBuf:$row_tokens, Buf:$indices, Buf:$locations,
      Buf:$gates, Buf:$capacity, Buf:$c, Buf:$out, UnitAttr:$trans_b,
      OptionalAttr<Moe_ActivationAttr>:$epilogue,
      OptionalAttr<F64Attr>:$bias_scale);
}

def MoeRT_CombineBackwardOp : MoeRT_StepOp<"combine_backward",
    ["grad_out", "expert_out", "indices", "locations", "gates", "capacity",
     "expert_offsets"], ["grad_expert_out", "grad_gates"]> {
  let summary = "gradients of combine for the expert rows and the gates";
  let arguments = (ins Buf:$grad_out, Buf:$expert_out, Buf:$indices,
                       Buf:$locations, Buf:$gates, Buf:$capacity,
                       Buf:$expert_offsets, Buf:$grad_expert_out,
                       Buf:$grad_gates);
}

def MoeRT_GroupedGemmWgradOp : MoeRT_StepOp<"grouped_gemm_wgrad",
    ["a", "grad_c", "expert_offsets", "expert_rows", "row_tokens?"],
    ["grad_b", "grad_bias?"], [AttrSizedOperandSegments]> {
  let summary = "per expert: grad_b[e] = a^T grad_c, grad_bias[e] = colsum";
  let description = [{
    With `accumulate`, the sums are added to grad_b and grad_bias (the
    pipelined backward sums the chunks of each expert). With `row_tokens`
    ([R] i32), `a` is the layer's tokens [T, K] and row r of a_e is
    `a[row_tokens[r]]`, as in `grouped_gemm`.
  }];
  let arguments = (ins Buf:$a, Buf:$grad_c, Buf:$expert_offsets,
                       Buf:$expert_rows, OptBuf:$row_tokens, Buf:$grad_b,
                       OptBuf:$grad_bias, UnitAttr:$accumulate);
}

def MoeRT_GroupedGemmActivationBackwardOp
    : MoeRT_StepOp<"grouped_gemm_activation_backward",
                   ["a", "b", "pre", "expert_offsets", "expert_rows"], ["c"]> {
  let summary = "per expert: c = (a @ b[e]) * act'(pre) (a GEMM and "
                "activation_backward as one step)";
  let description = [{
    The input gradient of an expert's second layer and the backward of its
    activation as one step, over the valid rows of each expert: the product
    `a @ b[e]` (`b[e]^T` with `trans_b`) rounded to c's element type, times
    the activation's derivative at `pre` (the forward's value before the
    activation), as `moert.activation_backward` computes it. Bit for bit
    `grouped_gemm(a, b) -> grad; activation_backward(pre, grad) -> c` on the
    same GEMM engine (`--moert-fuse-activation-backward`). Every float
    operand has one element type; `c` is none of the operands it reads.

    ```mlir
    moert.grouped_gemm_activation_backward ins(a = %g : memref<128x16xbf16>,
        b = %w2 : memref<4x32x16xbf16>, pre = %h : memref<128x32xbf16>,
        expert_offsets = %o : memref<5xi32>, expert_rows = %r : memref<4xi32>)
        outs(c = %gh : memref<128x32xbf16>) {activation = #moe.activation<relu>,
        trans_b}
    ```
  }];
  let arguments = (ins Buf:$a, Buf:$b, Buf:$pre, Buf:$expert_offsets,
      Buf:$expert_rows, Buf:$c, UnitAttr:$trans_b,
      Moe_ActivationAttr:$activation);
}

def MoeRT_GroupedGemmGluBackwardOp
    : MoeRT_StepOp<"grouped_gemm_glu_backward",
                   ["a", "b", "gate_in", "up_in", "expert_offsets",
                    "expert_rows"], ["grad_gate_in", "grad_up_in"]> {
  let summary = "per expert: the gradients of glu at a @ b[e] (a GEMM and "
                "glu_backward as one step)";
  let description = [{
    The input gradient of a gated (SwiGLU) expert's second layer and the
    backward of its glu as one step, over the valid rows of each expert:
    with d the product `a @ b[e]` (`b[e]^T` with `trans_b`) rounded to the
    element type, `grad_gate_in = d * up_in * silu'(gate_in)` and
    `grad_up_in = d * silu(gate_in)`, as `moert.glu_backward` computes them
    from the forward's `gate_in` and `up_in`. Bit for bit
    `grouped_gemm(a, b) -> grad; glu_backward(gate_in, up_in, grad)` on the
    same GEMM engine (`--moert-fuse-activation-backward`). Every float
    operand has one element type; the outputs are none of the inputs and
    not one another.

    ```mlir
    moert.grouped_gemm_glu_backward ins(a = %g : memref<128x16xbf16>,
        b = %w2 : memref<4x32x16xbf16>, gate_in = %gate : memref<128x32xbf16>,
        up_in = %up : memref<128x32xbf16>, expert_offsets = %o : memref<5xi32>,
        expert_rows = %r : memref<4xi32>)
        outs(grad_gate_in = %gg : memref<128x32xbf16>,
             grad_up_in = %gu : memref<128x32xbf16>) {trans_b}
    ```
  }];
  let arguments = (ins Buf:$a, Buf:$b, Buf:$gate_in, Buf:$up_in,
      Buf:$expert_offsets, Buf:$expert_rows, Buf:$grad_gate_in,
      Buf:$grad_up_in, UnitAttr:$trans_b);
}

def MoeRT_ActivationBackwardOp : MoeRT_StepOp<"activation_backward",
    ["pre", "grad", "expert_offsets", "expert_rows"], ["grad_pre"]> {
  let summary = "grad_pre = grad * act'(pre)";
  let arguments = (ins Buf:$pre, Buf:$grad, Buf:$expert_offsets,
                       Buf:$expert_rows, Buf:$grad_pre,
                       Moe_ActivationAttr:$activation);
}

def MoeRT_GluBackwardOp : MoeRT_StepOp<"glu_backward",
    ["gate_in", "up_in", "grad", "expert_offsets", "expert_rows"],
    ["grad_gate_in", "grad_up_in"]> {
  let summary = "gradients of glu";
  let arguments = (ins Buf:$gate_in, Buf:$up_in, Buf:$grad,
                       Buf:$expert_offsets, Buf:$expert_rows,
                       Buf:$grad_gate_in, Buf:$grad_up_in);
}

def MoeRT_DispatchBackwardOp : MoeRT_StepOp<"dispatch_backward",
    ["grad_dispatched", "indices", "locations", "capacity", "expert_offsets"],
    ["grad_x"]> {
  let summary = "grad_x[t] = sum of the kept rows of token t (overwrites)";
  let arguments = (ins Buf:$grad_dispatched, Buf:$indices, Buf:$locations,
                       Buf:$capacity, Buf:$expert_offsets, Buf:$grad_x);
}

def MoeRT_GateBackwardOp : MoeRT_StepOp<"gate_backward",
    ["grad_gates", "grad_l_aux", "scores", "indices"], ["grad_logits"]> {
  let summary = "gradient of the logits through gates and aux loss";
  let arguments = (ins Buf:$grad_gates, Buf:$grad_l_aux, Buf:$scores,
                       Buf:$indices, Buf:$grad_logits, I64Attr:$top_k,
                       UnitAttr:$normalize);
}

def MoeRT_RouterBackwardOp : MoeRT_StepOp<"router_backward",
    ["x", "wg", "grad_logits"], ["grad_x", "grad_wg"]> {
  let summary = "grad_x += grad_logits @ wg^T; grad_wg = x^T @ grad_logits";
  let arguments = (ins Buf:$x, Buf:$wg, Buf:$grad_logits, Buf:$grad_x,
                       Buf:$grad_wg);
}

//===----------------------------------------------------------------------===//
// Collective steps (docs/PlanFormat.md, "Many ranks")
//===----------------------------------------------------------------------===//

def MoeRT_SyncCapacityOp : MoeRT_StepOp<"sync_capacity", [],
    ["capacity", "expert_offsets"]> {
  let summary = "agree on the capacity over ranks: the largest C";
  let description = [{
    Reads and rewrites `capacity` (the max over ranks) and the padded
    `expert_offsets` (`e * C`), so every rank exchanges blocks of one C.
  }];
  let arguments = (ins Buf:$capacity, Buf:$expert_offsets);
}

def MoeRT_AllToAllOp : MoeRT_StepOp<"all_to_all", ["input", "capacity"],
    ["output"]> {
  let summary = "exchange one capacity chunk of expert rows between ranks";
  let description = [{
    `dispatch`: `input` viewed as `[W, L, C, d]` -> chunk q of `output`
    viewed as `[D, L, W, C/D, d]`; `combine`: the inverse. The exact index
    mapping is in docs/PlanFormat.md. `ranks_per_node` > 0 selects the
    hierarchical (2DH) algorithm; the result is the same. `group_size` > 0
    runs it among groups of that many ranks `group_stride` apart (W is the
    group's size then).
  }];
  let arguments = (ins Buf:$input, Buf:$capacity, Buf:$output,
                       MoeRT_DirectionAttr:$direction,
                       DefaultValuedAttr<I64Attr, "1">:$chunks,
                       DefaultValuedAttr<I64Attr, "0">:$chunk,
                       DefaultValuedAttr<I64Attr, "0">:$ranks_per_node,
                       DefaultValuedAttr<I64Attr, "0">:$group_size,
                       DefaultValuedAttr<I64Attr, "1">:$group_stride);
}

def MoeRT_UniformSegmentsOp : MoeRT_StepOp<"uniform_segments", ["capacity"],
    ["expert_offsets", "expert_rows"]> {
  let summary = "the per-expert segments of an exchanged chunk";
  let description = [{
    `n = ranks * C / chunks` rows per group; `expert_offsets[g] =
    chunk * groups * n + g * n`, `expert_rows[g] = n`.
  }];
  let arguments = (ins Buf:$capacity, Buf:$expert_offsets, Buf:$expert_rows,
                       I64Attr:$groups, I64Attr:$ranks,
                       DefaultValuedAttr<I64Attr, "1">:$chunks,
                       DefaultValuedAttr<I64Attr, "0">:$chunk);
}

def MoeRT_ShardRoutingOp : MoeRT_StepOp<"shard_routing",
    ["indices", "locations", "gates", "capacity", "expert_rows"],
    ["indices", "locations", "gates", "expert_offsets", "expert_rows"]> {
  let summary = "the gate's routing over the shards of each expert";
  let description = [{
    Experts sharded over `shards` = s ranks (docs/PlanFormat.md): the
    gate's `[T, k]` routing over E experts in, `[T, k * s]` over E * s
    virtual experts out. Out choice `i * s + q` is virtual expert
    `indices[t, i] * s + q` with the location and gate of choice i;
    `expert_offsets[v] = v * C` (padded), `expert_rows[v]` = the rows of
    expert v / s. The same role names appear in `ins` and `outs`.
  }];
  let arguments = (ins Buf:$indices, Buf:$locations, Buf:$gates,
                       Buf:$capacity, Buf:$expert_rows, Buf:$shard_indices,
                       Buf:$shard_locations, Buf:$shard_gates,
                       Buf:$shard_offsets, Buf:$shard_rows, I64Attr:$shards);
}

def MoeRT_ShardRoutingBackwardOp : MoeRT_StepOp<"shard_routing_backward",
    ["grad_gates"], ["grad_gates"]> {
  let summary = "sum the gradients of each gate's s shard copies";
  let description = [{
    `grad_gates [T, k]` out, `[t, i] = sum over q of in [t, i * s + q]`.
  }];
  let arguments = (ins Buf:$shard_grad_gates, Buf:$grad_gates,
                       I64Attr:$shards);
}

def MoeRT_AllGatherOp : MoeRT_StepOp<"all_gather", ["input"], ["output"]> {
  let summary = "output [W*L, ...] = every rank's input [L, ...], rank-major";
  let description = [{
    `group_size` > 0: among groups of that many ranks `group_stride` apart
    (W is the group's size).
  }];
  let arguments = (ins Buf:$input, Buf:$output,
                       DefaultValuedAttr<I64Attr, "0">:$group_size,
                       DefaultValuedAttr<I64Attr, "1">:$group_stride);
}

def MoeRT_ReduceScatterOp : MoeRT_StepOp<"reduce_scatter", ["input"],
    ["output"]> {
  let summary = "output [L, ...] = sum over ranks of this rank's block";
  let description = [{
    `group_size` > 0: among groups of that many ranks `group_stride` apart.
  }];
  let arguments = (ins Buf:$input, Buf:$output,
                       DefaultValuedAttr<I64Attr, "0">:$group_size,
                       DefaultValuedAttr<I64Attr, "1">:$group_stride);
}

#endif // FLEX_DIALECT_MOERT_IR_MOERTOPS_TD
