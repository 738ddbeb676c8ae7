// RUN: moe-opt %s --moe-multiversion="ranks=4 variants=r1d2" --convert-moe-to-moert | FileCheck %s

// A dropless layer on 4 ranks agrees on one capacity right after the gate.

// CHECK-LABEL: moert.plan @layer
// CHECK: moert.gate
// CHECK-NEXT: moert.sync_capacity ins() outs(capacity = {{.+}}, expert_offsets = {{.+}})
// CHECK-NEXT: moert.dispatch

func.func @layer(%x: tensor<10x8xbf16>, %wg: tensor<8x8xf32>,
                 %w1: tensor<8x8x12xbf16>, %w2: tensor<8x12x8xbf16>,
                 %w3: tensor<8x8x12xbf16>) -> (tensor<10x8xbf16>, tensor<f32>) {
  %out, %aux = moe.layer gated %x, %wg, %w1, %w2 up(%w3)
      {top_k = 2, capacity = #moe.capacity<dropless>}
      : (tensor<10x8xbf16>, tensor<8x8xf32>, tensor<8x8x12xbf16>, tensor<8x12x8xbf16>,
         tensor<8x8x12xbf16>) -> (tensor<10x8xbf16>, tensor<f32>)
  return %out, %aux : tensor<10x8xbf16>, tensor<f32>
}
