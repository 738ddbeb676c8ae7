// One FFN expert (gelu, biases), fixed capacity: sharded over W ranks by
// make_shard_plans.sh (s = W).
func.func @shard_ffn_e1(%x: tensor<12x8xf32>, %wg: tensor<8x1xf32>, %w1: tensor<1x8x12xf32>, %w2: tensor<1x12x8xf32>, %b1: tensor<1x12xf32>, %b2: tensor<1x8xf32>) -> (tensor<12x8xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2) {top_k = 1, capacity = #moe.capacity<fixed 1.0>} : (tensor<12x8xf32>, tensor<8x1xf32>, tensor<1x8x12xf32>, tensor<1x12x8xf32>, tensor<1x12xf32>, tensor<1x8xf32>) -> (tensor<12x8xf32>, tensor<f32>)
  return %out, %aux : tensor<12x8xf32>, tensor<f32>
}
