//===- MoeOps.td - Operations of the moe dialect -----------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the ops of the `moe` dialect. Rule tags in descriptions
// and diagnostics refer to the contract of DESIGN.md section 3.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOE_IR_MOEOPS_TD
#define FLEX_DIALECT_MOE_IR_MOEOPS_TD

include "flex/Dialect/Moe/IR/MoeAttrs.td"
include "flex/Dialect/Moe/IR/MoeDialect.td"
include "flex/Dialect/Moe/IR/MoeTypes.td"
include "mlir/Interfaces/SideEffectInterfaces.td"

//===----------------------------------------------------------------------===//
// Type constraints
//===----------------------------------------------------------------------===//

// [type-1]: tokens, weights and expert buffers are ranked tensors of f32, bf16
// or f16, of the rank their role has.
class Moe_TensorOfRank<int rank, string what>
    : RankedTensorOf<[F32, BF16, F16], [HasAnyRankOfPred<[rank]>],
                     "[type-1] " # what>;

def Moe_Matrix : Moe_TensorOfRank<2, "2-D tensor">;
def Moe_ExpertBatch : Moe_TensorOfRank<3, "3-D tensor">;

def Moe_AuxLossTensor : Type<
    And<[IsTensorTypePred, HasAnyRankOfPred<[0]>,
         SubstLeaves<"$_self", "::llvm::cast<::mlir::ShapedType>($_self).getElementType()",
                     F32.predicate>]>,
    "[type-1] 0-D tensor of f32", "::mlir::RankedTensorType">,
  BuildableType<"::mlir::RankedTensorType::get({}, $_builder.getF32Type())">;

//===----------------------------------------------------------------------===//
// GateOp
//===----------------------------------------------------------------------===//

def Moe_GateOp : Moe_Op<"gate", [Pure]> {
  let summary = "route each token to its top-k experts";
  let description = [{
    Computes `logits = input @ router_weight` with fp32 accumulation (the
    router runs in fp32 when `router_weight` is f32), adds training noise of
    standard deviation `noise` (seeded by `seed`) when it is not zero,
    `scores = softmax(logits)` over the experts ([gate-1]), the top-k experts
    of each token with ties to the lower index ([gate-2]), their gates,
    normalized over the k choices with `normalize` ([gate-3]), the slot of
    each choice in its expert ([loc-1]; tokens sorted by descending max score
    first with `batch_prioritized`), the capacity of `capacity` ([cap-1]), and
    the GShard auxiliary loss ([loss-1]).

    The routing type carries T, E, k and C; C is static only in the fixed
    capacity mode. With `ranks = W` > 1 the layer runs on W ranks and a
    capacity that depends on the routing is agreed over them (the largest
    count over experts and ranks, [cap-1]).

    ```mlir
    %routing, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>, normalize}
        : tensor<1024x512xbf16>, tensor<512x8xf32>
        -> !moe.routing<tokens = 1024, experts = 8, top_k = 2, capacity = 256>
    ```
  }];
  let arguments = (ins Moe_Matrix:$input, Moe_Matrix:$router_weight,
                       Moe_CapacityAttr:$capacity,
                       UnitAttr:$normalize, UnitAttr:$batch_prioritized,
                       DefaultValuedAttr<F64Attr, "0.0">:$noise,
                       DefaultValuedAttr<I64Attr, "0">:$seed,
                       DefaultValuedAttr<I64Attr, "1">:$ranks);
  let results = (outs Moe_RoutingType:$routing, Moe_AuxLossTensor:$aux_loss);
  let assemblyFormat = [{
    $input `,` $router_weight attr-dict `:` type($input) `,`
    type($router_weight) `->` qualified(type($routing))
  }];
  let hasVerifier = 1;
  let hasCanonicalizer = 1;
}

//===----------------------------------------------------------------------===//
// DispatchOp
//===----------------------------------------------------------------------===//

def Moe_DispatchOp : Moe_Op<"dispatch", [Pure]> {
  let summary = "gather tokens into per-expert capacity buffers";
  let description = [{
    `result[e, c, :] = input[t, :]` for each kept slot (t, j) whose expert is
    `e` and whose location is `c < C`; every other row is zero
    ([dispatch-1]).

    ```mlir
    %d = moe.dispatch %x, %routing
        : tensor<1024x512xbf16>, !moe.routing<tokens = 1024, experts = 8, top_k = 2, capacity = 256>
        -> tensor<8x256x512xbf16>
    ```
  }];
  let arguments = (ins Moe_Matrix:$input, Moe_RoutingType:$routing);
  let results = (outs Moe_ExpertBatch:$result);
  let assemblyFormat = [{
    $input `,` $routing attr-dict `:` type($input) `,` qualified(type($routing))
    `->` type($result)
  }];
  let hasVerifier = 1;
}

