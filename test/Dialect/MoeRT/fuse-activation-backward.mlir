// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch,moert-fuse-activation-backward))' | FileCheck %s --check-prefix=GATHER
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=INFER-REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward,moert-fuse-activation-backward))' | FileCheck %s --check-prefix=TWICE

// --moert-fuse-activation-backward: a variant whose backward computes the
// input gradient of an expert's second layer as grouped_gemm
// (grad_expert_out, w2, trans_b) -> grad_hidden and then
// activation_backward (pre, grad_hidden) -> grad_hidden_pre gets a copy
// `<name>+act_backward` after the plan's variants, in which the two are
// one grouped_gemm_activation_backward. The copy has no buffer for
// grad_hidden. The original stays first and untouched. Variants that do
// not qualify are left alone, with a remark saying why.

// GELU keeps its pre-activation value: the fused step reads it.
// CHECK-LABEL: moert.plan @gelu_bf16
// CHECK: %[[W2:.+]] = moert.argument "w2" input : memref<4x16x8xbf16>
// CHECK: moert.alloc "grad_hidden" : memref<64x16xbf16>
// CHECK: moert.variant "single" forward {
// CHECK: } backward {
// CHECK: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<64x8xbf16>, b = %[[W2]] : {{.+}} {trans_b}
// CHECK-NEXT: moert.activation_backward
// CHECK: %[[OFFSETS:.+]] = moert.alloc "single+act_backward.expert_offsets" : memref<5xi32>
// CHECK-NEXT: %[[ROWS:.+]] = moert.alloc "single+act_backward.expert_rows" : memref<4xi32>
// CHECK-NOT: single+act_backward.grad_hidden"
// CHECK: %[[PRE:.+]] = moert.alloc "single+act_backward.hidden_pre" : memref<64x16xbf16>
// CHECK-NOT: single+act_backward.grad_hidden"
// CHECK: %[[GEO:.+]] = moert.alloc "single+act_backward.grad_expert_out" : memref<64x8xbf16>
// CHECK-NOT: single+act_backward.grad_hidden"
// CHECK: %[[GHP:.+]] = moert.alloc "single+act_backward.grad_hidden_pre" : memref<64x16xbf16>
// CHECK: moert.variant "single+act_backward" forward {
// CHECK: moert.grouped_gemm {{.+}} outs(c = %{{[^ ]+}} : memref<64x16xbf16>, pre = %[[PRE]] : memref<64x16xbf16>) {epilogue = #moe<activation gelu>}
// CHECK: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm_activation_backward ins(a = %[[GEO]] : memref<64x8xbf16>, b = %[[W2]] : memref<4x16x8xbf16>, pre = %[[PRE]] : memref<64x16xbf16>, expert_offsets = %[[OFFSETS]] : memref<5xi32>, expert_rows = %[[ROWS]] : memref<4xi32>) outs(c = %[[GHP]] : memref<64x16xbf16>) {activation = #moe<activation gelu>, trans_b}
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %{{[^ ]+}} : memref<64x8xbf16>, grad_c = %[[GHP]] :
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[GHP]] :
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// CHECK-NEXT: }

// After --moert-fuse-dispatch: `single+gather` is fused too, after every
// variant the plan had.
// GATHER-LABEL: moert.plan @gelu_bf16
// GATHER: moert.variant "single" forward {
// GATHER: moert.variant "single+gather" forward {
// GATHER: moert.variant "single+act_backward" forward {
// GATHER: moert.grouped_gemm_activation_backward
// GATHER: moert.variant "single+gather+act_backward" forward {
// GATHER: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<32x8xbf16>, {{.+}}, row_tokens =
// GATHER: moert.grouped_gemm_activation_backward
// GATHER-NOT: moert.activation_backward
// GATHER-NOT: moert.variant

// REMARK: remark: variant 'single' fused as 'single+act_backward': 1 grouped_gemm_activation_backward step
// INFER-REMARK: remark: variant 'single' not fused: its backward has no activation_backward or glu_backward step

// TWICE-LABEL: moert.plan @gelu_bf16
// TWICE: moert.variant "single" forward {
// TWICE: moert.variant "single+act_backward" forward {
// TWICE-NOT: moert.variant

func.func @gelu_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

// -----

