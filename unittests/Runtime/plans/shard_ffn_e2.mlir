// Two FFN experts (silu, biases), top-1, bounded capacity: sharded over 4
// ranks by make_shard_plans.sh (s = 2), with bf16 tokens and weights.
func.func @shard_ffn_e2(%x: tensor<12x8xbf16>, %wg: tensor<8x2xf32>, %w1: tensor<2x8x8xbf16>, %w2: tensor<2x8x8xbf16>, %b1: tensor<2x8xbf16>, %b2: tensor<2x8xbf16>) -> (tensor<12x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<silu> %x, %wg, %w1, %w2 bias(%b1, %b2) {top_k = 1, capacity = #moe.capacity<bounded 1.5>} : (tensor<12x8xbf16>, tensor<8x2xf32>, tensor<2x8x8xbf16>, tensor<2x8x8xbf16>, tensor<2x8xbf16>, tensor<2x8xbf16>) -> (tensor<12x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<12x8xbf16>, tensor<f32>
}