//===----------------------------------------------------------------------===//
// ExpertOp
//===----------------------------------------------------------------------===//

def Moe_ExpertOp : Moe_Op<"expert", [Pure, AttrSizedOperandSegments]> {
  let summary = "run every expert's feed-forward network on its buffer";
  let description = [{
    For every expert e of the batch ([expert-1]):

    * `ffn<act>`: `y = act(x W1 + b1) W2 + b2`, biases optional;
    * `gated`: `y = (silu(x W1) * (x W3)) W2` (SwiGLU), with `W3` given as
      `up(...)` and no biases.

    Shapes: input `[E, C, d]`, W1 and W3 `[E, d, h]`, W2 `[E, h, d]`,
    b1 `[E, h]`, b2 `[E, d]`; the result has the input's type.

    `hidden_shards = s` (> 1 only for experts sharded over ranks,
    `--moe-parallelize`): each expert of the batch is one of s shards of a
    whole expert, holding h of its s * h hidden units. The FFN is exact under
    that split (the activation is per hidden unit and fc2 sums over them), so
    the s shards' outputs sum to the whole expert's; fc2 adds `b2 / s` so
    that the bias is added once in that sum.

    ```mlir
    %y = moe.expert ffn<relu> %d, %w1, %w2 bias(%b1, %b2)
        : (tensor<8x256x512xbf16>, tensor<8x512x2048xbf16>, tensor<8x2048x512xbf16>,
           tensor<8x2048xbf16>, tensor<8x512xbf16>) -> tensor<8x256x512xbf16>
    %g = moe.expert gated %d, %w1, %w2 up(%w3)
        : (tensor<8x256x512xbf16>, tensor<8x512x2048xbf16>, tensor<8x2048x512xbf16>,
           tensor<8x512x2048xbf16>) -> tensor<8x256x512xbf16>
    ```
  }];
  let arguments = (ins Moe_ExpertBatch:$input, Moe_ExpertBatch:$fc1_weight,
                       Moe_ExpertBatch:$fc2_weight,
                       Optional<Moe_ExpertBatch>:$up_weight,
                       Optional<Moe_Matrix>:$fc1_bias,
                       Optional<Moe_Matrix>:$fc2_bias,
                       Moe_ExpertKindAttr:$kind,
                       OptionalAttr<Moe_ActivationAttr>:$activation,
                       DefaultValuedAttr<I64Attr, "1">:$hidden_shards);
  let results = (outs Moe_ExpertBatch:$result);
  let assemblyFormat = [{
    custom<ExpertKind>($kind, $activation) $input `,` $fc1_weight `,` $fc2_weight
    (`up` `(` $up_weight^ `)`)?
    (`bias` `(` $fc1_bias^ `,` $fc2_bias `)`)?
    attr-dict `:` functional-type(operands, results)
  }];
  let hasVerifier = 1;
  let extraClassDeclaration = [{
    int64_t getHiddenDim() {
      return llvm::cast<mlir::RankedTensorType>(getFc1Weight().getType())
          .getDimSize(2);
    }
  }];
}

//===----------------------------------------------------------------------===//
// ShardRoutingOp
//===----------------------------------------------------------------------===//

def Moe_ShardRoutingOp : Moe_Op<"shard_routing", [Pure]> {
  let summary = "route to the hidden shards of each chosen expert";
  let description = [{
    With E experts sharded over s ranks each (E < W, s = W / E), the layer
    runs as E * s *virtual experts* `e * s + q`, shard q of expert e. This op
    turns the gate's top-k routing over E experts into top-(k * s) routing
    over E * s virtual experts: choice `i * s + q` of token t is virtual
    expert `indices[t, i] * s + q`, with the location and gate of choice i.
    Every virtual expert keeps the capacity C. Dispatch then writes each
    token to the s shards of each chosen expert, and combine sums the s
    partial outputs (`gate * sum over q of y_q = gate * y`). The gradient of
    a gate is the sum of its s copies' ([par-1]: result is
    `routing<T, E * s, k * s, C>`).

    ```mlir
    %v = moe.shard_routing %r {shards = 2}
        : !moe.routing<tokens = 16, experts = 2, top_k = 1, capacity = 8>
        -> !moe.routing<tokens = 16, experts = 4, top_k = 2, capacity = 8>
    ```
  }];
  let arguments = (ins Moe_RoutingType:$routing, I64Attr:$shards);
  let results = (outs Moe_RoutingType:$result);
  let assemblyFormat = [{
    $routing attr-dict `:` qualified(type($routing)) `->`
    qualified(type($result))
  }];
  let hasVerifier = 1;
}

