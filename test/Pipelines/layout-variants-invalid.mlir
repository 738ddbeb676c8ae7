// RUN: not moe-opt %s --moe-lower-to-plan="layouts=padded,tiled" 2>&1 | FileCheck %s --check-prefix=VALUE
// RUN: not moe-opt %s --moe-lower-to-plan="layouts=auto" 2>&1 | FileCheck %s --check-prefix=AUTO
// RUN: not moe-opt %s --moe-lower-to-plan="layouts=ragged,padded,ragged" 2>&1 | FileCheck %s --check-prefix=TWICE
// RUN: not moe-opt %s --moe-lower-to-plan="layout=padded layouts=padded,ragged" 2>&1 | FileCheck %s --check-prefix=BOTH
// RUN: not moe-opt %s --convert-moe-to-moert="layouts=tiled" 2>&1 | FileCheck %s --check-prefix=VALUE2

// [plan-3]: the layouts option names each layout once, padded, ragged or aligned,
// and replaces layout.

// VALUE: error: [plan-3] layouts lists padded, ragged and aligned (one variant each), got 'tiled'
// AUTO: error: [plan-3] layouts lists padded, ragged and aligned (one variant each), got 'auto'
// TWICE: error: [plan-3] layout 'ragged' is listed twice in layouts
// BOTH: error: [plan-3] give layout or layouts, not both: layout=padded with layouts=padded,ragged
// VALUE2: error: [plan-3] layouts lists padded, ragged and aligned (one variant each), got 'tiled'

func.func @dropless(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
                    %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>) -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}
