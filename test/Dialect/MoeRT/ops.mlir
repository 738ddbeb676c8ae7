// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// A whole training plan of a gated layer round-trips through the custom and
// the generic syntax: plan, arguments, allocs, variant and every step of a
// gated layer, with role-named operands.

// CHECK-LABEL: moert.plan @gated attributes {layer = #moert.layer<tokens = 6, model_dim = 4, hidden_dim = 8, experts = 3, top_k = 2, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.000000e+00, seed = 0>, training, workspace_bytes = 3584 : i64}
// CHECK: %[[X:.+]] = moert.argument "x" input : memref<6x4xbf16>
// CHECK: %[[GRAD_X:.+]] = moert.argument "grad_x" grad_output : memref<6x4xbf16>
// CHECK: %[[LOGITS:.+]] = moert.alloc "logits" {offset = 0 : i64} : memref<6x3xf32>
// CHECK: moert.variant "single" forward {
// CHECK-NEXT: moert.router ins(x = %[[X]] : memref<6x4xbf16>, wg = %{{.+}} : memref<4x3xf32>) outs(logits = %[[LOGITS]] : memref<6x3xf32>)
// CHECK-NEXT: moert.gate ins(logits = %[[LOGITS]] : {{.+}}) outs(scores = {{.+}}) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, noise = 0.000000e+00 : f64, normalize, seed = 0 : i64, top_k = 2 : i64}
// CHECK-NEXT: moert.dispatch
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.glu
// CHECK-NEXT: moert.grouped_gemm
// CHECK-NEXT: moert.combine
// CHECK-NEXT: } backward {
// CHECK-NEXT: moert.combine_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm {{.+}} {trans_b}
// CHECK-NEXT: moert.glu_backward
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm_wgrad
// CHECK-NEXT: moert.grouped_gemm {{.+}} {trans_b}
// CHECK-NEXT: moert.grouped_gemm {{.+}} {accumulate, trans_b}
// CHECK-NEXT: moert.dispatch_backward
// CHECK-NEXT: moert.gate_backward {{.+}} {normalize, top_k = 2 : i64}
// CHECK-NEXT: moert.router_backward ins(x = %[[X]] : {{.+}}) outs(grad_x = %[[GRAD_X]] : memref<6x4xbf16>, grad_wg = %{{.+}} : memref<4x3xf32>)

