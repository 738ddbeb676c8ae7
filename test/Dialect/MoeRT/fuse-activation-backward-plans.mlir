// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward{report=true}))' --mlir-print-op-on-diagnostic=false 2>&1 >/dev/null | FileCheck %s --check-prefix=REMARK
// RUN: moe-opt %s --split-input-file --pass-pipeline='builtin.module(moert.plan(moert-fuse-activation-backward))' | FileCheck %s

// --moert-fuse-activation-backward on hand-written backwards: each rule
// that lowered layers do not reach, and a pair that qualifies although a
// step between the two reads the GEMM's inputs.

// CHECK-LABEL: moert.plan @qualifies
// CHECK: moert.variant "v+act_backward"
// CHECK: moert.grouped_gemm ins(a = %{{[^ ]+}} : memref<8x16xbf16>, b = %{{[^ ]+}} : memref<2x8x16xbf16>
// CHECK-NEXT: moert.grouped_gemm_activation_backward
// CHECK-NOT: moert.activation_backward
// CHECK-LABEL: moert.plan @grad_read_elsewhere
// CHECK-NOT: act_backward
// CHECK-LABEL: moert.plan @gemm_has_epilogue
// CHECK-NOT: act_backward
// CHECK-LABEL: moert.plan @between_writes_b
// CHECK-NOT: act_backward
// CHECK-LABEL: moert.plan @two_backwards_one_gemm
// CHECK-NOT: act_backward
// CHECK-LABEL: moert.plan @glu_gradients_in_one_buffer
// CHECK-NOT: act_backward
// CHECK-LABEL: moert.plan @glu_gradient_over_grad
// CHECK-NOT: act_backward

// -----

// REMARK: remark: variant 'v' fused as 'v+act_backward': 1 grouped_gemm_activation_backward step
moert.plan @qualifies attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  %gd = moert.alloc "grad_dispatched" : memref<8x8xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %h : memref<8x16xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gd : memref<8x8xbf16>) {trans_b}
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>}
  }
}

// -----

// REMARK: remark: variant 'v' not fused: moert.grouped_gemm also uses its grad 'grad_hidden'
moert.plan @grad_read_elsewhere attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  %gd = moert.alloc "grad_dispatched" : memref<8x8xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>}
    moert.grouped_gemm ins(a = %gh : memref<8x16xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gd : memref<8x8xbf16>) {trans_b}
  }
}

// -----

// REMARK: remark: variant 'v' not fused: the moert.grouped_gemm writing its grad has an epilogue
moert.plan @gemm_has_epilogue attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  %gd = moert.alloc "grad_dispatched" : memref<8x8xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b, epilogue = #moe<activation relu>}
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>}
  }
}

// -----

// REMARK: remark: variant 'v' not fused: moert.grouped_gemm between the GEMM and it writes 'hidden', which they read
moert.plan @between_writes_b attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %w1 = moert.argument "w1" input : memref<2x8x16xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  %gd = moert.alloc "grad_dispatched" : memref<8x8xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w1 : memref<2x8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %h : memref<8x16xbf16>)
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>}
  }
}

// -----

// Two activation_backward steps read one GEMM's grad: the later is left
// alone, and then so is the first (the later still reads its grad).
// REMARK: remark: variant 'v' not fused: activation_backward step 1 of 2: moert.activation_backward also uses its grad 'grad_hidden'
moert.plan @two_backwards_one_gemm attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = ffn, activation = relu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %h = moert.alloc "hidden" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %ghp = moert.alloc "grad_hidden_pre" : memref<8x16xbf16>
  %ghp2 = moert.alloc "grad_hidden_pre_2" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp : memref<8x16xbf16>) {activation = #moe<activation relu>}
    moert.activation_backward ins(pre = %h : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_pre = %ghp2 : memref<8x16xbf16>) {activation = #moe<activation relu>}
  }
}

// -----

// REMARK: remark: variant 'v' not fused: it writes both gradients into 'grad_gate_in'
moert.plan @glu_gradients_in_one_buffer attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.glu_backward ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gg : memref<8x16xbf16>, grad_up_in = %gg : memref<8x16xbf16>)
  }
}


// -----

// REMARK: remark: variant 'v' not fused: the fused step would read and write 'grad_hidden'
moert.plan @glu_gradient_over_grad attributes {layer = #moert.layer<tokens = 8, model_dim = 8, hidden_dim = 16, experts = 2, top_k = 1, capacity = #moe.capacity<dropless>, expert = gated, activation = silu, dtype = bf16, bias = false, router_fp32 = false, normalize_gate = false, batch_prioritized = false, gate_noise = 0.0, seed = 0>, training} {
  %w2 = moert.argument "w2" input : memref<2x16x8xbf16>
  %o = moert.alloc "expert_offsets" : memref<3xi32>
  %r = moert.alloc "expert_rows" : memref<2xi32>
  %gate = moert.alloc "gate_in" : memref<8x16xbf16>
  %up = moert.alloc "up_in" : memref<8x16xbf16>
  %g = moert.alloc "grad_expert_out" : memref<8x8xbf16>
  %gh = moert.alloc "grad_hidden" : memref<8x16xbf16>
  %gg = moert.alloc "grad_gate_in" : memref<8x16xbf16>
  %gu = moert.alloc "grad_up_in" : memref<8x16xbf16>
  moert.variant "v" forward {
  } backward {
    moert.grouped_gemm ins(a = %g : memref<8x8xbf16>, b = %w2 : memref<2x16x8xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(c = %gh : memref<8x16xbf16>) {trans_b}
    moert.glu_backward ins(gate_in = %gate : memref<8x16xbf16>, up_in = %up : memref<8x16xbf16>, grad = %gh : memref<8x16xbf16>, expert_offsets = %o : memref<3xi32>, expert_rows = %r : memref<2xi32>) outs(grad_gate_in = %gh : memref<8x16xbf16>, grad_up_in = %gu : memref<8x16xbf16>)
  }
}
