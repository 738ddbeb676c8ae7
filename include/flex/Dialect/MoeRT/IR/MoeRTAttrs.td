//===- MoeRTAttrs.td - Attributes of the moert dialect -----*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the attributes of the `moert` dialect: the layer a plan
// runs (`#moert.layer`) and the enums of its ops.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_IR_MOERTATTRS_TD
#define FLEX_DIALECT_MOERT_IR_MOERTATTRS_TD

include "flex/Dialect/MoeRT/IR/MoeRTDialect.td"
include "flex/Dialect/MoeRT/IR/MoeRTEnums.td"
include "flex/Dialect/Moe/IR/MoeAttrs.td"
include "mlir/IR/AttrTypeBase.td"

// `true` or `false`: MLIR has no FieldParser for bool (it would read an
// integer).
class MoeRT_BoolParameter<string desc> : AttrParameter<"bool", desc> {
  let parser = "::flex::moert::detail::parseBoolParameter($_parser)";
}

// A float literal (`0.0`, `1.5e-2`), held as an f64 APFloat (a double
// parameter would need an llvm::hash_value(double)).
class MoeRT_F64Parameter<string desc> : APFloatParameter<desc> {
  let parser = "::flex::moert::detail::parseF64Parameter($_parser)";
}

//===----------------------------------------------------------------------===//
// LayerAttr
//===----------------------------------------------------------------------===//

def MoeRT_LayerAttr : AttrDef<MoeRT_Dialect, "Layer"> {
  let mnemonic = "layer";
  let summary = "the MoE layer a plan runs: every field of flex::LayerConfig";
  let description = [{
    The configuration of one MoE layer on one rank, as the runtime reads it
    from a plan (`flex::LayerConfig`, the `layer` object of
    docs/PlanFormat.md). Every field is present; the verifier checks the
    rules the runtime's `verifyLayerConfig` checks, so an emitted plan has a
    layer the runtime accepts:

    * `[layer]` `tokens` (T, on this rank), `model_dim` (d), `hidden_dim`
      (h, per expert, unsharded) and `experts` (E, global) are > 0; `dtype`
      (tokens, expert weights and outputs) is f32, bf16 or f16.
    * `[gate-2]` `top_k` is in 1..E.
    * `[gate-1]` `gate_noise` (stddev of the training noise on the logits,
      seeded by `seed`) is finite and >= 0.
    * `[expert-1]` a `gated` (SwiGLU) expert has no bias.
    * `[cap-1]` a fixed or bounded `capacity` gives C > 0, and the routing
      buffers (E * C slots, T * k choices) fit in i32.

    `activation` is used by `ffn` experts only; `router_fp32` says that `wg`
    is f32 and the logits are computed in fp32; `normalize_gate` renormalizes
    the k gates ([gate-3]); `batch_prioritized` sorts tokens by descending
    top score before assigning slots ([loc-1]).

    ```mlir
    #moert.layer<tokens = 16384, model_dim = 4096, hidden_dim = 4096,
                 experts = 8, top_k = 2, capacity = #moe.capacity<fixed 1.0>,
                 expert = ffn, activation = relu, dtype = bf16, bias = false,
                 router_fp32 = true, normalize_gate = true,
                 batch_prioritized = false, gate_noise = 0.0, seed = 0>
    ```
  }];
  let parameters = (ins
    AttrParameter<"int64_t", "T, tokens on this rank">:$tokens,
    AttrParameter<"int64_t", "d">:$modelDim,
    AttrParameter<"int64_t", "h, per expert">:$hiddenDim,
    AttrParameter<"int64_t", "E, global">:$experts,
    AttrParameter<"int64_t", "k, 1..E">:$topK,
    AttrParameter<"::flex::moe::CapacityAttr", "capacity mode and factor">
        :$capacity,
    EnumParameter<Moe_ExpertKind>:$expert,
    EnumParameter<Moe_Activation>:$activation,
    AttrParameter<"::mlir::Type", "element type of tokens and weights">:$dtype,
    MoeRT_BoolParameter<"the FFN expert has biases">:$bias,
    MoeRT_BoolParameter<"wg is f32, logits are fp32">:$routerFp32,
    MoeRT_BoolParameter<"renormalize the k gates">:$normalizeGate,
    MoeRT_BoolParameter<"sort tokens by top score">:$batchPrioritized,
    MoeRT_F64Parameter<"stddev of the gate noise">:$gateNoise,
    AttrParameter<"int64_t", "seed of the gate noise">:$seed);
  let assemblyFormat = [{
    `<` `tokens` `=` $tokens `,` `model_dim` `=` $modelDim `,`
    `hidden_dim` `=` $hiddenDim `,` `experts` `=` $experts `,`
    `top_k` `=` $topK `,` `capacity` `=` qualified($capacity) `,`
    `expert` `=` $expert `,` `activation` `=` $activation `,`
    `dtype` `=` $dtype `,` `bias` `=` $bias `,`
    `router_fp32` `=` $routerFp32 `,` `normalize_gate` `=` $normalizeGate `,`
    `batch_prioritized` `=` $batchPrioritized `,`
    `gate_noise` `=` $gateNoise `,` `seed` `=` $seed `>`
  }];
  let genVerifyDecl = 1;
  let extraClassDeclaration = [{
    double getGateNoiseValue() const {
      return getGateNoise().convertToDouble();
    }
  }];
}

#endif // FLEX_DIALECT_MOERT_IR_MOERTATTRS_TD
