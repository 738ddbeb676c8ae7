// Benchmark layer G3 (issue 13), dropless: C3's shape with gated SwiGLU
// experts (fine-grained): d 2048, h 1408, E 64, top-6,
// out = (silu(x w1) * (x w3)) w2, bf16 tokens and experts, fp32 router,
// normalized gates, 16384 tokens per GPU. bench/make_plans.sh compiles it.
func.func @g3_dropless(%x: tensor<16384x2048xbf16>, %wg: tensor<2048x64xf32>,
    %w1: tensor<64x2048x1408xbf16>, %w2: tensor<64x1408x2048xbf16>,
    %w3: tensor<64x2048x1408xbf16>)
    -> (tensor<16384x2048xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 6, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<16384x2048xbf16>, tensor<2048x64xf32>, tensor<64x2048x1408xbf16>,
         tensor<64x1408x2048xbf16>, tensor<64x2048x1408xbf16>)
      -> (tensor<16384x2048xbf16>, tensor<f32>)
  return %out, %aux : tensor<16384x2048xbf16>, tensor<f32>
}
