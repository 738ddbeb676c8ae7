// RUN: not moe-opt %s --moe-expand-layer --moe-parallelize="ranks=4 r=3" 2>&1 | FileCheck %s --check-prefix=NOT-DIVIDING
// RUN: not moe-opt %s --moe-expand-layer --moe-parallelize="ranks=8 r=3" 2>&1 | FileCheck %s --check-prefix=NOT-DIVIDING-4
// RUN: not moe-opt %s --moe-expand-layer --moe-parallelize="ranks=2 r=2" 2>&1 | FileCheck %s --check-prefix=WHOLE
// RUN: not moe-opt %s --moe-multiversion="ranks=4 variants=r2d1,r3d1" 2>&1 | FileCheck %s --check-prefix=NOT-DIVIDING
// RUN: not moe-opt %s --moe-multiversion="ranks=4 variants=r0d2" 2>&1 | FileCheck %s --check-prefix=PIPE

// [par-1] r must be 0 or divide s, the ranks that share each expert (here
// E = 2 experts: s = 2 on 4 ranks, s = 4 on 8, s = 1 on 2); every divisor
// of s is built (parallelize-sharded-groups.mlir).
// NOT-DIVIDING: error: 'func.func' op [par-1] r = 3 does not divide s = 2 (the ranks that share each expert, W / E for E < W, else 1); allowed: 0 or a divisor of s
// NOT-DIVIDING-4: error: 'func.func' op [par-1] r = 3 does not divide s = 4
// WHOLE: error: 'func.func' op [par-1] r = 2 does not divide s = 1
// PIPE: error: [pipe-1] variant 'r0d2': pipelining needs expert parallelism (r >= 1)

func.func @layer(%x: tensor<16x8xf32>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x12xf32>, %w2: tensor<2x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 {top_k = 1, capacity = #moe.capacity<fixed 1.0>} : (tensor<16x8xf32>, tensor<8x2xf32>, tensor<2x8x12xf32>, tensor<2x12x8xf32>) -> (tensor<16x8xf32>, tensor<f32>)
  return %out, %aux : tensor<16x8xf32>, tensor<f32>
}
