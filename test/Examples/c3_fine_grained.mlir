// RUN: moe-opt %examples/c3_fine_grained.mlir | moe-opt | FileCheck %s --check-prefix=ROUNDTRIP
// RUN: moe-opt %examples/c3_fine_grained.mlir --moe-expand-layer | FileCheck %s

// The C3 example: 16384 tokens, E = 64, top-6, capacity 6 * int(1.0 * 256).

// ROUNDTRIP: moe.layer ffn<relu> {{.+}} {capacity = #moe.capacity<fixed 1.0>, normalize, top_k = 6 : i64}
// CHECK: moe.gate {{.+}} -> !moe.routing<tokens = 16384, experts = 64, top_k = 6, capacity = 1536>
// CHECK: moe.dispatch {{.+}} -> tensor<64x1536x2048xbf16>
// CHECK: moe.expert ffn<relu> {{.+}} -> tensor<64x1536x2048xbf16>
// CHECK: moe.combine {{.+}} -> tensor<16384x2048xbf16>
