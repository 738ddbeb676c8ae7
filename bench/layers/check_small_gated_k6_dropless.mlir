// Correctness layer of the benchmark (moe-run --check against the fp64
// reference before timing) for the gated layers, small, dropless:
// T 1024, d 256, h 128, E 64, top-6, gated SwiGLU, bf16, fp32 router, normalized gates.
func.func @check_small_gated_k6_dropless(%x: tensor<1024x256xbf16>, %wg: tensor<256x64xf32>,
    %w1: tensor<64x256x128xbf16>, %w2: tensor<64x128x256xbf16>,
    %w3: tensor<64x256x128xbf16>)
    -> (tensor<1024x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 6, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<1024x256xbf16>, tensor<256x64xf32>, tensor<64x256x128xbf16>,
         tensor<64x128x256xbf16>, tensor<64x256x128xbf16>)
      -> (tensor<1024x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<1024x256xbf16>, tensor<f32>
}
