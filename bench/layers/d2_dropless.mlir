// Benchmark decode layer D2 (issue 13): a large fine-grained gated layer on
// a decode-sized batch, dropless: T 128, d 4096, h 1536, E 64, top-8, gated
// SwiGLU, bf16, fp32 router, normalized gates. Inference only; the time to
// beat is reading the touched experts' weights (bench/RESULTS.md).
// bench: decode (forward only: make_plans.sh writes no training plan)
func.func @d2_dropless(%x: tensor<128x4096xbf16>, %wg: tensor<4096x64xf32>,
    %w1: tensor<64x4096x1536xbf16>, %w2: tensor<64x1536x4096xbf16>,
    %w3: tensor<64x4096x1536xbf16>)
    -> (tensor<128x4096xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 8, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<128x4096xbf16>, tensor<4096x64xf32>, tensor<64x4096x1536xbf16>,
         tensor<64x1536x4096xbf16>, tensor<64x4096x1536xbf16>)
      -> (tensor<128x4096xbf16>, tensor<f32>)
  return %out, %aux : tensor<128x4096xbf16>, tensor<f32>
}
