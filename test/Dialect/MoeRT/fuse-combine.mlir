// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-combine))' | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch,moert-fuse-combine))' | FileCheck %s --check-prefix=GATHER
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert="training=true" | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-combine))' | FileCheck %s --check-prefix=TRAIN
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-dispatch,moert-fuse-combine{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --moe-expand-layer --canonicalize --convert-moe-to-moert | moe-opt --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-combine,moert-fuse-combine))' | FileCheck %s --check-prefix=TWICE

// --moert-fuse-combine: a variant whose forward computes every expert row
// with one grouped_gemm (hidden, w2) -> expert_out and then combines them
// into out gets a copy `<name>+combine` after the plan's variants, in which
// the two are one grouped_gemm_combine in the combine's place, with the
// GEMM's bias and epilogue. The copy still writes expert_out (a training
// plan's combine_backward reads it). The original stays first and
// untouched; variants that do not qualify are left alone, with a remark.

// CHECK-LABEL: moert.plan @relu_bias_bf16
// CHECK: %[[W2:.+]] = moert.argument "w2" input : memref<4x16x8xbf16>
// CHECK: %[[B2:.+]] = moert.argument "b2" input : memref<4x8xbf16>
// CHECK: %[[OUT:.+]] = moert.argument "out" output : memref<32x8xbf16>
// CHECK: moert.variant "single" forward {
// CHECK: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<64x16xbf16>, b = %[[W2]]
// CHECK-NEXT: moert.combine
// CHECK: %[[IDX:.+]] = moert.alloc "single+combine.indices" : memref<32x2xi32>
// CHECK-NEXT: %[[LOC:.+]] = moert.alloc "single+combine.locations" : memref<32x2xi32>
// CHECK-NEXT: %[[G:.+]] = moert.alloc "single+combine.gates" : memref<32x2xf32>
// CHECK-NEXT: %[[CAP:.+]] = moert.alloc "single+combine.capacity" : memref<1xi32>
// CHECK-NEXT: %[[OFF:.+]] = moert.alloc "single+combine.expert_offsets" : memref<5xi32>
// CHECK-NEXT: %[[ROWS:.+]] = moert.alloc "single+combine.expert_rows" : memref<4xi32>
// CHECK: %[[EO:.+]] = moert.alloc "single+combine.expert_out" : memref<64x8xbf16>
// CHECK-NEXT: %[[H:.+]] = moert.alloc "single+combine.hidden" : memref<64x16xbf16>
// CHECK: moert.variant "single+combine" forward {
// CHECK: moert.grouped_gemm ins({{.+}}) outs(c = %[[H]] : memref<64x16xbf16>) {epilogue = #moe<activation relu>}
// CHECK-NEXT: moert.grouped_gemm_combine ins(a = %[[H]] : memref<64x16xbf16>, b = %[[W2]] : memref<4x16x8xbf16>, bias = %[[B2]] : memref<4x8xbf16>, expert_offsets = %[[OFF]] : memref<5xi32>, expert_rows = %[[ROWS]] : memref<4xi32>, indices = %[[IDX]] : memref<32x2xi32>, locations = %[[LOC]] : memref<32x2xi32>, gates = %[[G]] : memref<32x2xf32>, capacity = %[[CAP]] : memref<1xi32>) outs(c = %[[EO]] : memref<64x8xbf16>, out = %[[OUT]] : memref<32x8xbf16>)
// CHECK-NEXT: } backward {
// CHECK-NEXT: }
// CHECK-NEXT: }

// After --moert-fuse-dispatch: `single+gather` is fused too, taking its
// dispatch_rows' row_tokens, after every variant the plan had.
// GATHER-LABEL: moert.plan @relu_bias_bf16
// GATHER: moert.variant "single" forward {
// GATHER: moert.variant "single+gather" forward {
// GATHER: moert.variant "single+combine" forward {
// GATHER-NOT: row_tokens
// GATHER: moert.grouped_gemm_combine
// GATHER: moert.variant "single+gather+combine" forward {
// GATHER: moert.dispatch_rows {{.+}} outs(row_tokens = %[[RT:[^ ]+]] : memref<64xi32>)
// GATHER: moert.grouped_gemm_combine ins({{.+}}, row_tokens = %[[RT]] : memref<64xi32>, {{.+}})
// GATHER-NOT: moert.combine
// GATHER-NOT: moert.variant

