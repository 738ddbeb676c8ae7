// RUN: moe-opt %s --moe-lower-to-plan="training=true layouts=padded,ragged" | moe-translate --moert-to-plan > %t.json
// RUN: moe-run %t.json --variant padded --train --check --seed 1 | FileCheck %s --check-prefixes=CHECK,TRAIN,PADDED
// RUN: moe-run %t.json --variant ragged --train --check --seed 2 | FileCheck %s --check-prefixes=CHECK,TRAIN,RAGGED
// RUN: moe-run %t.json --train --check --iters 3 --seed 3 | FileCheck %s --check-prefixes=CHECK,TRAIN,AUTO
// RUN: FileCheck %s --input-file %t.json --check-prefix=PLAN
// RUN: moe-opt %s --moe-lower-to-plan="layouts=ragged,padded" | moe-translate --moert-to-plan > %t.infer.json
// RUN: moe-run %t.infer.json --variant padded --check --seed 4 | FileCheck %s --check-prefixes=CHECK,PADDED
// RUN: moe-run %t.infer.json --variant ragged --check --seed 5 | FileCheck %s --check-prefixes=CHECK,RAGGED
// RUN: moe-opt %examples/small_ffn.mlir --moe-lower-to-plan="training=true layouts=padded,ragged" | moe-translate --moert-to-plan > %t.fixed.json
// RUN: moe-run %t.fixed.json --variant padded --train --check --seed 6 | FileCheck %s --check-prefixes=CHECK,TRAIN,PADDED
// RUN: moe-run %t.fixed.json --variant ragged --train --check --seed 7 | FileCheck %s --check-prefixes=CHECK,TRAIN,RAGGED
// RUN: moe-opt %s --moe-lower-to-plan="training=true layouts=aligned,ragged" | moe-translate --moert-to-plan > %t.aligned.json
// RUN: moe-run %t.aligned.json --variant aligned --train --check --seed 8 | FileCheck %s --check-prefixes=CHECK,TRAIN,ALIGNED
// RUN: moe-opt %examples/small_ffn.mlir --moe-lower-to-plan="training=true layout=aligned" | moe-translate --moert-to-plan > %t.fixed-aligned.json
// RUN: moe-run %t.fixed-aligned.json --train --check --seed 9 | FileCheck %s --check-prefixes=CHECK,TRAIN

// Every layout variant computes the layer: a dropless layer (padded: E * C
// rows, C the largest count; ragged: the kept rows only; aligned: the kept
// rows, each expert's first row a multiple of 128) and the fixed
// capacity of examples/small_ffn.mlir, compiled with both layouts through
// moe-opt and moe-translate (which runs the runtime's loader and verifier on
// the plan), each variant named and run on the CPU (forward, and backward
// for training plans) against the fp64 reference; with no variant named the
// cost model picks one per call.

// PADDED: variant  padded (
// RAGGED: variant  ragged (
// ALIGNED: variant  aligned (
// AUTO: variant  {{padded|ragged}} ({{[01]}}, auto)
// CHECK: check vs fp64 reference
// CHECK: out {{.+}} ok
// TRAIN: grad_x {{.+}} ok
// TRAIN: grad_wg {{.+}} ok
// TRAIN: grad_w1 {{.+}} ok
// TRAIN: grad_b1 {{.+}} ok
// TRAIN: grad_w2 {{.+}} ok
// TRAIN: grad_b2 {{.+}} ok
// CHECK: check passed: [[N:[0-9]+]] of [[N]] outputs within tolerance

// The dropless plan: ragged (what layout=auto gives) first, the default.
// PLAN: "name": "ragged",
// PLAN: "name": "padded",
// PLAN: "default_variant": 0

func.func @dropless(%x: tensor<256x32xf32>, %wg: tensor<32x8xf32>,
                    %w1: tensor<8x32x64xf32>, %w2: tensor<8x64x32xf32>,
                    %b1: tensor<8x64xf32>, %b2: tensor<8x32xf32>)
    -> (tensor<256x32xf32>, tensor<f32>) {
  %out, %aux = moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2)
      {top_k = 2, capacity = #moe.capacity<dropless>, normalize}
      : (tensor<256x32xf32>, tensor<32x8xf32>, tensor<8x32x64xf32>,
         tensor<8x64x32xf32>, tensor<8x64xf32>, tensor<8x32xf32>)
      -> (tensor<256x32xf32>, tensor<f32>)
  return %out, %aux : tensor<256x32xf32>, tensor<f32>
}
