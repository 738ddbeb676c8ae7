// Correctness layer of the benchmark (moe-run --check against the fp64
// reference before timing), shaped like the benchmark's but small, dropless:
// T 1024, d 256, h 512, E 8, top-2, FFN relu, bf16, fp32 router, normalized gates.
func.func @check_small_k2_dropless(%x: tensor<1024x256xbf16>, %wg: tensor<256x8xf32>,
    %w1: tensor<8x256x512xbf16>, %w2: tensor<8x512x256xbf16>)
    -> (tensor<1024x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<1024x256xbf16>, tensor<256x8xf32>, tensor<8x256x512xbf16>,
         tensor<8x512x256xbf16>) -> (tensor<1024x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<1024x256xbf16>, tensor<f32>
}
