// A small Mixtral-like layer for a quick run on a CPU: 1000 tokens, d 256,
// h 704, E 8, top-2, gated SwiGLU, bf16 with an fp32 router, dropless.
func.func @small_swiglu(%x: tensor<1000x256xbf16>, %wg: tensor<256x8xf32>,
                        %w1: tensor<8x256x704xbf16>, %w2: tensor<8x704x256xbf16>,
                        %w3: tensor<8x256x704xbf16>)
    -> (tensor<1000x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<1000x256xbf16>, tensor<256x8xf32>, tensor<8x256x704xbf16>,
         tensor<8x704x256xbf16>, tensor<8x256x704xbf16>)
      -> (tensor<1000x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<1000x256xbf16>, tensor<f32>
}
