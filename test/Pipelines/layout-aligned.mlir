// RUN: moe-opt %s --split-input-file --moe-lower-to-plan="training=true layout=aligned" | FileCheck %s
// RUN: moe-opt %s --split-input-file --moe-lower-to-plan="layouts=padded,ragged,aligned" | FileCheck %s --check-prefix=THREE
// RUN: not moe-opt %s --split-input-file --moe-lower-to-plan="layout=blocked" 2>&1 | FileCheck %s --check-prefix=BAD

// The aligned layout: ragged rows with every expert's first row a multiple
// of 128, so a GPU batches the GEMMs over 128-row blocks sized on the device.
// Its buffers hold every block the rows can need: the kept rows with each
// expert's rounded up, min(128 * floor((R + E * 127) / 128), E * C rounded
// up to 128), R = min(T * k, E * C).

// T 64, k 2, E 4, dropless (C = T): R = 128, floor((128 + 508) / 128) = 4
// blocks, and E * 128 = 512 too.
// CHECK-LABEL: moert.plan @dropless
// CHECK: moert.alloc "dispatched" {{.+}} : memref<512x16xf32>
// CHECK: moert.variant "single" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate {{.+}}layout = #moert<layout aligned>
// CHECK-NEXT: moert.dispatch {{.+}}dispatched = %{{.+}} : memref<512x16xf32>
// CHECK: } backward {
// CHECK: moert.grouped_gemm_wgrad

// THREE-LABEL: moert.plan @dropless
// THREE: moert.alloc "ragged.dispatched" {{.+}} : memref<128x16xf32>
// THREE: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// THREE: moert.alloc "padded.dispatched" {{.+}} : memref<256x16xf32>
// THREE: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// THREE: moert.alloc "aligned.dispatched" {{.+}} : memref<512x16xf32>
// THREE: moert.variant "aligned" workspace_bytes = {{[0-9]+}} forward {
// THREE-NEXT: moert.router
// THREE-NEXT: moert.gate {{.+}}layout = #moert<layout aligned>

// BAD: error: [plan-3] layout must be auto, padded, ragged or aligned, got 'blocked'

func.func @dropless(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
                    %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>) -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}

// -----

// Many small experts: T 1024, k 6, E 64, dropless: R = 6144 and
// floor((6144 + 64 * 127) / 128) = 111 blocks (14208 rows; 64 * 128 * 8 for
// E * C is larger).
// CHECK-LABEL: moert.plan @many
// CHECK: moert.alloc "dispatched" {{.+}} : memref<14208x16xbf16>

// A fixed capacity C = 2 * int(1.0 * 16) = 32 per expert: E * C = 2048
// kept rows at most, each expert's rounded up to 128: E * 128 = 8192 rows,
// fewer than the 79 blocks the kept rows alone allow ((2048 + 64 * 127) /
// 128).
// CHECK-LABEL: moert.plan @fixed
// CHECK: moert.alloc "dispatched" {{.+}} : memref<8192x16xbf16>
func.func @many(%x: tensor<1024x16xbf16>, %wg: tensor<16x64xf32>,
                %w1: tensor<64x16x32xbf16>, %w2: tensor<64x32x16xbf16>)
    -> (tensor<1024x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 6, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<1024x16xbf16>, tensor<16x64xf32>, tensor<64x16x32xbf16>,
         tensor<64x32x16xbf16>) -> (tensor<1024x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<1024x16xbf16>, tensor<f32>
}

func.func @fixed(%x: tensor<1024x16xbf16>, %wg: tensor<16x64xf32>,
                 %w1: tensor<64x16x32xbf16>, %w2: tensor<64x32x16xbf16>)
    -> (tensor<1024x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
      : (tensor<1024x16xbf16>, tensor<16x64xf32>, tensor<64x16x32xbf16>,
         tensor<64x32x16xbf16>) -> (tensor<1024x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<1024x16xbf16>, tensor<f32>
}
