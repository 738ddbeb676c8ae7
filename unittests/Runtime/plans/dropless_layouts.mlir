// A small dropless layer for the per-variant workspaces (make_layout_plans.sh):
// d 16, h 32, E 8, top-2, 2048 tokens. Its padded layout batches E x T rows,
// its ragged and aligned ones about T x k: the padded variant needs several
// times the others' workspace.
func.func @dropless_layouts(%x: tensor<2048x16xf32>, %wg: tensor<16x8xf32>,
    %w1: tensor<8x16x32xf32>, %w2: tensor<8x32x16xf32>)
    -> (tensor<2048x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<2048x16xf32>, tensor<16x8xf32>, tensor<8x16x32xf32>,
         tensor<8x32x16xf32>) -> (tensor<2048x16xf32>, tensor<f32>)
  return %out, %aux : tensor<2048x16xf32>, tensor<f32>
}
