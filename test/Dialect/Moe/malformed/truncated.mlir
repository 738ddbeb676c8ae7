// RUN: not moe-opt %s 2>&1 | FileCheck %s
// RUN: head -c 600 %s | not moe-opt 2>&1 | FileCheck %s --check-prefix=MID

// A file cut off in the middle of a layer is a parse error, not a crash.
// MID: error:

// CHECK: error: expected
func.func @cut(%x: tensor<64x8xf32>, %wg: tensor<8x4xf32>,
               %w1: tensor<4x8x16xf32>, %w2: tensor<4x16x8xf32>) -> (tensor<64x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>}
      : (tensor<64x8xf32>, tensor<8x4xf32>, tensor<4x16x8xf32>
