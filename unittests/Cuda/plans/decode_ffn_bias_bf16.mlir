// A decode-sized layer for the gather-fused variant on the GPU (compiled to
// decode_ffn_bias_bf16_gather_train.json with moe-opt --moe-lower-to-plan=
// "training=true" | moe-translate --moert-to-plan; with
// "training=true fuse-activation-backward=true" to
// decode_ffn_bias_bf16_act_backward_train.json; with "fuse-combine=true"
// to decode_ffn_bias_bf16_combine.json): 64 tokens,
// d 256, h 512, E 16, top-4, relu with biases, bf16 with an fp32 router,
// dropless (ragged: few rows per expert, the device-sized kernel).
func.func @decode_ffn(%x: tensor<64x256xbf16>, %wg: tensor<256x16xf32>,
                      %w1: tensor<16x256x512xbf16>, %w2: tensor<16x512x256xbf16>,
                      %b1: tensor<16x512xbf16>, %b2: tensor<16x256xbf16>)
    -> (tensor<64x256xbf16>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 4, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x256xbf16>, tensor<256x16xf32>, tensor<16x256x512xbf16>,
         tensor<16x512x256xbf16>, tensor<16x512xbf16>, tensor<16x256xbf16>)
      -> (tensor<64x256xbf16>, tensor<f32>)
  return %out, %aux : tensor<64x256xbf16>, tensor<f32>
}
