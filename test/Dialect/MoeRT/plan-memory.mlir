// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-plan-memory))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-plan-memory{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK

// Buffers whose lives do not overlap share bytes; the others do not; offsets
// are aligned; the plan gets the peak.
//
// steps:        0: a -> b    1: b -> c    2: c -> d
// a (1024 B) lives in [0, 0], b in [0, 1], c in [1, 2], d in [2, 2]:
// a and c can share, b and d can share.

// REMARK: remark: workspace: 2048 bytes for 4 buffers (4096 bytes without reuse)
// CHECK-LABEL: moert.plan @chain
// CHECK-SAME: workspace_bytes = 2048
// CHECK-DAG: moert.alloc "a" {offset = [[A:[0-9]+]] : i64}
// CHECK-DAG: moert.alloc "b" {offset = [[B:[0-9]+]] : i64}
// CHECK-DAG: moert.alloc "c" {offset = [[A]] : i64}
// CHECK-DAG: moert.alloc "d" {offset = [[B]] : i64}
// CHECK: moert.variant "v" workspace_bytes = 2048 forward
moert.plan @chain attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "a" : memref<16x16xf32>
  %b = moert.alloc "b" : memref<16x16xf32>
  %c = moert.alloc "c" : memref<16x16xf32>
  %d = moert.alloc "d" : memref<16x16xf32>
  %offsets = moert.argument "expert_offsets" input : memref<2xi32>
  %rows = moert.argument "expert_rows" input : memref<1xi32>
  %w = moert.argument "w" input : memref<1x16x16xf32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %a : memref<16x16xf32>, b = %w : memref<1x16x16xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %b : memref<16x16xf32>)
    moert.grouped_gemm ins(a = %b : memref<16x16xf32>, b = %w : memref<1x16x16xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %c : memref<16x16xf32>)
    moert.grouped_gemm ins(a = %c : memref<16x16xf32>, b = %w : memref<1x16x16xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %d : memref<16x16xf32>)
  } backward {
  }
}

// -----

// What backward reads from forward stays live across the two: `keep` (read
// by both) shares with nothing, while `tmp` (forward only) and `grad`
// (backward only) share. Small buffers take 256 aligned bytes.

// REMARK: remark: workspace: 512 bytes for 3 buffers (768 bytes without reuse)
// CHECK-LABEL: moert.plan @across_backward
// CHECK-SAME: workspace_bytes = 512
// CHECK-DAG: moert.alloc "keep" {offset = [[KEEP:[0-9]+]] : i64}
// CHECK-DAG: moert.alloc "tmp" {offset = [[TMP:[0-9]+]] : i64}
// CHECK-DAG: moert.alloc "grad" {offset = [[TMP]] : i64}
// CHECK: moert.variant "v" workspace_bytes = 512 forward
moert.plan @across_backward attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %keep = moert.alloc "keep" : memref<4x4xf32>
  %tmp = moert.alloc "tmp" : memref<4x4xf32>
  %grad = moert.alloc "grad" : memref<4x4xf32>
  %offsets = moert.argument "expert_offsets" input : memref<2xi32>
  %rows = moert.argument "expert_rows" input : memref<1xi32>
  %w = moert.argument "w" input : memref<1x4x4xf32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %keep : memref<4x4xf32>, b = %w : memref<1x4x4xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %tmp : memref<4x4xf32>)
  } backward {
    moert.grouped_gemm ins(a = %keep : memref<4x4xf32>, b = %w : memref<1x4x4xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %grad : memref<4x4xf32>)
  }
}

// -----

// An unused buffer is reported and still placed apart from every other.

// REMARK: warning: workspace buffer 'unused' is never used
// REMARK: remark: workspace: 512 bytes
moert.plan @unused attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %unused = moert.alloc "unused" : memref<4xf32>
  %a = moert.alloc "a" : memref<4x4xf32>
  %offsets = moert.argument "expert_offsets" input : memref<2xi32>
  %rows = moert.argument "expert_rows" input : memref<1xi32>
  %w = moert.argument "w" input : memref<1x4x4xf32>
  %c = moert.argument "c" output : memref<4x4xf32>
  moert.variant "v" forward {
    moert.grouped_gemm ins(a = %a : memref<4x4xf32>, b = %w : memref<1x4x4xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %c : memref<4x4xf32>)
  } backward {
  }
}

// -----

// Variants never run at once: each starts at offset 0, and each gets the
// bytes its own buffers reach (a workspace of that size runs it), the plan
// the largest. "big" chains three 1024-byte buffers (a, c share: 2048 bytes),
// "small" two 64-byte ones (each 256 aligned bytes: 512).

// REMARK: remark: workspace: 2048 bytes for 5 buffers (3584 bytes without reuse); per variant: big 2048, small 512
// CHECK-LABEL: moert.plan @per_variant
// CHECK-SAME: workspace_bytes = 2048
// CHECK-DAG: moert.alloc "x" {offset = 0 : i64}
// CHECK-DAG: moert.alloc "y" {offset = 256 : i64}
// CHECK: moert.variant "big" workspace_bytes = 2048 forward
// CHECK: moert.variant "small" workspace_bytes = 512 forward
moert.plan @per_variant attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %a = moert.alloc "a" : memref<16x16xf32>
  %b = moert.alloc "b" : memref<16x16xf32>
  %c = moert.alloc "c" : memref<16x16xf32>
  %x = moert.alloc "x" : memref<4x4xf32>
  %y = moert.alloc "y" : memref<4x4xf32>
  %offsets = moert.argument "expert_offsets" input : memref<2xi32>
  %rows = moert.argument "expert_rows" input : memref<1xi32>
  %w = moert.argument "w" input : memref<1x16x16xf32>
  %v = moert.argument "v" input : memref<1x4x4xf32>
  moert.variant "big" forward {
    moert.grouped_gemm ins(a = %a : memref<16x16xf32>, b = %w : memref<1x16x16xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %b : memref<16x16xf32>)
    moert.grouped_gemm ins(a = %b : memref<16x16xf32>, b = %w : memref<1x16x16xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %c : memref<16x16xf32>)
  } backward {
  }
  moert.variant "small" forward {
    moert.grouped_gemm ins(a = %x : memref<4x4xf32>, b = %v : memref<1x4x4xf32>, expert_offsets = %offsets : memref<2xi32>, expert_rows = %rows : memref<1xi32>) outs(c = %y : memref<4x4xf32>)
  } backward {
  }
}
