// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch))' | FileCheck %s --check-prefix=INFER
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch,moert-fuse-dispatch))' | FileCheck %s --check-prefix=TWICE

// --moert-fuse-dispatch: a ragged bf16/f16 variant whose dispatched rows only
// grouped GEMMs read as `a` gets a copy `<name>+gather` right after it, in
// which dispatch_rows writes the row -> token map and those GEMMs read x
// through it. The original stays first and untouched; the copy has its own
// buffers, named after it. Variants that do not qualify are left alone.

// The original variant, as the lowering wrote it.
// CHECK-LABEL: moert.plan @ragged_bf16
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<64x16xbf16>
// CHECK: %[[W1:.+]] = moert.argument "w1" input
// CHECK: %[[GRAD_W1:.+]] = moert.argument "grad_w1" grad_output
// CHECK: %[[D:.+]] = moert.alloc "dispatched" : memref<128x16xbf16>
// CHECK: moert.variant "single" forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// CHECK-NEXT: moert.dispatch ins(x = %[[X]] : {{.+}}) outs(dispatched = %[[D]] : memref<128x16xbf16>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[D]] : memref<128x16xbf16>, b = %[[W1]] : {{[^,]+}}, expert_offsets = %{{[^,]+}}, expert_rows = %{{[^)]+}}) outs(
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.activation_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[D]] : memref<128x16xbf16>, {{[^)]+}}) outs(grad_b = %[[GRAD_W1]] :
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// The copy's buffers: every one the original uses but D, and row_tokens.
// CHECK-NEXT: moert.alloc "single+gather.logits" : memref<64x4xf32>
// CHECK-NEXT: moert.alloc "single+gather.scores"
// CHECK-NEXT: moert.alloc "single+gather.indices"
// CHECK-NEXT: moert.alloc "single+gather.locations"
// CHECK-NEXT: moert.alloc "single+gather.gates"
// CHECK-NEXT: %[[CAP:.+]] = moert.alloc "single+gather.capacity" : memref<1xi32>
// CHECK-NEXT: %[[OFFSETS:.+]] = moert.alloc "single+gather.expert_offsets" : memref<5xi32>
// CHECK-NEXT: %[[ROWS:.+]] = moert.alloc "single+gather.expert_rows" : memref<4xi32>
// CHECK-NEXT: moert.alloc "single+gather.expert_out" : memref<128x16xbf16>
// CHECK-NEXT: %[[H:.+]] = moert.alloc "single+gather.hidden" : memref<128x32xbf16>
// CHECK-NEXT: %[[PRE:.+]] = moert.alloc "single+gather.hidden_pre"
// CHECK-NEXT: moert.alloc "single+gather.grad_expert_out"
// CHECK-NEXT: moert.alloc "single+gather.grad_gates"
// CHECK-NEXT: moert.alloc "single+gather.grad_dispatched" : memref<128x16xbf16>
// CHECK-NEXT: moert.alloc "single+gather.grad_logits"
// CHECK-NEXT: moert.alloc "single+gather.grad_hidden"
// CHECK-NEXT: %[[GRAD_PRE:.+]] = moert.alloc "single+gather.grad_hidden_pre" : memref<128x32xbf16>
// CHECK-NEXT: %[[RT:.+]] = moert.alloc "single+gather.row_tokens" : memref<128xi32>
// CHECK-NEXT: moert.variant "single+gather" forward {
// CHECK-NEXT: moert.router ins(x = %[[X]]
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// CHECK-NEXT: moert.dispatch_rows ins(indices = %{{.+}} : memref<64x2xi32>, locations = %{{.+}} : memref<64x2xi32>, capacity = %[[CAP]] : memref<1xi32>, expert_offsets = %[[OFFSETS]] : memref<5xi32>) outs(row_tokens = %[[RT]] : memref<128xi32>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[X]] : memref<64x16xbf16>, b = %[[W1]] : memref<4x16x32xbf16>, expert_offsets = %[[OFFSETS]] : memref<5xi32>, expert_rows = %[[ROWS]] : memref<4xi32>, row_tokens = %[[RT]] : memref<128xi32>) outs(c = %[[H]] : memref<128x32xbf16>, pre = %[[PRE]] : memref<128x32xbf16>) {epilogue = #moe<activation gelu>}
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[H]] : {{[^)]+}}) outs(
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[H]] : {{[^)]+}}) outs(
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.activation_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[X]] : memref<64x16xbf16>, grad_c = %[[GRAD_PRE]] : memref<128x32xbf16>, expert_offsets = %[[OFFSETS]] : memref<5xi32>, expert_rows = %[[ROWS]] : memref<4xi32>, row_tokens = %[[RT]] : memref<128xi32>) outs(grad_b = %[[GRAD_W1]] : memref<4x16x32xbf16>)
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// CHECK-NEXT: }

