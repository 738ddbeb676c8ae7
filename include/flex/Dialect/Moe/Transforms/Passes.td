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

def MoeParallelizePass : Pass<"moe-parallelize", "::mlir::func::FuncOp"> {
  let summary = "Parallelize an expanded layer over ranks with one layout";
  let description = [{
    Rewrites the expanded layer of a function to run on `ranks` ranks
    (DESIGN.md section 4). Every variant uses one parameter layout: with
    E >= W, rank j holds experts `j*L .. j*L+L-1` (L = E / W), so the expert
    weight arguments become `[L, ...]`. With E < W (W % E == 0) each expert
    is sharded over s = W / E ranks: rank j holds shard q = j % s of expert
    e = j / s, the hidden units `q*h/s .. (q+1)*h/s` (W1, W3 `[1, d, h/s]`,
    b1 `[1, h/s]`, W2 `[1, h/s, d]`) and the whole b2 `[1, d]`; the layer
    then routes to E * s virtual experts, one per rank
    (`moe.shard_routing`, experts with `hidden_shards = s`). Tokens stay on
    their rank.

    * `r=1` (s = 1) or `r=s` (sharded): the dispatch buffer is exchanged
      (`moe.all_to_all dispatch`) so this rank's experts see their rows from
      every rank (`[L, W * C, d]`), and exchanged back before combine.
    * `r=0`: every rank gathers every expert, or every shard
      (`moe.all_gather`), and runs them on its own tokens.

    * `1 <= r < s` (sharded, g = s / r): the g consecutive ranks of a shard
      group gather their shards (`moe.all_gather {ranks = g}`) as g local
      virtual experts, and the dispatch buffer is exchanged among the W / g
      ranks of the token class (`moe.all_to_all {ranks = W / g,
      group_stride = g}`).

    r must be 0 or divide s ([par-1]).
    A capacity that depends on the routing is agreed over ranks (the gate's
    `ranks`).
  }];
  let options = [
    Option<"ranks", "ranks", "int64_t", /*default=*/"1", "Number of ranks W">,
    Option<"parallelism", "r", "int64_t", /*default=*/"-1",
           "r: 0 gathers weights (data parallel); 1, or s = W / E for "
           "sharded experts, exchanges tokens (expert parallel); -1 (the "
           "default) is 1 or s">,
  ];
  let dependentDialects = ["::flex::moe::MoeDialect"];
}

def MoePipelinePass : Pass<"moe-pipeline", "::mlir::func::FuncOp"> {
  let summary = "Split the expert exchange into capacity chunks";
  let description = [{
    Splits the capacity of an expert-parallel layer into `chunks` chunks
    (DESIGN.md section 5): the all-to-all of one chunk can then overlap the
    experts of another. The chunks must divide C: a static C must be a
    multiple of `chunks`, a dynamic one must be aligned to it
    (`#moe.capacity<..., align = n>` with `chunks` dividing n).
  }];
  let options = [
    Option<"chunks", "chunks", "int64_t", /*default=*/"1",
           "Pipelining degree D">,
  ];
  let dependentDialects = ["::flex::moe::MoeDialect"];
}

def MoeA2A2DHPass : Pass<"moe-a2a-2dh", "::mlir::func::FuncOp"> {
  let summary = "Use the hierarchical all-to-all for ranks spread over nodes";
  let description = [{
    Marks every `moe.all_to_all` with `ranks_per_node`: the runtime then
    exchanges rows in two steps (inside each node of `ranks-per-node` ranks,
    then between nodes), Tutel's 2DH all-to-all, which trades N * N small
    messages between two nodes for one large one. `ranks-per-node` must
    divide the ranks ([a2a-1]); with one node (equal to the ranks) the flat
    algorithm is kept.
  }];
  let options = [
    Option<"ranksPerNode", "ranks-per-node", "int64_t", /*default=*/"8",
           "Ranks (GPUs) per node">,
  ];
  let dependentDialects = ["::flex::moe::MoeDialect"];
}

def MoeMultiversionPass : Pass<"moe-multiversion", "::mlir::ModuleOp"> {
  let summary = "Keep several parallel variants of each layer side by side";
  let description = [{
    For each function holding one `moe.layer`, makes one function per
    variant, named `<name>__<variant>` and tagged `moe.variant_of = "<name>"`,
    expanded, parallelized over `ranks` and pipelined as the variant says;
    `--convert-moe-to-moert` turns them into one plan with one
    `moert.variant` each, and the runtime picks one per call.

    A variant is `r<R>d<D>`: R = 0 data parallel, R = 1 expert parallel
    (R = s = W / E when each expert is sharded over s ranks, E < W; R must
    be 0 or divide s, [par-1]); D the pipelining degree (R >= 1 only). Every variant computes the same
    function with the same parameter layout, so the capacity is aligned to
    the least common multiple of every variant's D first: switching
    variants never changes which tokens are kept.
  }];
  let options = [
    Option<"ranks", "ranks", "int64_t", /*default=*/"1", "Number of ranks W">,
    ListOption<"variants", "variants", "std::string",
               "Variants, e.g. r1d1,r1d2,r0d1">,
  ];
  let dependentDialects = ["::flex::moe::MoeDialect"];
}

#endif // FLEX_DIALECT_MOE_TRANSFORMS_PASSES_TD
