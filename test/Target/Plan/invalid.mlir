// RUN: not moe-translate %s --moert-to-plan 2>&1 | FileCheck %s

// A plan whose workspace was not placed cannot be written.
// CHECK: error: 'moert.plan' op [plan-3] place the workspace first (--moert-plan-memory)


moert.plan @unplaced attributes {layer = #moert.layer<tokens = 8, model_dim = 4, hidden_dim = 8, experts = 2, top_k = 1, capacity = #moe.capacity<fixed 1.0>, expert = ffn, activation = relu, dtype = f32, bias = false, router_fp32 = true, normalize_gate = true, batch_prioritized = false, gate_noise = 0.0, seed = 0>} {
  %x = moert.argument "x" input : memref<8x4xf32>
}
