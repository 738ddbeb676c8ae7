// Correctness layer of the benchmark (moe-run --check against the fp64
// reference before timing) for the gated layers, small, capacity factor 1.0:
// T 1024, d 256, h 128, E 8, top-2, gated SwiGLU, bf16, fp32 router, normalized gates.
func.func @check_small_gated_k2_cap1(%x: tensor<1024x256xbf16>, %wg: tensor<256x8xf32>,
    %w1: tensor<8x256x128xbf16>, %w2: tensor<8x128x256xbf16>,
    %w3: tensor<8x256x128xbf16>)
    -> (tensor<1024x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<fixed 1.0>, normalize}
      : (tensor<1024x256xbf16>, tensor<256x8xf32>, tensor<8x256x128xbf16>,
         tensor<8x128x256xbf16>, tensor<8x256x128xbf16>)
      -> (tensor<1024x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<1024x256xbf16>, tensor<f32>
}
