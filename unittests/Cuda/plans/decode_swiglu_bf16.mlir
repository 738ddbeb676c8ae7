// A decode-sized gated (SwiGLU) layer for the backward-fused variants on the
// GPU (compiled to decode_swiglu_bf16_act_backward_train.json with moe-opt
// --moe-lower-to-plan="training=true fuse-activation-backward=true" |
// moe-translate --moert-to-plan; with "training=true fuse-combine=true" to
// decode_swiglu_bf16_combine_train.json): 64 tokens, d 256, h 512, E 16,
// top-4, bf16 with an fp32 router, dropless; eight variants (plain,
// gathered, glu-fused and both, each also backward- or combine-fused).
func.func @decode_swiglu(%x: tensor<64x256xbf16>, %wg: tensor<256x16xf32>,
                         %w1: tensor<16x256x512xbf16>, %w2: tensor<16x512x256xbf16>,
                         %w3: tensor<16x256x512xbf16>)
    -> (tensor<64x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 4, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x256xbf16>, tensor<256x16xf32>, tensor<16x256x512xbf16>,
         tensor<16x512x256xbf16>, tensor<16x256x512xbf16>)
      -> (tensor<64x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x256xbf16>, tensor<f32>
}
