// A prefill-sized dropless layer for the aligned layout on the GPU (compiled
// to prefill_ffn_bf16_layouts_train.json with moe-opt --moe-lower-to-plan=
// "training=true layouts=aligned,ragged" | moe-translate --moert-to-plan):
// 2048 tokens, d 256, h 384, E 16, top-2, gelu with biases, bf16 with an
// fp32 router: about 256 rows per expert, so the aligned layout's 128-row
// blocks hold whole and partial tiles.
func.func @prefill_ffn(%x: tensor<2048x256xbf16>, %wg: tensor<256x16xf32>,
                       %w1: tensor<16x256x384xbf16>, %w2: tensor<16x384x256xbf16>,
                       %b1: tensor<16x384xbf16>, %b2: tensor<16x256xbf16>)
    -> (tensor<2048x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<2048x256xbf16>, tensor<256x16xf32>, tensor<16x256x384xbf16>,
         tensor<16x384x256xbf16>, tensor<16x384xbf16>, tensor<16x256xbf16>)
      -> (tensor<2048x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<2048x256xbf16>, tensor<f32>
}