// Inference: forward only, no backward buffers copied.
// INFER-LABEL: moert.plan @ragged_bf16
// INFER: %[[X:.+]] = moert.argument "x" input
// INFER: %[[D:.+]] = moert.alloc "dispatched"
// INFER: moert.variant "single" forward {
// INFER: moert.dispatch ins(x = %[[X]] : {{.+}}) outs(dispatched = %[[D]] :
// INFER-NEXT: moert.grouped_gemm ins(a = %[[D]] :
// INFER: } backward {
// INFER-NEXT: }
// INFER-NEXT: moert.alloc "single+gather.logits"
// INFER-NOT: grad
// INFER: moert.alloc "single+gather.hidden"
// INFER-NEXT: %[[RT:.+]] = moert.alloc "single+gather.row_tokens" : memref<128xi32>
// INFER-NEXT: moert.variant "single+gather" forward {
// INFER-NEXT: moert.router
// INFER-NEXT: moert.gate
// INFER-NEXT: moert.dispatch_rows {{.+}} outs(row_tokens = %[[RT]] : memref<128xi32>)
// INFER-NEXT: moert.grouped_gemm ins(a = %[[X]] : {{.+}}, row_tokens = %[[RT]] : memref<128xi32>) outs(
// INFER-NEXT: moert.grouped_gemm
// INFER-NEXT: moert.combine
// INFER-NEXT: } backward {
// INFER-NEXT: }
// INFER-NEXT: }

// REMARK: remark: variant 'single' fused as 'single+gather': dispatch_rows, and the grouped GEMMs read 'x' through 'single+gather.row_tokens'

// Run twice, the pass adds one copy: the copy does not qualify (no
// dispatch) and the original's copy exists.
// TWICE-LABEL: moert.plan @ragged_bf16
// TWICE: moert.variant "single" forward
// TWICE: moert.variant "single+gather" forward
// TWICE-NOT: moert.variant

// GELU: its backward reads `pre`, which the copy writes too (a ReLU's
// reads its output and keeps none).
func.func @ragged_bf16(%x: tensor<64x16xbf16>, %wg: tensor<16x4xbf16>,
                       %w1: tensor<4x16x32xbf16>, %w2: tensor<4x32x16xbf16>)
    -> (tensor<64x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xbf16>, tensor<16x4xbf16>, tensor<4x16x32xbf16>,
         tensor<4x32x16xbf16>) -> (tensor<64x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x16xbf16>, tensor<f32>
}

// -----

