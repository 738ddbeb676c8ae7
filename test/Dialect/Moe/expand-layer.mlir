// RUN: moe-opt %s --split-input-file --moe-expand-layer | FileCheck %s

// A fixed-capacity FFN layer becomes gate, dispatch, expert and combine with
// C = k * int(f * ceil(T/E)) = 2 * int(1.25 * ceil(100/8)) = 2 * 16 = 32.

// CHECK-LABEL: func.func @ffn_fixed
// CHECK-SAME: (%[[X:.+]]: tensor<100x16xbf16>, %[[WG:.+]]: tensor<16x8xf32>, %[[W1:.+]]: tensor<8x16x64xbf16>, %[[W2:.+]]: tensor<8x64x16xbf16>, %[[B1:.+]]: tensor<8x64xbf16>, %[[B2:.+]]: tensor<8x16xbf16>)
func.func @ffn_fixed(%x: tensor<100x16xbf16>, %wg: tensor<16x8xf32>,
    %w1: tensor<8x16x64xbf16>, %w2: tensor<8x64x16xbf16>,
    %b1: tensor<8x64xbf16>, %b2: tensor<8x16xbf16>) -> (tensor<100x16xbf16>, tensor<f32>) {
  // CHECK: %[[R:.+]], %[[AUX:.+]] = moe.gate %[[X]], %[[WG]] {batch_prioritized, capacity = #moe.capacity<fixed 1.25>, noise = 1.000000e-01 : f64, normalize, seed = 42 : i64}
  // CHECK-SAME: -> !moe.routing<tokens = 100, experts = 8, top_k = 2, capacity = 32>
  // CHECK: %[[D:.+]] = moe.dispatch %[[X]], %[[R]] : {{.+}} -> tensor<8x32x16xbf16>
  // CHECK: %[[Y:.+]] = moe.expert ffn<gelu> %[[D]], %[[W1]], %[[W2]] bias(%[[B1]], %[[B2]])
  // CHECK: %[[OUT:.+]] = moe.combine %[[Y]], %[[R]] : {{.+}} -> tensor<100x16xbf16>
  // CHECK: return %[[OUT]], %[[AUX]]
  // CHECK-NOT: moe.layer
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<fixed 1.25>, normalize, batch_prioritized,
       gate_noise = 0.1 : f64, seed = 42 : i64}
      : (tensor<100x16xbf16>, tensor<16x8xf32>, tensor<8x16x64xbf16>,
         tensor<8x64x16xbf16>, tensor<8x64xbf16>, tensor<8x16xbf16>)
      -> (tensor<100x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<100x16xbf16>, tensor<f32>
}

// -----

// A dropless gated layer has a capacity known only after routing: `?`.

// CHECK-LABEL: func.func @gated_dropless
func.func @gated_dropless(%x: tensor<10x8xf32>, %wg: tensor<8x4xf32>,
    %w1: tensor<4x8x32xf32>, %w2: tensor<4x32x8xf32>, %w3: tensor<4x8x32xf32>)
    -> (tensor<10x8xf32>, tensor<f32>) {
  // CHECK: moe.gate {{.+}} -> !moe.routing<tokens = 10, experts = 4, top_k = 2, capacity = ?>
  // CHECK: moe.dispatch {{.+}} -> tensor<4x?x8xf32>
  // CHECK: moe.expert gated %{{.+}}, %{{.+}}, %{{.+}} up(%{{.+}}) : {{.+}} -> tensor<4x?x8xf32>
  // CHECK: moe.combine {{.+}} -> tensor<10x8xf32>
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<10x8xf32>, tensor<8x4xf32>, tensor<4x8x32xf32>, tensor<4x32x8xf32>,
         tensor<4x8x32xf32>) -> (tensor<10x8xf32>, tensor<f32>)
  return %out, %aux : tensor<10x8xf32>, tensor<f32>
}

// -----

// Alignment rounds the fixed capacity up: 1 * int(1.0 * ceil(10/4)) = 3 -> 4.

// CHECK-LABEL: func.func @aligned_capacity
func.func @aligned_capacity(%x: tensor<10x8xf32>, %wg: tensor<8x4xf32>,
    %w1: tensor<4x8x32xf32>, %w2: tensor<4x32x8xf32>) -> tensor<10x8xf32> {
  // CHECK: moe.gate {{.+}} -> !moe.routing<tokens = 10, experts = 4, top_k = 1, capacity = 4>
  %out, %aux = moe.layer ffn<silu> %x, %wg, %w1, %w2
      {top_k = 1, capacity = #moe.capacity<fixed 1.0, align = 4>}
      : (tensor<10x8xf32>, tensor<8x4xf32>, tensor<4x8x32xf32>, tensor<4x32x8xf32>)
      -> (tensor<10x8xf32>, tensor<f32>)
  return %out : tensor<10x8xf32>
}
