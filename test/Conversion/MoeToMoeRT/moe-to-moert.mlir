// RUN: moe-opt %s --split-input-file --convert-moe-to-moert | FileCheck %s
// RUN: moe-opt %s --split-input-file --convert-moe-to-moert="training=true" | FileCheck %s --check-prefix=TRAIN
// RUN: moe-opt %s --split-input-file --convert-moe-to-moert="layout=ragged" | FileCheck %s --check-prefix=RAGGED

// An expanded fixed-capacity FFN layer becomes a plan: the function's
// arguments are named by role, the dispatch buffer has E * C rows (padded),
// and the first GEMM applies the activation in its epilogue.

// CHECK-LABEL: moert.plan @ffn attributes {layer = #moert.layer<tokens = 10, model_dim = 8, hidden_dim = 16, experts = 4, top_k = 2, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = bf16, bias = true, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.000000e+00, seed = 0>
// CHECK-NOT: training
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<10x8xbf16>
// CHECK: moert.argument "wg" input : memref<8x4xf32>
// CHECK: moert.argument "b1" input : memref<4x16xbf16>
// CHECK: %[[OUT:.+]] = moert.argument "out" output : memref<10x8xbf16>
// CHECK: moert.argument "l_aux" output : memref<1xf32>
// CHECK-NOT: grad_
// CHECK: %[[D:.+]] = moert.alloc "dispatched" : memref<24x8xbf16>
// CHECK-NOT: hidden_pre
// CHECK: %[[H:.+]] = moert.alloc "hidden" : memref<24x16xbf16>
// CHECK: moert.variant "single" forward {
// CHECK: moert.gate {{.+}} {capacity = #moe.capacity<fixed 1.0>, layout = #moert<layout padded>, noise = 0.000000e+00 : f64, normalize, seed = 0 : i64, top_k = 2 : i64}
// CHECK: moert.dispatch ins(x = %[[X]] : {{.+}}) outs(dispatched = %[[D]] : memref<24x8xbf16>)
// CHECK: moert.grouped_gemm ins(a = %[[D]] : {{.+}}, bias = {{.+}}) outs(c = %[[H]] : memref<24x16xbf16>) {epilogue = #moe<activation relu>}
// CHECK: moert.combine {{.+}} outs(out = %[[OUT]] : memref<10x8xbf16>)
// CHECK-NEXT: } backward {
// CHECK-NEXT: }
// CHECK-NOT: func.func

// TRAIN-LABEL: moert.plan @ffn
// TRAIN-SAME: training
// TRAIN: moert.argument "grad_out" grad_input
// TRAIN: moert.argument "grad_l_aux" grad_input
// TRAIN: moert.argument "grad_x" grad_output
// TRAIN: moert.argument "grad_b2" grad_output
// A ReLU's backward reads its output (relu'(relu(x)) = relu'(x)): fc1
// keeps no value before the activation.
// TRAIN-NOT: hidden_pre
// TRAIN: %[[HIDDEN:.+]] = moert.alloc "hidden"
// TRAIN: moert.grouped_gemm {{.+}} outs(c = %[[HIDDEN]] : {{[^,]+}}) {epilogue = #moe<activation relu>}
// TRAIN: } backward {
// TRAIN: moert.activation_backward ins(pre = %[[HIDDEN]] {{.+}} {activation = #moe<activation relu>}
// TRAIN: moert.router_backward

// The ragged layout keeps T * k = 20 rows instead of E * C = 24.
// RAGGED: moert.alloc "dispatched" : memref<20x8xbf16>
// RAGGED: layout = #moert<layout ragged>

func.func @ffn(%x: tensor<10x8xbf16>, %wg: tensor<8x4xf32>,
               %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
               %b1: tensor<4x16xbf16>, %b2: tensor<4x8xbf16>)
    -> (tensor<10x8xbf16>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>, normalize}
      : tensor<10x8xbf16>, tensor<8x4xf32>
      -> !moe.routing<tokens = 10, experts = 4, top_k = 2, capacity = 6>
  %d = moe.dispatch %x, %r : tensor<10x8xbf16>,
      !moe.routing<tokens = 10, experts = 4, top_k = 2, capacity = 6> -> tensor<4x6x8xbf16>
  %y = moe.expert ffn<relu> %d, %w1, %w2 bias(%b1, %b2)
      : (tensor<4x6x8xbf16>, tensor<4x8x16xbf16>, tensor<4x16x8xbf16>,
         tensor<4x16xbf16>, tensor<4x8xbf16>) -> tensor<4x6x8xbf16>
  %out = moe.combine %y, %r : tensor<4x6x8xbf16>,
      !moe.routing<tokens = 10, experts = 4, top_k = 2, capacity = 6> -> tensor<10x8xbf16>
  return %out, %aux : tensor<10x8xbf16>, tensor<f32>
}

// -----

// A dropless layer defaults to the ragged layout: T * k rows.

// CHECK-LABEL: moert.plan @dropless
// CHECK: moert.alloc "dispatched" : memref<14x4xf32>
// CHECK: layout = #moert<layout ragged>
func.func @dropless(%x: tensor<7x4xf32>, %wg: tensor<4x3xf32>,
                    %w1: tensor<3x4x8xf32>, %w2: tensor<3x8x4xf32>)
    -> (tensor<7x4xf32>, tensor<f32>) {
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<dropless>}
      : tensor<7x4xf32>, tensor<4x3xf32>
      -> !moe.routing<tokens = 7, experts = 3, top_k = 2, capacity = ?>
  %d = moe.dispatch %x, %r : tensor<7x4xf32>,
      !moe.routing<tokens = 7, experts = 3, top_k = 2, capacity = ?> -> tensor<3x?x4xf32>
  %y = moe.expert ffn<silu> %d, %w1, %w2
      : (tensor<3x?x4xf32>, tensor<3x4x8xf32>, tensor<3x8x4xf32>) -> tensor<3x?x4xf32>
  %out = moe.combine %y, %r : tensor<3x?x4xf32>,
      !moe.routing<tokens = 7, experts = 3, top_k = 2, capacity = ?> -> tensor<7x4xf32>
  return %out, %aux : tensor<7x4xf32>, tensor<f32>
}
