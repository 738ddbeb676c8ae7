// RUN: moe-opt %s --split-input-file | moe-opt --split-input-file | FileCheck %s
// RUN: moe-opt %s --split-input-file --mlir-print-op-generic | moe-opt --split-input-file | FileCheck %s

// Every op round-trips through the custom and the generic syntax.

// CHECK-LABEL: func.func @gate_fixed
func.func @gate_fixed(%x: tensor<100x16xbf16>, %wg: tensor<16x4xf32>)
    -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50> {
  // CHECK: %[[R:.+]], %{{.+}} = moe.gate %{{.+}}, %{{.+}} {batch_prioritized, capacity = #moe.capacity<fixed 1.0>, noise = 1.000000e-02 : f64, normalize, seed = 7 : i64}
  // CHECK-SAME: : tensor<100x16xbf16>, tensor<16x4xf32> -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
  %r, %aux = moe.gate %x, %wg {capacity = #moe.capacity<fixed 1.0>, normalize,
                               batch_prioritized, noise = 0.01 : f64, seed = 7 : i64}
      : tensor<100x16xbf16>, tensor<16x4xf32>
      -> !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
  return %r : !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
}

// -----

// CHECK-LABEL: func.func @gate_dropless_and_bounded
func.func @gate_dropless_and_bounded(%x: tensor<10x8xf16>, %wg: tensor<8x3xf16>) {
  // CHECK: capacity = #moe.capacity<dropless>
  // CHECK-SAME: -> !moe.routing<tokens = 10, experts = 3, top_k = 3, capacity = ?>
  %r0, %a0 = moe.gate %x, %wg {capacity = #moe.capacity<dropless>}
      : tensor<10x8xf16>, tensor<8x3xf16>
      -> !moe.routing<tokens = 10, experts = 3, top_k = 3, capacity = ?>
  // CHECK: capacity = #moe.capacity<bounded 1.25, align = 8>
  %r1, %a1 = moe.gate %x, %wg {capacity = #moe.capacity<bounded 1.25, align = 8>}
      : tensor<10x8xf16>, tensor<8x3xf16>
      -> !moe.routing<tokens = 10, experts = 3, top_k = 1, capacity = ?>
  return
}

// -----

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>

// CHECK-LABEL: func.func @dispatch_expert_combine
func.func @dispatch_expert_combine(%x: tensor<100x16xf32>, %r: !routing,
    %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>,
    %b1: tensor<4x32xf32>, %b2: tensor<4x16xf32>, %w3: tensor<4x16x32xf32>)
    -> tensor<100x16xf32> {
  // CHECK: %[[D:.+]] = moe.dispatch %{{.+}}, %{{.+}} : tensor<100x16xf32>, !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50> -> tensor<4x50x16xf32>
  %d = moe.dispatch %x, %r : tensor<100x16xf32>, !routing -> tensor<4x50x16xf32>
  // CHECK: %[[Y:.+]] = moe.expert ffn<gelu> %[[D]], %{{.+}}, %{{.+}} bias(%{{.+}}, %{{.+}}) :
  %y = moe.expert ffn<gelu> %d, %w1, %w2 bias(%b1, %b2)
      : (tensor<4x50x16xf32>, tensor<4x16x32xf32>, tensor<4x32x16xf32>,
         tensor<4x32xf32>, tensor<4x16xf32>) -> tensor<4x50x16xf32>
  // CHECK: %[[G:.+]] = moe.expert gated %[[Y]], %{{.+}}, %{{.+}} up(%{{.+}}) :
  %g = moe.expert gated %y, %w1, %w2 up(%w3)
      : (tensor<4x50x16xf32>, tensor<4x16x32xf32>, tensor<4x32x16xf32>,
         tensor<4x16x32xf32>) -> tensor<4x50x16xf32>
  // CHECK: moe.expert ffn<silu> %[[G]]
  %s = moe.expert ffn<silu> %g, %w1, %w2
      : (tensor<4x50x16xf32>, tensor<4x16x32xf32>, tensor<4x32x16xf32>)
      -> tensor<4x50x16xf32>
  // CHECK: moe.combine %{{.+}}, %{{.+}} : tensor<4x50x16xf32>, !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50> -> tensor<100x16xf32>
  %out = moe.combine %s, %r : tensor<4x50x16xf32>, !routing -> tensor<100x16xf32>
  return %out : tensor<100x16xf32>
}

// -----

!routing = !moe.routing<tokens = 7, experts = 2, top_k = 2, capacity = ?>

// CHECK-LABEL: func.func @dynamic_capacity
func.func @dynamic_capacity(%x: tensor<7x4xbf16>, %r: !routing,
    %w1: tensor<2x4x8xbf16>, %w2: tensor<2x8x4xbf16>) -> tensor<7x4xbf16> {
  // CHECK: moe.dispatch {{.+}} -> tensor<2x?x4xbf16>
  %d = moe.dispatch %x, %r : tensor<7x4xbf16>, !routing -> tensor<2x?x4xbf16>
  // CHECK: moe.expert ffn<relu> {{.+}} -> tensor<2x?x4xbf16>
  %y = moe.expert ffn<relu> %d, %w1, %w2
      : (tensor<2x?x4xbf16>, tensor<2x4x8xbf16>, tensor<2x8x4xbf16>) -> tensor<2x?x4xbf16>
  // CHECK: moe.combine {{.+}} -> tensor<7x4xbf16>
  %out = moe.combine %y, %r : tensor<2x?x4xbf16>, !routing -> tensor<7x4xbf16>
  return %out : tensor<7x4xbf16>
}

// -----

// CHECK-LABEL: func.func @layer_ffn_bias
func.func @layer_ffn_bias(%x: tensor<64x8xbf16>, %wg: tensor<8x4xbf16>,
    %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
    %b1: tensor<4x16xbf16>, %b2: tensor<4x8xbf16>) -> (tensor<64x8xbf16>, tensor<f32>) {
  // CHECK: moe.layer ffn<relu> %arg0, %arg1, %arg2, %arg3 bias(%arg4, %arg5)
  // CHECK-SAME: {batch_prioritized, capacity = #moe.capacity<fixed 2.0>, gate_noise = 1.000000e+00 : f64, normalize, seed = 3 : i64, top_k = 3 : i64}
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 3, capacity = #moe.capacity<fixed 2.0>, normalize, batch_prioritized,
       gate_noise = 1.0 : f64, seed = 3 : i64}
      : (tensor<64x8xbf16>, tensor<8x4xbf16>, tensor<4x8x16xbf16>, tensor<4x16x8xbf16>,
         tensor<4x16xbf16>, tensor<4x8xbf16>) -> (tensor<64x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x8xbf16>, tensor<f32>
}

// -----

// CHECK-LABEL: func.func @layer_gated
func.func @layer_gated(%x: tensor<64x8xf32>, %wg: tensor<8x4xf32>,
    %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>, %w3: tensor<4x8x16xf32>)
    -> (tensor<64x8xf32>, tensor<f32>) {
  // CHECK: moe.layer gated %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}} up(%{{.+}}) {capacity = #moe.capacity<dropless>, top_k = 2 : i64}
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<64x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>, tensor<4x16x8xf32>,
         tensor<4x8x16xf32>) -> (tensor<64x8xf32>, tensor<f32>)
  return %out, %aux : tensor<64x8xf32>, tensor<f32>
}

// -----

// CHECK-LABEL: func.func @exchanges
func.func @exchanges(%d: tensor<8x4x16xbf16>, %w: tensor<2x16x32xbf16>,
                     %dd: tensor<8x?x16xbf16>) {
  // CHECK: %[[C:.+]]:2 = moe.all_to_all dispatch %{{.+}} {ranks = 4 : i64} : tensor<8x4x16xbf16> -> tensor<2x8x16xbf16>, tensor<2x8x16xbf16>
  %c0, %c1 = moe.all_to_all dispatch %d {ranks = 4 : i64}
      : tensor<8x4x16xbf16> -> tensor<2x8x16xbf16>, tensor<2x8x16xbf16>
  // CHECK: moe.all_to_all combine %[[C]]#0, %[[C]]#1 {ranks = 4 : i64} : tensor<2x8x16xbf16>, tensor<2x8x16xbf16> -> tensor<8x4x16xbf16>
  %back = moe.all_to_all combine %c0, %c1 {ranks = 4 : i64}
      : tensor<2x8x16xbf16>, tensor<2x8x16xbf16> -> tensor<8x4x16xbf16>
  // CHECK: moe.all_to_all dispatch {{.+}} : tensor<8x?x16xbf16> -> tensor<2x?x16xbf16>
  %dyn = moe.all_to_all dispatch %dd {ranks = 4 : i64}
      : tensor<8x?x16xbf16> -> tensor<2x?x16xbf16>
  // CHECK: moe.all_gather %{{.+}} {ranks = 4 : i64} : tensor<2x16x32xbf16> -> tensor<8x16x32xbf16>
  %full = moe.all_gather %w {ranks = 4 : i64} : tensor<2x16x32xbf16> -> tensor<8x16x32xbf16>
  return
}
