// A small FFN layer for a quick run on a CPU: 512 tokens, d 256, h 512,
// E 8, top-2, gelu with biases, fp32, capacity factor 1.25 (some tokens
// are dropped), batch-prioritized routing.
func.func @small_ffn(%x: tensor<512x256xf32>, %wg: tensor<256x8xf32>,
                     %w1: tensor<8x256x512xf32>, %w2: tensor<8x512x256xf32>,
                     %b1: tensor<8x512xf32>, %b2: tensor<8x256xf32>)
    -> (tensor<512x256xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<fixed 1.25>, normalize, batch_prioritized}
      : (tensor<512x256xf32>, tensor<256x8xf32>, tensor<8x256x512xf32>,
         tensor<8x512x256xf32>, tensor<8x512xf32>, tensor<8x256xf32>)
      -> (tensor<512x256xf32>, tensor<f32>)
  return %out, %aux : tensor<512x256xf32>, tensor<f32>
}