//===----------------------------------------------------------------------===//
// CombineOp
//===----------------------------------------------------------------------===//

def Moe_CombineOp : Moe_Op<"combine", [Pure]> {
  let summary = "scatter expert outputs back to tokens, scaled by their gates";
  let description = [{
    `result[t] = sum over kept choices j of gates[t, j] * input[indices[t, j],
    locations[t, j]]` ([combine-1]); a token whose choices were all dropped
    gets zeros.

    ```mlir
    %out = moe.combine %y, %routing
        : tensor<8x256x512xbf16>, !moe.routing<tokens = 1024, experts = 8, top_k = 2, capacity = 256>
        -> tensor<1024x512xbf16>
    ```
  }];
  let arguments = (ins Moe_ExpertBatch:$input, Moe_RoutingType:$routing);
  let results = (outs Moe_Matrix:$result);
  let assemblyFormat = [{
    $input `,` $routing attr-dict `:` type($input) `,` qualified(type($routing))
    `->` type($result)
  }];
  let hasVerifier = 1;
}

//===----------------------------------------------------------------------===//
// AllToAllOp
//===----------------------------------------------------------------------===//

def Moe_AllToAllOp : Moe_Op<"all_to_all", [Pure]> {
  let summary = "exchange expert rows between ranks (expert parallelism)";
  let description = [{
    On W ranks with E experts, rank j owns the L = E / W experts
    `j*L .. j*L+L-1` (DESIGN.md section 4).

    `dispatch` takes the dispatch buffer `[E, C, d]` of this rank's tokens
    and returns, in D chunks of the capacity (`Cq = C / D`), the rows of this
    rank's experts from every rank: chunk q is `[L, W * Cq, d]`, the slots
    `q*Cq .. (q+1)*Cq-1` of local expert l from rank i at rows
    `i*Cq .. (i+1)*Cq-1`. With D > 1, the exchange of one chunk can overlap
    the experts of another (`--moe-pipeline`).

    `combine` is the inverse: D chunks `[L, W * Cq, d]` of expert outputs
    back to this rank's `[E, C, d]`.

    `ranks_per_node = N` (> 0, dividing W; `--moe-a2a-2dh`) asks for the
    two-dimensional hierarchical algorithm: an exchange inside each node of
    N ranks, then one between nodes, so each pair of nodes trades one large
    message instead of N * N small ones. The result is the same.

    `group_stride = S` > 1 runs the exchange among `ranks` ranks S apart
    (the ranks p with the same p % S, in a block of ranks * S), not all of
    them: experts sharded over ranks with 1 <= r < s exchange among the
    ranks of one token class (docs/Architecture.md).

    ```mlir
    %c0, %c1 = moe.all_to_all dispatch %d {ranks = 4}
        : tensor<8x512x1024xbf16> -> tensor<2x1024x1024xbf16>, tensor<2x1024x1024xbf16>
    %y = moe.all_to_all combine %y0, %y1 {ranks = 4}
        : tensor<2x1024x1024xbf16>, tensor<2x1024x1024xbf16> -> tensor<8x512x1024xbf16>
    ```
  }];
  let arguments = (ins Moe_AllToAllDirectionAttr:$direction,
                       Variadic<Moe_ExpertBatch>:$inputs, I64Attr:$ranks,
                       DefaultValuedAttr<I64Attr, "0">:$ranks_per_node,
                       DefaultValuedAttr<I64Attr, "1">:$group_stride);
  let results = (outs Variadic<Moe_ExpertBatch>:$results);
  let assemblyFormat = [{
    `` $direction $inputs attr-dict `:` type($inputs) `->` type($results)
  }];
  let hasVerifier = 1;
  let extraClassDeclaration = [{
    /// D: the number of capacity chunks.
    int64_t getNumChunks() {
      return getDirection() == AllToAllDirection::Dispatch
                 ? getResults().size() : getInputs().size();
    }
  }];
}

