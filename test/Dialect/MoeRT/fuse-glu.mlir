// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu))' | FileCheck %s --check-prefix=INFER
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch,moert-fuse-glu))' | FileCheck %s --check-prefix=GATHER
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=INFER-REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-glu,moert-fuse-glu))' | FileCheck %s --check-prefix=TWICE

// --moert-fuse-glu: a variant whose forward computes a gated expert's first
// layer as grouped_gemm (w1) -> gate, grouped_gemm (w3) -> up, glu gets a
// copy `<name>+glu` after the plan's variants, in which the three are one
// grouped_gemm_glu. Training keeps gate_in / up_in for glu_backward;
// inference writes neither, and the copy has no buffer for them. The
// original stays first and untouched. Variants that do not qualify are
// left alone.

// Training: the fused step writes gate_in and up_in, which glu_backward
// reads; every buffer of the original is copied.
// CHECK-LABEL: moert.plan @gated_bf16
// CHECK: %[[W1:.+]] = moert.argument "w1" input : memref<4x8x16xbf16>
// CHECK: %[[W3:.+]] = moert.argument "w3" input : memref<4x8x16xbf16>
// CHECK: %[[GATE0:.+]] = moert.alloc "gate_proj"
// CHECK: moert.variant "single" forward {
// CHECK: moert.dispatch
// CHECK-NEXT: moert.grouped_gemm ins({{.+}}) outs(c = %[[GATE0]] :
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu ins(gate_in = %[[GATE0]] :
// CHECK: } backward {
// CHECK: moert.glu_backward ins(gate_in = %[[GATE0]] :
// CHECK: %[[OFFSETS:.+]] = moert.alloc "single+glu.expert_offsets" : memref<5xi32>
// CHECK-NEXT: %[[ROWS:.+]] = moert.alloc "single+glu.expert_rows" : memref<4xi32>
// CHECK-NEXT: %[[D:.+]] = moert.alloc "single+glu.dispatched" : memref<64x8xbf16>
// CHECK-NEXT: moert.alloc "single+glu.expert_out"
// CHECK-NEXT: %[[H:.+]] = moert.alloc "single+glu.hidden" : memref<64x16xbf16>
// CHECK-NEXT: %[[GATE:.+]] = moert.alloc "single+glu.gate_proj" : memref<64x16xbf16>
// CHECK-NEXT: %[[UP:.+]] = moert.alloc "single+glu.up_proj" : memref<64x16xbf16>
// CHECK: moert.variant "single+glu" forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate
// CHECK-NEXT: moert.dispatch {{.+}} outs(dispatched = %[[D]] :
// CHECK-NEXT: moert.grouped_gemm_glu ins(a = %[[D]] : memref<64x8xbf16>, b = %[[W1]] : memref<4x8x16xbf16>, b_up = %[[W3]] : memref<4x8x16xbf16>, expert_offsets = %[[OFFSETS]] : memref<5xi32>, expert_rows = %[[ROWS]] : memref<4xi32>) outs(c = %[[H]] : memref<64x16xbf16>, gate_in = %[[GATE]] : memref<64x16xbf16>, up_in = %[[UP]] : memref<64x16xbf16>){{$}}
// CHECK-NEXT: moert.grouped_gemm ins(a = %[[H]] :
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu_backward ins(gate_in = %[[GATE]] : memref<64x16xbf16>, up_in = %[[UP]] : memref<64x16xbf16>,
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward
// CHECK-NEXT: moert.router_backward
// CHECK-NEXT: }
// CHECK-NEXT: }

// Inference: no gate_in / up_in, and no buffers for them in the copy.
// INFER-LABEL: moert.plan @gated_bf16
// INFER: moert.alloc "gate_proj"
// INFER: moert.variant "single" forward {
// INFER: moert.glu
// INFER: } backward {
// INFER-NEXT: }
// INFER-NEXT: moert.alloc "single+glu.logits"
// INFER-NOT: single+glu.gate_proj
// INFER-NOT: single+glu.up_proj
// INFER: %[[H:.+]] = moert.alloc "single+glu.hidden" : memref<64x16xbf16>
// INFER-NEXT: moert.variant "single+glu" forward {
// INFER-NEXT: moert.router
// INFER-NEXT: moert.gate
// INFER-NEXT: moert.dispatch
// INFER-NEXT: moert.grouped_gemm_glu ins({{.+}}) outs(c = %[[H]] : memref<64x16xbf16>){{$}}
// INFER-NEXT: moert.grouped_gemm ins(a = %[[H]] :
// INFER-NEXT: moert.combine
// INFER-NEXT: } backward {
// INFER-NEXT: }
// INFER-NEXT: }

// After --moert-fuse-dispatch: `single+gather` is fused too, its fused step
// reading x through row_tokens; the variants keep their order, the new ones
// last.
// GATHER-LABEL: moert.plan @gated_bf16
// GATHER: %[[X:.+]] = moert.argument "x" input : memref<32x8xbf16>
// GATHER: moert.variant "single" forward {
// GATHER: moert.variant "single+gather" forward {
// GATHER: moert.variant "single+glu" forward {
// GATHER: moert.grouped_gemm_glu ins(a = %{{[^ ]+}} : memref<64x8xbf16>, {{.+}}, expert_rows = %{{[^ ]+}} : memref<4xi32>) outs(
// GATHER: %[[RT:.+]] = moert.alloc "single+gather+glu.row_tokens" : memref<64xi32>
// GATHER-NEXT: moert.variant "single+gather+glu" forward {
// GATHER-NEXT: moert.router
// GATHER-NEXT: moert.gate
// GATHER-NEXT: moert.dispatch_rows {{.+}} outs(row_tokens = %[[RT]] : memref<64xi32>)
// GATHER-NEXT: moert.grouped_gemm_glu ins(a = %[[X]] : memref<32x8xbf16>, {{.+}}, row_tokens = %[[RT]] : memref<64xi32>) outs(c = %{{[^ ]+}} : memref<64x16xbf16>, gate_in = %{{[^ ]+}} : memref<64x16xbf16>, up_in = %{{[^ ]+}} : memref<64x16xbf16>)
// GATHER-NEXT: moert.grouped_gemm
// GATHER-NEXT: moert.combine
// GATHER: moert.glu_backward
// GATHER-NOT: moert.variant
// GATHER-LABEL: moert.plan @gated_padded_f16

// REMARK: remark: variant 'single' fused as 'single+glu': 1 grouped_gemm_glu step, writing gate_in and up_in for the steps that read them
// INFER-REMARK: remark: variant 'single' fused as 'single+glu': 1 grouped_gemm_glu step, gate_in and up_in not written

// Run twice, the pass adds one copy: the copy has no glu left and the
// original's copy exists.
// TWICE-LABEL: moert.plan @gated_bf16
// TWICE: moert.variant "single" forward
// TWICE: moert.variant "single+glu" forward
// TWICE-NOT: moert.variant

func.func @gated_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                      %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                      %w3: tensor<4x8x16xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x8x16xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

// -----

// A fixed capacity (the padded layout, which --moert-fuse-dispatch leaves
// alone) and f16: fused all the same.
// CHECK-LABEL: moert.plan @gated_padded_f16
// TWICE-LABEL: moert.plan @gated_padded_f16
// CHECK: moert.variant "single" forward {
// CHECK: moert.variant "single+glu" forward {
// CHECK: moert.grouped_gemm_glu {{.+}} outs(c = %{{[^ ]+}} : memref<64x16xf16>, gate_in = %{{[^ ]+}} : memref<64x16xf16>, up_in = %{{[^ ]+}} : memref<64x16xf16>)
// CHECK-NOT: moert.variant
// INFER-LABEL: moert.plan @gated_padded_f16
// INFER: moert.variant "single+glu" forward {
// INFER: moert.grouped_gemm_glu {{.+}} outs(c = %{{[^ ]+}} : memref<64x16xf16>){{$}}
// GATHER: moert.variant "single" forward {
// GATHER: moert.variant "single+glu" forward {
// GATHER-NOT: moert.variant
// REMARK: remark: variant 'single' fused as 'single+glu': 1 grouped_gemm_glu step, writing gate_in and up_in for the steps that read them

func.func @gated_padded_f16(%x: tensor<32x8xf16>, %wg: tensor<8x4xf32>,
                            %w1: tensor<4x8x16xf16>, %w2: tensor<4x16x8xf16>,
                            %w3: tensor<4x8x16xf16>)
    -> (tensor<32x8xf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<32x8xf16>, tensor<8x4xf32>, tensor<4x8x16xf16>,
         tensor<4x16x8xf16>, tensor<4x8x16xf16>) -> (tensor<32x8xf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xf16>, tensor<f32>
}

// -----

// Not fused: an FFN expert has no glu.
// CHECK-LABEL: moert.plan @ffn
// GATHER-LABEL: moert.plan @ffn
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'single' not fused: its forward has no glu step

func.func @ffn(%x: tensor<32x8xbf16>, %wg: tensor<8x4xbf16>,
               %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<silu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xbf16>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

// -----

// Not fused: f32.
// CHECK-LABEL: moert.plan @gated_f32
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'single' not fused: its operands are f32; the fused step needs bf16 or f16

func.func @gated_f32(%x: tensor<32x8xf32>, %wg: tensor<8x4xf32>,
                     %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>,
                     %w3: tensor<4x8x16xf32>)
    -> (tensor<32x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>,
         tensor<4x16x8xf32>, tensor<4x8x16xf32>) -> (tensor<32x8xf32>, tensor<f32>)
  return %out, %aux : tensor<32x8xf32>, tensor<f32>
}

// -----

// Not fused: K = d = 12 is not a multiple of 8.
// CHECK-LABEL: moert.plan @k_not_multiple_of_8
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'single' not fused: its GEMMs have K = 12, not a multiple of 8

func.func @k_not_multiple_of_8(%x: tensor<32x12xbf16>, %wg: tensor<12x4xf32>,
                               %w1: tensor<4x12x16xbf16>, %w2: tensor<4x16x12xbf16>,
                               %w3: tensor<4x12x16xbf16>)
    -> (tensor<32x12xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x12xbf16>, tensor<12x4xf32>, tensor<4x12x16xbf16>,
         tensor<4x16x12xbf16>, tensor<4x12x16xbf16>) -> (tensor<32x12xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x12xbf16>, tensor<f32>
}

// -----

// Not fused: N = h = 12 is not a multiple of 8.
// CHECK-LABEL: moert.plan @n_not_multiple_of_8
// CHECK-NOT: grouped_gemm_glu
// CHECK-NOT: +glu
// REMARK: remark: variant 'single' not fused: it has N = 12, not a multiple of 8

func.func @n_not_multiple_of_8(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                               %w1: tensor<4x8x12xbf16>, %w2: tensor<4x12x8xbf16>,
                               %w3: tensor<4x8x12xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x12xbf16>,
         tensor<4x12x8xbf16>, tensor<4x8x12xbf16>) -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}
