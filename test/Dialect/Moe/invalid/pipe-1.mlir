// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [pipe-1]: the pipelining degree D divides the capacity.

func.func @pipe_1_op(%d: tensor<4x8x4xf32>) {
  // expected-error @+1 {{[pipe-1] 3 chunks must divide the capacity 8}}
  %a, %b, %c = moe.all_to_all dispatch %d {ranks = 2 : i64} : tensor<4x8x4xf32> -> tensor<2x4x4xf32>, tensor<2x4x4xf32>, tensor<2x4x4xf32>
  return
}
