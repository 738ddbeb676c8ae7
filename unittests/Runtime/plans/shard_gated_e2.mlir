// Two SwiGLU experts, top-2, dropless, batch-prioritized: sharded over 4
// ranks by make_shard_plans.sh (s = 2).
func.func @shard_gated_e2(%x: tensor<10x6xf32>, %wg: tensor<6x2xf32>, %w1: tensor<2x6x8xf32>, %w2: tensor<2x8x6xf32>, %w3: tensor<2x6x8xf32>) -> (tensor<10x6xf32>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3) {top_k = 2, capacity = #moe.capacity<dropless>, normalize, batch_prioritized} : (tensor<10x6xf32>, tensor<6x2xf32>, tensor<2x6x8xf32>, tensor<2x8x6xf32>, tensor<2x6x8xf32>) -> (tensor<10x6xf32>, tensor<f32>)
  return %out, %aux : tensor<10x6xf32>, tensor<f32>
}