// ReLU at a fixed capacity (padded): the backward reads the activation's
// output as its pre (relu'(relu(x)) = relu'(x)), which the fused step reads.
// CHECK-LABEL: moert.plan @relu_f16_padded
// GATHER-LABEL: moert.plan @relu_f16_padded
// TWICE-LABEL: moert.plan @relu_f16_padded
// CHECK: moert.variant "single" forward {
// CHECK: moert.variant "single+act_backward" forward {
// CHECK: moert.grouped_gemm {{.+}} outs(c = %[[H:[^ ]+]] : memref<64x16xf16>) {epilogue = #moe<activation relu>}
// CHECK: } backward {
// CHECK: moert.grouped_gemm_activation_backward ins({{.+}}, pre = %[[H]] : memref<64x16xf16>, {{.+}}) {activation = #moe<activation relu>, trans_b}
// CHECK-NOT: moert.activation_backward
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'single' fused as 'single+act_backward': 1 grouped_gemm_activation_backward step

func.func @relu_f16_padded(%x: tensor<32x8xf16>, %wg: tensor<8x4xf32>,
                           %w1: tensor<4x8x16xf16>, %w2: tensor<4x16x8xf16>)
    -> (tensor<32x8xf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<32x8xf16>, tensor<8x4xf32>, tensor<4x8x16xf16>,
         tensor<4x16x8xf16>) -> (tensor<32x8xf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xf16>, tensor<f32>
}

// -----

// Left alone: f32 (the fused kernel is bf16/f16), K or N not a multiple of
// 8.
// CHECK-LABEL: moert.plan @relu_f32
// CHECK-NOT: act_backward
// REMARK: remark: variant 'single' not fused: its operands are f32; the fused step needs bf16 or f16

func.func @relu_f32(%x: tensor<32x8xf32>, %wg: tensor<8x4xf32>,
                    %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>)
    -> (tensor<32x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>,
         tensor<4x16x8xf32>) -> (tensor<32x8xf32>, tensor<f32>)
  return %out, %aux : tensor<32x8xf32>, tensor<f32>
}

// -----

// CHECK-LABEL: moert.plan @model_dim_12
// CHECK-NOT: act_backward
// REMARK: remark: variant 'single' not fused: the GEMM has K = 12, not a multiple of 8

func.func @model_dim_12(%x: tensor<32x12xbf16>, %wg: tensor<12x4xf32>,
                        %w1: tensor<4x12x16xbf16>, %w2: tensor<4x16x12xbf16>)
    -> (tensor<32x12xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<silu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x12xbf16>, tensor<12x4xf32>, tensor<4x12x16xbf16>,
         tensor<4x16x12xbf16>) -> (tensor<32x12xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x12xbf16>, tensor<f32>
}

// -----

// CHECK-LABEL: moert.plan @hidden_dim_12
// CHECK-NOT: act_backward
// REMARK: remark: variant 'single' not fused: it has N = 12, not a multiple of 8

func.func @hidden_dim_12(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                         %w1: tensor<4x8x12xbf16>, %w2: tensor<4x12x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x12xbf16>,
         tensor<4x12x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

// -----

// A gated layer: fc2's input gradient and glu_backward are one
// grouped_gemm_glu_backward, reading the forward's gate_in and up_in.
// CHECK-LABEL: moert.plan @gated
// CHECK: moert.variant "single" forward {
// CHECK: moert.glu_backward
// CHECK: %[[GATE:.+]] = moert.alloc "single+act_backward.gate_proj" : memref<64x16xbf16>
// CHECK-NEXT: %[[UP:.+]] = moert.alloc "single+act_backward.up_proj" : memref<64x16xbf16>
// CHECK: %[[GG:.+]] = moert.alloc "single+act_backward.grad_gate_proj" : memref<64x16xbf16>
// CHECK-NEXT: %[[GU:.+]] = moert.alloc "single+act_backward.grad_up_proj" : memref<64x16xbf16>
// CHECK: moert.variant "single+act_backward" forward {
// CHECK: } backward {
// CHECK-NOT: moert.glu_backward
// CHECK: moert.grouped_gemm_glu_backward ins(a = %{{[^ ]+}} : memref<64x8xbf16>, b = %{{[^ ]+}} : memref<4x16x8xbf16>, gate_in = %[[GATE]] : memref<64x16xbf16>, up_in = %[[UP]] : memref<64x16xbf16>, {{.+}}) outs(grad_gate_in = %[[GG]] : memref<64x16xbf16>, grad_up_in = %[[GU]] : memref<64x16xbf16>) {trans_b}
// CHECK-NOT: moert.glu_backward
// REMARK: remark: variant 'single' fused as 'single+act_backward': 1 grouped_gemm_glu_backward step

func.func @gated(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                 %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                 %w3: tensor<4x8x16xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x8x16xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
