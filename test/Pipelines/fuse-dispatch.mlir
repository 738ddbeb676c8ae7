// RUN: moe-opt %s --moe-lower-to-plan="training=true layouts=padded,ragged fuse-dispatch=true" | FileCheck %s
// RUN: moe-opt %s --moe-lower-to-plan="training=true layouts=padded,ragged fuse-dispatch=false" | FileCheck %s --check-prefix=OFF

// --moe-lower-to-plan="fuse-dispatch=true" runs --moert-fuse-dispatch before
// the memory plan: of the layout variants, the ragged one gets its
// gather-fused copy (`ragged+gather`, buffers prefixed so) after every
// variant the plan had, so their indices stay; the padded one gets none;
// every buffer, the copy's included, is placed.

// CHECK-LABEL: moert.plan @dropless
// CHECK-SAME: workspace_bytes =
// CHECK: moert.alloc "ragged.dispatched" {offset = {{[0-9]+}} : i64} : memref<128x16xbf16>
// CHECK: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// CHECK: moert.dispatch ins
// CHECK: moert.alloc "padded.dispatched" {offset = {{[0-9]+}} : i64} : memref<256x16xbf16>
// CHECK: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NOT: row_tokens
// CHECK: moert.alloc "ragged+gather.logits" {offset = {{[0-9]+}} : i64}
// CHECK-NOT: ragged+gather.dispatched
// CHECK: moert.alloc "ragged+gather.row_tokens" {offset = {{[0-9]+}} : i64} : memref<128xi32>
// CHECK-NEXT: moert.variant "ragged+gather" workspace_bytes = {{[0-9]+}} forward {
// CHECK-NEXT: moert.router
// CHECK-NEXT: moert.gate
// CHECK-NEXT: moert.dispatch_rows
// CHECK-NOT: moert.variant

// OFF-LABEL: moert.plan @dropless
// OFF: moert.variant "ragged" workspace_bytes = {{[0-9]+}} forward {
// OFF-NOT: row_tokens
// OFF: moert.variant "padded" workspace_bytes = {{[0-9]+}} forward {
// OFF-NOT: row_tokens
// OFF-NOT: moert.variant

func.func @dropless(%x: tensor<64x16xbf16>, %wg: tensor<16x4xbf16>,
                    %w1: tensor<4x16x32xbf16>, %w2: tensor<4x32x16xbf16>)
    -> (tensor<64x16xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xbf16>, tensor<16x4xbf16>, tensor<4x16x32xbf16>,
         tensor<4x32x16xbf16>) -> (tensor<64x16xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x16xbf16>, tensor<f32>
}
