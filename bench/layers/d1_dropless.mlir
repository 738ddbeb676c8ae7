// Benchmark decode layer D1 (issue 13): C3's layer on a decode-sized batch,
// dropless: T 256, d 2048, h 1408, E 64, top-6, FFN relu, bf16, fp32 router,
// normalized gates. Inference only; the time to beat is reading the
// touched experts' weights (bench/RESULTS.md, Definitions).
// bench: decode (forward only: make_plans.sh writes no training plan)
func.func @d1_dropless(%x: tensor<256x2048xbf16>, %wg: tensor<2048x64xf32>,
    %w1: tensor<64x2048x1408xbf16>, %w2: tensor<64x1408x2048xbf16>)
    -> (tensor<256x2048xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 6, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<256x2048xbf16>, tensor<2048x64xf32>, tensor<64x2048x1408xbf16>,
         tensor<64x1408x2048xbf16>) -> (tensor<256x2048xbf16>, tensor<f32>)
  return %out, %aux : tensor<256x2048xbf16>, tensor<f32>
}