// Gated f16, bounded (ragged): both up-projections read x through
// row_tokens, and both of their weight gradients; R = min(E * C, T * k) =
// min(4 * 20, 64) = 64.
// CHECK-LABEL: moert.plan @gated_f16
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<32x8xf16>
// CHECK: %[[D:.+]] = moert.alloc "dispatched" : memref<64x8xf16>
// CHECK: moert.variant "single" forward {
// CHECK: moert.dispatch {{.+}} outs(dispatched = %[[D]] :
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[D]] :
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[D]] :
// CHECK: } backward {
// CHECK: moert.glu_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[D]] :
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[D]] :
// CHECK: %[[RT:.+]] = moert.alloc "single+gather.row_tokens" : memref<64xi32>
// CHECK-NEXT: moert.variant "single+gather" forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate
// CHECK-NEXT: moert.dispatch_rows {{.+}} outs(row_tokens = %[[RT]] : memref<64xi32>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[X]] : memref<32x8xf16>, {{.+}}, row_tokens = %[[RT]] : memref<64xi32>) outs(c = %{{.+}} : memref<64x16xf16>)
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[X]] : memref<32x8xf16>, {{.+}}, row_tokens = %[[RT]] : memref<64xi32>) outs(c = %{{.+}} : memref<64x16xf16>)
// CHECK-NEXT: moert.glu
// CHECK-NEXT: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<64x16xf16>, {{[^)]+}}) outs(
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %{{[^ ]+}} : memref<64x16xf16>, {{[^)]+}}) outs(
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[X]] : memref<32x8xf16>, {{.+}}, row_tokens = %[[RT]] : memref<64xi32>) outs(
// CHECK-NEXT: moert.grouped_gemm_wgrad ins(a = %[[X]] : memref<32x8xf16>, {{.+}}, row_tokens = %[[RT]] : memref<64xi32>) outs(
// CHECK-NEXT: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<64x16xf16>, {{[^)]+}}) outs(
// CHECK-NEXT: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<64x16xf16>, {{[^)]+}}) outs(
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// CHECK-NEXT: }

// REMARK: remark: variant 'single' fused as 'single+gather'

// TWICE-LABEL: moert.plan @gated_f16
// TWICE: moert.variant "single" forward
// TWICE: moert.variant "single+gather" forward
// TWICE-NOT: moert.variant
// TWICE-LABEL: moert.plan @padded

func.func @gated_f16(%x: tensor<32x8xf16>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xf16>, %w2: tensor<4x16x8xf16>,
                     %w3: tensor<4x8x16xf16>)
    -> (tensor<32x8xf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<bounded 1.25>}
      : (tensor<32x8xf16>, tensor<8x4xf32>, tensor<4x8x16xf16>,
         tensor<4x16x8xf16>, tensor<4x8x16xf16>) -> (tensor<32x8xf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xf16>, tensor<f32>
}

// -----

// Not fused: a fixed capacity is laid out padded.
// CHECK-LABEL: moert.plan @padded
// CHECK: moert.variant "single" forward {
// CHECK: moert.dispatch
// CHECK-NOT: dispatch_rows
// CHECK-NOT: row_tokens
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'single' not fused: its gate's layout is padded, not ragged

func.func @padded(%x: tensor<64x16xbf16>, %wg: tensor<16x4xbf16>,
                  %w1: tensor<4x16x32xbf16>, %w2: tensor<4x32x16xbf16>)
    -> (tensor<64x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<64x16xbf16>, tensor<16x4xbf16>, tensor<4x16x32xbf16>,
         tensor<4x32x16xbf16>) -> (tensor<64x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x16xbf16>, tensor<f32>
}

// -----

// Not fused: f32 rows.
// CHECK-LABEL: moert.plan @f32
// CHECK: moert.variant "single" forward {
// CHECK-NOT: row_tokens
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'single' not fused: the dispatched rows are f32; the gather needs bf16 or f16

func.func @f32(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
               %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>) -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}

// -----

// Not fused: K = d = 12 is not a multiple of 8.
// CHECK-LABEL: moert.plan @k_not_multiple_of_8
// CHECK: moert.variant "single" forward {
// CHECK-NOT: row_tokens
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'single' not fused: the dispatched rows have K = 12 columns, not a multiple of 8

func.func @k_not_multiple_of_8(%x: tensor<64x12xbf16>, %wg: tensor<12x4xbf16>,
                               %w1: tensor<4x12x32xbf16>, %w2: tensor<4x32x12xbf16>)
    -> (tensor<64x12xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<64x12xbf16>, tensor<12x4xbf16>, tensor<4x12x32xbf16>,
         tensor<4x32x12xbf16>) -> (tensor<64x12xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x12xbf16>, tensor<f32>
}

// -----

// Not fused: fc1 reading the rows has N = h = 12, not a multiple of 8.
// CHECK-LABEL: moert.plan @n_not_multiple_of_8
// CHECK: moert.variant "single" forward {
// CHECK-NOT: row_tokens
// CHECK-NOT: moert.variant
// REMARK: remark: variant 'single' not fused: moert.grouped_gemm reading the dispatched rows has N = 12 columns, not a multiple of 8

func.func @n_not_multiple_of_8(%x: tensor<64x16xbf16>, %wg: tensor<16x4xbf16>,
                               %w1: tensor<4x16x12xbf16>, %w2: tensor<4x12x16xbf16>)
    -> (tensor<64x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<64x16xbf16>, tensor<16x4xbf16>, tensor<4x16x12xbf16>,
         tensor<4x12x16xbf16>) -> (tensor<64x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x16xbf16>, tensor<f32>
}
