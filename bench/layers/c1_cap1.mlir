// Benchmark layer C1 of /work/shared/PERF.md, capacity factor 1.0: d 4096, h 4096,
// E 8, top-2, FFN relu, bf16 tokens and experts, fp32 router, normalized
// gates, 16384 tokens per GPU. bench/make_plans.sh compiles it to a plan.
func.func @c1_cap1(%x: tensor<16384x4096xbf16>, %wg: tensor<4096x8xf32>,
    %w1: tensor<8x4096x4096xbf16>, %w2: tensor<8x4096x4096xbf16>)
    -> (tensor<16384x4096xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
      : (tensor<16384x4096xbf16>, tensor<4096x8xf32>, tensor<8x4096x4096xbf16>,
         tensor<8x4096x4096xbf16>) -> (tensor<16384x4096xbf16>, tensor<f32>)
  return %out, %aux : tensor<16384x4096xbf16>, tensor<f32>
}
