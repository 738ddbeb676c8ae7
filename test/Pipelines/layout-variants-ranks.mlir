// RUN: moe-opt %s --moe-multiversion="ranks=1 variants=r1d1,r0d1" --moe-lower-to-plan="layouts=padded,ragged" | FileCheck %s --check-prefix=ONE
// RUN: moe-opt %s --moe-multiversion="ranks=2 variants=r1d2,r0d1" --moe-lower-to-plan="training=true layouts=padded" | FileCheck %s --check-prefix=TWO
// RUN: not moe-opt %s --moe-multiversion="ranks=2 variants=r1d1,r0d1" --moe-lower-to-plan="layouts=padded,ragged" 2>&1 | FileCheck %s --check-prefix=RAGGED
// RUN: not moe-opt %s --moe-multiversion="ranks=2 variants=r1d1,r0d1" --moe-lower-to-plan="layouts=padded,aligned" 2>&1 | FileCheck %s --check-prefix=ALIGNED

// Layout variants compose with --moe-multiversion: each of its variants in
// every layout, named <variant>.<layout>, the variants in the order listed,
// in each the layout auto would give first.

// ONE-LABEL: moert.plan @dropless
// ONE: moert.variant "r1d1.ragged" workspace_bytes = {{[0-9]+}} forward {
// ONE-NEXT: moert.router
// ONE-NEXT: moert.gate {{.+}}layout = #moert<layout ragged>
// ONE: moert.variant "r1d1.padded" workspace_bytes = {{[0-9]+}} forward {
// ONE-NEXT: moert.router
// ONE-NEXT: moert.gate {{.+}}layout = #moert<layout padded>
// ONE: moert.variant "r0d1.ragged" workspace_bytes = {{[0-9]+}} forward {
// ONE: moert.variant "r0d1.padded" workspace_bytes = {{[0-9]+}} forward {
// ONE-NOT: moert.variant

// Many ranks: only the padded layout (ranks exchange whole capacity
// blocks), so layouts=padded just names the variants.
// TWO-LABEL: moert.plan @dropless
// TWO-SAME: world_size = 2
// TWO: moert.variant "r1d2.padded" workspace_bytes = {{[0-9]+}} forward {
// TWO: moert.all_to_all
// TWO: moert.variant "r0d1.padded" workspace_bytes = {{[0-9]+}} forward {
// TWO: moert.all_gather
// TWO-NOT: moert.variant

// RAGGED: error: 'moe.gate' op [plan-3] a ragged layout variant needs one rank: on 2 ranks tokens move in whole capacity blocks, so every variant is padded (keep layouts=padded, or lower for one rank)
// ALIGNED: error: 'moe.gate' op [plan-3] an aligned layout variant needs one rank: on 2 ranks

func.func @dropless(%x: tensor<64x16xf32>, %wg: tensor<16x4xf32>,
                    %w1: tensor<4x16x32xf32>, %w2: tensor<4x32x16xf32>)
    -> (tensor<64x16xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<relu> %x, %wg, %w1, %w2
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<64x16xf32>, tensor<16x4xf32>, tensor<4x16x32xf32>,
         tensor<4x32x16xf32>) -> (tensor<64x16xf32>, tensor<f32>)
  return %out, %aux : tensor<64x16xf32>, tensor<f32>
}
