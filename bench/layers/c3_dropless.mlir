// Benchmark layer C3 of /work/shared/PERF.md, dropless: d 2048, h 1408,
// E 64, top-6, FFN relu, bf16 tokens and experts, fp32 router, normalized
// gates, 16384 tokens per GPU. bench/make_plans.sh compiles it to a plan.
func.func @c3_dropless(%x: tensor<16384x2048xbf16>, %wg: tensor<2048x64xf32>,
    %w1: tensor<64x2048x1408xbf16>, %w2: tensor<64x1408x2048xbf16>)
    -> (tensor<16384x2048xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 6, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<16384x2048xbf16>, tensor<2048x64xf32>, tensor<64x2048x1408xbf16>,
         tensor<64x1408x2048xbf16>) -> (tensor<16384x2048xbf16>, tensor<f32>)
  return %out, %aux : tensor<16384x2048xbf16>, tensor<f32>
}