//===----------------------------------------------------------------------===//
// AllGatherOp
//===----------------------------------------------------------------------===//

def Moe_AllGatherOp : Moe_Op<"all_gather", [Pure]> {
  let summary = "gather every rank's experts (data parallelism)";
  let description = [{
    Rank i holds `[L, ...]` of an expert parameter (its slice of the one
    layout); the result is `[W * L, ...]`, block i from rank i: every
    expert, on every rank. Its gradient is a reduce-scatter. With `ranks`
    less than the layer's W, it gathers among groups of `ranks` ranks
    `group_stride` apart (experts sharded over ranks with 1 <= r < s: the
    g = s / r consecutive shard ranks of a group).

    ```mlir
    %w1 = moe.all_gather %w1_local {ranks = 4}
        : tensor<2x1024x4096xbf16> -> tensor<8x1024x4096xbf16>
    ```
  }];
  let arguments = (ins AnyRankedTensor:$input, I64Attr:$ranks,
                       DefaultValuedAttr<I64Attr, "1">:$group_stride);
  let results = (outs AnyRankedTensor:$result);
  let assemblyFormat = "$input attr-dict `:` type($input) `->` type($result)";
  let hasVerifier = 1;
}

//===----------------------------------------------------------------------===//
// LayerOp
//===----------------------------------------------------------------------===//

def Moe_LayerOp : Moe_Op<"layer", [Pure, AttrSizedOperandSegments]> {
  let summary = "a whole MoE layer, as a framework emits it";
  let description = [{
    One Mixture-of-Experts layer: the gate of `moe.gate`, then dispatch, the
    experts of `moe.expert` and combine. It returns the layer output `[T, d]`
    and the auxiliary loss. Sizes and element types are those of the
    operands: T and d from `input`, E from `router_weight` (`[d, E]`), h from
    `fc1_weight` (`[E, d, h]`); the router runs in fp32 when `router_weight`
    is f32. `--moe-expand-layer` rewrites it into the four steps.

    ```mlir
    %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
        {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
        : (tensor<16384x4096xbf16>, tensor<4096x8xf32>, tensor<8x4096x4096xbf16>,
           tensor<8x4096x4096xbf16>) -> (tensor<16384x4096xbf16>, tensor<f32>)
    ```
  }];
  let arguments = (ins Moe_Matrix:$input, Moe_Matrix:$router_weight,
                       Moe_ExpertBatch:$fc1_weight, Moe_ExpertBatch:$fc2_weight,
                       Optional<Moe_ExpertBatch>:$up_weight,
                       Optional<Moe_Matrix>:$fc1_bias,
                       Optional<Moe_Matrix>:$fc2_bias,
                       Moe_ExpertKindAttr:$kind,
                       OptionalAttr<Moe_ActivationAttr>:$activation,
                       I64Attr:$top_k,
                       Moe_CapacityAttr:$capacity,
                       UnitAttr:$normalize, UnitAttr:$batch_prioritized,
                       DefaultValuedAttr<F64Attr, "0.0">:$gate_noise,
                       DefaultValuedAttr<I64Attr, "0">:$seed);
  let results = (outs Moe_Matrix:$result, Moe_AuxLossTensor:$aux_loss);
  let assemblyFormat = [{
    custom<ExpertKind>($kind, $activation) $input `,` $router_weight `,`
    $fc1_weight `,` $fc2_weight
    (`up` `(` $up_weight^ `)`)?
    (`bias` `(` $fc1_bias^ `,` $fc2_bias `)`)?
    attr-dict `:` functional-type(operands, results)
  }];
  let hasVerifier = 1;
  let hasCanonicalizer = 1;
  let extraClassDeclaration = [{
    int64_t getNumTokens() {
      return llvm::cast<mlir::RankedTensorType>(getInput().getType()).getDimSize(0);
    }
    int64_t getNumExperts() {
      return llvm::cast<mlir::RankedTensorType>(getRouterWeight().getType())
          .getDimSize(1);
    }
  }];
}

#endif // FLEX_DIALECT_MOE_IR_MOEOPS_TD
