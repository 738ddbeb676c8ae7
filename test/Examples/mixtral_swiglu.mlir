// RUN: moe-opt %examples/mixtral_swiglu.mlir | moe-opt | FileCheck %s --check-prefix=ROUNDTRIP
// RUN: moe-opt %examples/mixtral_swiglu.mlir --moe-expand-layer | FileCheck %s

// The Mixtral-like example: gated SwiGLU experts, dropless.

// ROUNDTRIP: moe.layer gated {{.+}} up(%{{.+}}) {capacity = #moe.capacity<dropless>, normalize, top_k = 2 : i64}
// CHECK: moe.gate {{.+}} -> !moe.routing<tokens = 4096, experts = 8, top_k = 2, capacity = ?>
// CHECK: moe.dispatch {{.+}} -> tensor<8x?x4096xbf16>
// CHECK: moe.expert gated {{.+}} up(%{{.+}}) {{.+}} -> tensor<8x?x4096xbf16>
// CHECK: moe.combine {{.+}} -> tensor<4096x4096xbf16>
