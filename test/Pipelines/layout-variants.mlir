// RUN: moe-opt %s --split-input-file --moe-lower-to-plan="training=true layouts=padded,ragged" | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-lower-to-plan="layouts=ragged,padded" | FileCheck %s --check-prefix=INFER
// RUN: moe-opt %s --split-input-file --moe-lower-to-plan | FileCheck %s --check-prefix=ONE

// One GPU's choice: a plan keeps the padded and the ragged layout as two
// variants with one parameter layout. The variant layout=auto would give
// comes first (the plan's default): ragged for a dropless (or bounded)
// capacity, padded for a fixed one; the order listed does not matter. Each
// variant has its own workspace buffers, prefixed by its name; the memory
// plan overlaps them (variants never run together).

// CHECK-LABEL: moert.plan @dropless
// CHECK-SAME: capacity = #moe.capacity<dropless>
// CHECK-SAME: training
// CHECK: moert.argument "x" input
// CHECK-NOT: moert.argument "x"
// CHECK: moert.alloc "ragged.dispatched" {{.+}} : memref<128x16xf32>
// CHECK: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// CHECK-NEXT: moert.dispatch {{.+}}dispatched = %{{.+}} : memref<128x16xf32>
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.activation_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// E * T rows: a dropless expert may get every token.
// CHECK: moert.alloc "padded.dispatched" {{.+}} : memref<256x16xf32>
// CHECK: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout padded>
// CHECK-NEXT: moert.dispatch {{.+}}dispatched = %{{.+}} : memref<256x16xf32>
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.activation_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// CHECK-NOT: moert.variant

// INFER-LABEL: moert.plan @dropless
// INFER: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// INFER: } backward {
// INFER-NEXT: }
// INFER: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// INFER: } backward {
// INFER-NEXT: }

// Without layouts: one variant, as before.
// ONE-LABEL: moert.plan @dropless
// ONE: moert.alloc "dispatched"
// ONE: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// ONE-NEXT: moert.router
// ONE-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// ONE-NOT: moert.variant

func.func @dropless(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
                    %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>) -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}

// -----

// A fixed capacity: padded first (C = 32, E * C = 128 rows; ragged keeps
// at most T * k = 128 rows too), gated experts.

// CHECK-LABEL: moert.plan @fixed_gated
// CHECK: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout padded>
// CHECK-NEXT: moert.dispatch
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// CHECK-NEXT: moert.dispatch
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NOT: moert.variant

// INFER-LABEL: moert.plan @fixed_gated
// INFER: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// INFER: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {

// ONE-LABEL: moert.plan @fixed_gated
// ONE: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// ONE-NEXT: moert.router
// ONE-NEXT: moert.gate {{.+}}layout = #moert<layout padded>

func.func @fixed_gated(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
                       %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>,
                       %w3: tensor<4x16x32xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>, tensor<4x16x32xf32>)
      -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}
