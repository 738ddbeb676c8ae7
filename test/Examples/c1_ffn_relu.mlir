// RUN: moe-opt %examples/c1_ffn_relu.mlir | moe-opt | FileCheck %s --check-prefix=ROUNDTRIP
// RUN: moe-opt %examples/c1_ffn_relu.mlir --moe-expand-layer | FileCheck %s

// The C1 example round-trips and expands: 16384 tokens, E = 8, top-2,
// capacity 2 * int(1.0 * 2048) = 4096.

// ROUNDTRIP: moe.layer ffn<relu> {{.+}} {capacity = #moe.capacity<fixed 1.0>, normalize, top_k = 2 : i64}
// CHECK: moe.gate {{.+}} -> !moe.routing<tokens = 16384, experts = 8, top_k = 2, capacity = 4096>
// CHECK: moe.dispatch {{.+}} -> tensor<8x4096x4096xbf16>
// CHECK: moe.expert ffn<relu>
// CHECK: moe.combine {{.+}} -> tensor<16384x4096xbf16>