// REMARK: remark: variant 'single' fused as 'single+combine': 1 grouped_gemm_combine step{{$}}
// REMARK: remark: variant 'single+gather' fused as 'single+gather+combine': 1 grouped_gemm_combine step (with the variant's row_tokens)

// TWICE-LABEL: moert.plan @relu_bias_bf16
// TWICE: moert.variant "single" forward {
// TWICE: moert.variant "single+combine" forward {
// TWICE-NOT: moert.variant

func.func @relu_bias_bf16(%x: tensor<32x8xbf16>, %wg: tensor<8x4xf32>,
                          %w1: tensor<4x8x16xbf16>, %w2: tensor<4x16x8xbf16>,
                          %b1: tensor<4x16xbf16>, %b2: tensor<4x8xbf16>)
    -> (tensor<32x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xbf16>, tensor<8x4xf32>, tensor<4x8x16xbf16>,
         tensor<4x16x8xbf16>, tensor<4x16xbf16>, tensor<4x8xbf16>)
      -> (tensor<32x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xbf16>, tensor<f32>
}

// -----

// A gated layer at a fixed capacity (padded), trained: the fused step keeps
// writing expert_out, which combine_backward reads.
// CHECK-LABEL: moert.plan @swiglu_f16_padded
// CHECK: moert.variant "single+combine" forward {
// CHECK: moert.grouped_gemm_combine {{.+}} outs(c = %{{[^ ]+}} : memref<64x8xf16>, out = %{{[^ ]+}} : memref<32x8xf16>)
// CHECK-NOT: moert.combine
// TRAIN-LABEL: moert.plan @swiglu_f16_padded
// TRAIN: moert.variant "single+combine" forward {
// TRAIN: moert.grouped_gemm_combine {{.+}} outs(c = %[[EO:[^ ]+]] : memref<64x8xf16>, out = {{.+}})
// TRAIN: } backward {
// TRAIN-NEXT: moert.combine_backward ins(grad_out = %{{[^ ]+}} : memref<32x8xf16>, expert_out = %[[EO]] : memref<64x8xf16>,
// GATHER-LABEL: moert.plan @swiglu_f16_padded
// REMARK: remark: variant 'single' fused as 'single+combine': 1 grouped_gemm_combine step{{$}}
// TWICE-LABEL: moert.plan @swiglu_f16_padded

func.func @swiglu_f16_padded(%x: tensor<32x8xf16>, %wg: tensor<8x4xf32>,
                             %w1: tensor<4x8x16xf16>, %w2: tensor<4x16x8xf16>,
                             %w3: tensor<4x8x16xf16>)
    -> (tensor<32x8xf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<32x8xf16>, tensor<8x4xf32>, tensor<4x8x16xf16>,
         tensor<4x16x8xf16>, tensor<4x8x16xf16>)
      -> (tensor<32x8xf16>, tensor<f32>)
  return %out, %aux : tensor<32x8xf16>, tensor<f32>
}

// -----

// Left alone: f32 (the fused kernels are bf16/f16), d not a multiple of 8.
// CHECK-LABEL: moert.plan @relu_f32
// CHECK-NOT: +combine
// REMARK: remark: variant 'single' not fused: its rows are f32; the fused step needs bf16 or f16

func.func @relu_f32(%x: tensor<32x8xf32>, %wg: tensor<8x4xf32>,
                    %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>)
    -> (tensor<32x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x8xf32>, tensor<8x4xf32>, tensor<4x8x16xf32>,
         tensor<4x16x8xf32>) -> (tensor<32x8xf32>, tensor<f32>)
  return %out, %aux : tensor<32x8xf32>, tensor<f32>
}

// -----

// CHECK-LABEL: moert.plan @relu_d12
// CHECK-NOT: +combine
// REMARK: remark: variant 'single' not fused: the GEMM has K = 16 and d = 12; both must be multiples of 8

func.func @relu_d12(%x: tensor<32x12xbf16>, %wg: tensor<12x4xf32>,
                    %w1: tensor<4x12x16xbf16>, %w2: tensor<4x16x12xbf16>)
    -> (tensor<32x12xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<32x12xbf16>, tensor<12x4xf32>, tensor<4x12x16xbf16>,
         tensor<4x16x12xbf16>) -> (tensor<32x12xbf16>, tensor<f32>)
  return %out, %aux : tensor<32x12xbf16>, tensor<f32>
}
