// RUN: not moe-opt %s --moe-multiversion="ranks=2 variants=r1x1" 2>&1 | FileCheck %s --check-prefix=SPELLING
// RUN: not moe-opt %s --moe-multiversion="ranks=2 variants=r-1d1" 2>&1 | FileCheck %s --check-prefix=SIGN
// RUN: not moe-opt %s --moe-multiversion="ranks=2 variants=r1d1,r1d1" 2>&1 | FileCheck %s --check-prefix=TWICE
// RUN: not moe-opt %s --moe-multiversion="ranks=2" 2>&1 | FileCheck %s --check-prefix=NONE

// [par-2]: the variants --moe-multiversion keeps.
// SPELLING: error: [par-2] variant 'r1x1' is not r<R>d<D>
// SIGN: error: [par-2] variant 'r-1d1' is not r<R>d<D>
// TWICE: error: [par-2] variant 'r1d1' is listed twice
// NONE: error: [par-2] name the variants to keep, e.g. variants=r1d1,r1d2,r0d1

func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x4xf32>, %w1: tensor<4x8x12xf32>, %w2: tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 2, capacity = #moe.capacity<fixed 1.0>} : (tensor<16x8xf32>, tensor<8x4xf32>, tensor<4x8x12xf32>, tensor<4x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>)
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
