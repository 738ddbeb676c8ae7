// A Mixtral-8x7B-like layer: d 4096, h 14336, E 8, top-2, gated SwiGLU
// experts, bf16 with an fp32 router, dropless (no token is dropped), 4096
// tokens.
func.func @mixtral(%x: tensor<4096x4096xbf16>, %wg: tensor<4096x8xf32>,
                   %w1: tensor<8x4096x14336xbf16>, %w2: tensor<8x14336x4096xbf16>,
                   %w3: tensor<8x4096x14336xbf16>)
    -> (tensor<4096x4096xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<4096x4096xbf16>, tensor<4096x8xf32>, tensor<8x4096x14336xbf16>,
         tensor<8x14336x4096xbf16>, tensor<8x4096x14336xbf16>)
      -> (tensor<4096x4096xbf16>, tensor<f32>)
  return %out, %aux : tensor<4096x4096xbf16>, tensor<f32>
}
