// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// The steps of experts sharded over ranks round-trip: shard_routing names the
// same roles in ins and outs, and grouped_gemm keeps its bias_scale.

// CHECK-LABEL: moert.plan @sharded
// CHECK: moert.shard_routing ins(indices = %{{.+}} : memref<8x1xi32>, locations = %{{.+}} : memref<8x1xi32>, gates = %{{.+}} : memref<8x1xf32>, capacity = %{{.+}} : memref<1xi32>, expert_rows = %{{.+}} : memref<2xi32>) outs(indices = %{{.+}} : memref<8x2xi32>, locations = %{{.+}} : memref<8x2xi32>, gates = %{{.+}} : memref<8x2xf32>, expert_offsets = %{{.+}} : memref<5xi32>, expert_rows = %{{.+}} : memref<4xi32>) {shards = 2 : i64}
// CHECK: moert.grouped_gemm {{.+}} {bias_scale = 5.000000e-01 : f64}
// CHECK: moert.shard_routing_backward ins(grad_gates = %{{.+}} : memref<8x2xf32>) outs(grad_gates = %{{.+}} : memref<8x1xf32>) {shards = 2 : i64}

moert.plan @sharded attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %i = moert.alloc "indices" : memref<8x1xi32>
  %l = moert.alloc "locations" : memref<8x1xi32>
  %g = moert.alloc "gates" : memref<8x1xf32>
  %c = moert.alloc "capacity" : memref<1xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %vi = moert.alloc "shard_indices" : memref<8x2xi32>
  %vl = moert.alloc "shard_locations" : memref<8x2xi32>
  %vg = moert.alloc "shard_gates" : memref<8x2xf32>
  %vo = moert.alloc "shard_expert_offsets" : memref<5xi32>
  %vr = moert.alloc "shard_expert_rows" : memref<4xi32>
  %a = moert.alloc "a" : memref<8x4xf32>
  %b = moert.alloc "b" : memref<4x4x3xf32>
  %bias = moert.alloc "bias" : memref<4x3xf32>
  %y = moert.alloc "y" : memref<8x3xf32>
  %vgg = moert.alloc "shard_grad_gates" : memref<8x2xf32>
  %gg = moert.alloc "grad_gates" : memref<8x1xf32>
  moert.variant "v" forward {
    moert.shard_routing ins(indices = %i : memref<8x1xi32>, locations = %l : memref<8x1xi32>, gates = %g : memref<8x1xf32>, capacity = %c : memref<1xi32>, expert_rows = %r : memref<2xi32>) outs(indices = %vi : memref<8x2xi32>, locations = %vl : memref<8x2xi32>, gates = %vg : memref<8x2xf32>, expert_offsets = %vo : memref<5xi32>, expert_rows = %vr : memref<4xi32>) {shards = 2 : i64}
    moert.grouped_gemm ins(a = %a : memref<8x4xf32>, b = %b : memref<4x4x3xf32>, bias = %bias : memref<4x3xf32>, expert_offsets = %vo : memref<5xi32>, expert_rows = %vr : memref<4xi32>) outs(c = %y : memref<8x3xf32>) {bias_scale = 5.000000e-01 : f64}
  } backward {
    moert.shard_routing_backward ins(grad_gates = %vgg : memref<8x2xf32>) outs(grad_gates = %gg : memref<8x1xf32>) {shards = 2 : i64}
  }
}
