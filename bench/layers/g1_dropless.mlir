// Benchmark layer G1 (issue 13), dropless: C2's shape with gated SwiGLU
// experts (Mixtral-like): d 4096, h 14336, E 8, top-2,
// out = (silu(x w1) * (x w3)) w2, bf16 tokens and experts, fp32 router,
// normalized gates, 16384 tokens per GPU. bench/make_plans.sh compiles it.
func.func @g1_dropless(%x: tensor<16384x4096xbf16>, %wg: tensor<4096x8xf32>,
    %w1: tensor<8x4096x14336xbf16>, %w2: tensor<8x14336x4096xbf16>,
    %w3: tensor<8x4096x14336xbf16>)
    -> (tensor<16384x4096xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<16384x4096xbf16>, tensor<4096x8xf32>, tensor<8x4096x14336xbf16>,
         tensor<8x14336x4096xbf16>, tensor<8x4096x14336xbf16>)
      -> (tensor<16384x4096xbf16>, tensor<f32>)
  return %out, %aux : tensor<16384x4096xbf16>, tensor<f32>
}