moert.plan @gated attributes {layer = #moert.layer<tokens = 6, model_dim = 4, hidden_dim = 8, experts = 3, top_k = 2, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training, workspace_bytes = 3584 : i64} {
  %0 = moert.argument "x" input : memref<6x4xbf16>
  %1 = moert.argument "wg" input : memref<4x3xf32>
  %2 = moert.argument "w1" input : memref<3x4x8xbf16>
  %3 = moert.argument "w2" input : memref<3x8x4xbf16>
  %4 = moert.argument "w3" input : memref<3x4x8xbf16>
  %5 = moert.argument "out" output : memref<6x4xbf16>
  %6 = moert.argument "l_aux" output : memref<1xf32>
  %7 = moert.argument "grad_out" grad_input : memref<6x4xbf16>
  %8 = moert.argument "grad_l_aux" grad_input : memref<1xf32>
  %9 = moert.argument "grad_x" grad_output : memref<6x4xbf16>
  %10 = moert.argument "grad_wg" grad_output : memref<4x3xf32>
  %11 = moert.argument "grad_w1" grad_output : memref<3x4x8xbf16>
  %12 = moert.argument "grad_w2" grad_output : memref<3x8x4xbf16>
  %13 = moert.argument "grad_w3" grad_output : memref<3x4x8xbf16>
  %14 = moert.alloc "logits" {offset = 0 : i64} : memref<6x3xf32>
  %15 = moert.alloc "scores" {offset = 1536 : i64} : memref<6x3xf32>
  %16 = moert.alloc "indices" {offset = 1792 : i64} : memref<6x2xi32>
  %17 = moert.alloc "locations" {offset = 2048 : i64} : memref<6x2xi32>
  %18 = moert.alloc "gates" {offset = 2304 : i64} : memref<6x2xf32>
  %19 = moert.alloc "capacity" {offset = 3328 : i64} : memref<1xi32>
  %20 = moert.alloc "expert_offsets" {offset = 2816 : i64} : memref<4xi32>
  %21 = moert.alloc "expert_rows" {offset = 3072 : i64} : memref<3xi32>
  %22 = moert.alloc "dispatched" {offset = 1280 : i64} : memref<12x4xbf16>
  %23 = moert.alloc "gate_proj" {offset = 0 : i64} : memref<12x8xbf16>
  %24 = moert.alloc "up_proj" {offset = 256 : i64} : memref<12x8xbf16>
  %25 = moert.alloc "hidden" {offset = 512 : i64} : memref<12x8xbf16>
  %26 = moert.alloc "expert_out" {offset = 768 : i64} : memref<12x4xbf16>
  %27 = moert.alloc "grad_expert_out" {offset = 1024 : i64} : memref<12x4xbf16>
  %28 = moert.alloc "grad_gates" {offset = 2560 : i64} : memref<6x2xf32>
  %29 = moert.alloc "grad_hidden" {offset = 512 : i64} : memref<12x8xbf16>
  %30 = moert.alloc "grad_gate_proj" {offset = 768 : i64} : memref<12x8xbf16>
  %31 = moert.alloc "grad_up_proj" {offset = 1024 : i64} : memref<12x8xbf16>
  %32 = moert.alloc "grad_dispatched" {offset = 0 : i64} : memref<12x4xbf16>
  %33 = moert.alloc "grad_logits" {offset = 0 : i64} : memref<6x3xf32>
  moert.variant "single" forward {
    moert.router ins(x = %0 : memref<6x4xbf16>, wg = %1 : memref<4x3xf32>) outs(logits = %14 : memref<6x3xf32>)
    moert.gate ins(logits = %14 : memref<6x3xf32>) outs(scores = %15 : memref<6x3xf32>, indices = %16 : memref<6x2xi32>, locations = %17 : memref<6x2xi32>, gates = %18 : memref<6x2xf32>, capacity = %19 : memref<1xi32>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>, l_aux = %6 : memref<1xf32>) {capacity = #moe.capacity<dropless>, layout = #moert<layout ragged>, noise = 0.000000e+00 : f64, normalize, seed = 0 : i64, top_k = 2 : i64}
    moert.dispatch ins(x = %0 : memref<6x4xbf16>, indices = %16 : memref<6x2xi32>, locations = %17 : memref<6x2xi32>, capacity = %19 : memref<1xi32>, expert_offsets = %20 : memref<4xi32>) outs(dispatched = %22 : memref<12x4xbf16>)
    moert.grouped_gemm ins(a = %22 : memref<12x4xbf16>, b = %2 : memref<3x4x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %23 : memref<12x8xbf16>)
    moert.grouped_gemm ins(a = %22 : memref<12x4xbf16>, b = %4 : memref<3x4x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %24 : memref<12x8xbf16>)
    moert.glu ins(gate_in = %23 : memref<12x8xbf16>, up_in = %24 : memref<12x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %25 : memref<12x8xbf16>)
    moert.grouped_gemm ins(a = %25 : memref<12x8xbf16>, b = %3 : memref<3x8x4xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %26 : memref<12x4xbf16>)
    moert.combine ins(expert_out = %26 : memref<12x4xbf16>, indices = %16 : memref<6x2xi32>, locations = %17 : memref<6x2xi32>, gates = %18 : memref<6x2xf32>, capacity = %19 : memref<1xi32>, expert_offsets = %20 : memref<4xi32>) outs(out = %5 : memref<6x4xbf16>)
  } backward {
    moert.combine_backward ins(grad_out = %7 : memref<6x4xbf16>, expert_out = %26 : memref<12x4xbf16>, indices = %16 : memref<6x2xi32>, locations = %17 : memref<6x2xi32>, gates = %18 : memref<6x2xf32>, capacity = %19 : memref<1xi32>, expert_offsets = %20 : memref<4xi32>) outs(grad_expert_out = %27 : memref<12x4xbf16>, grad_gates = %28 : memref<6x2xf32>)
    moert.grouped_gemm_wgrad ins(a = %25 : memref<12x8xbf16>, grad_c = %27 : memref<12x4xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(grad_b = %12 : memref<3x8x4xbf16>)
    moert.grouped_gemm ins(a = %27 : memref<12x4xbf16>, b = %3 : memref<3x8x4xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %29 : memref<12x8xbf16>) {trans_b}
    moert.glu_backward ins(gate_in = %23 : memref<12x8xbf16>, up_in = %24 : memref<12x8xbf16>, grad = %29 : memref<12x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(grad_gate_in = %30 : memref<12x8xbf16>, grad_up_in = %31 : memref<12x8xbf16>)
    moert.grouped_gemm_wgrad ins(a = %22 : memref<12x4xbf16>, grad_c = %30 : memref<12x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(grad_b = %11 : memref<3x4x8xbf16>)
    moert.grouped_gemm_wgrad ins(a = %22 : memref<12x4xbf16>, grad_c = %31 : memref<12x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(grad_b = %13 : memref<3x4x8xbf16>)
    moert.grouped_gemm ins(a = %30 : memref<12x8xbf16>, b = %2 : memref<3x4x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %32 : memref<12x4xbf16>) {trans_b}
    moert.grouped_gemm ins(a = %31 : memref<12x8xbf16>, b = %4 : memref<3x4x8xbf16>, expert_offsets = %20 : memref<4xi32>, expert_rows = %21 : memref<3xi32>) outs(c = %32 : memref<12x4xbf16>) {accumulate, trans_b}
    moert.dispatch_backward ins(grad_dispatched = %32 : memref<12x4xbf16>, indices = %16 : memref<6x2xi32>, locations = %17 : memref<6x2xi32>, capacity = %19 : memref<1xi32>, expert_offsets = %20 : memref<4xi32>) outs(grad_x = %9 : memref<6x4xbf16>)
    moert.gate_backward ins(grad_gates = %28 : memref<6x2xf32>, grad_l_aux = %8 : memref<1xf32>, scores = %15 : memref<6x3xf32>, indices = %16 : memref<6x2xi32>) outs(grad_logits = %33 : memref<6x3xf32>) {normalize, top_k = 2 : i64}
    moert.router_backward ins(x = %0 : memref<6x4xbf16>, wg = %1 : memref<4x3xf32>, grad_logits = %33 : memref<6x3xf32>) outs(grad_x = %9 : memref<6x4xbf16>, grad_wg = %10 : memref<4x3xf32>)
  }
}
