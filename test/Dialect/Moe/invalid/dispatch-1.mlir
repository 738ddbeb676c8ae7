// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [dispatch-1] (dispatch buffer shapes and types), one case per block.

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// dispatch-1: the result is [E, C, d] of the routing.
func.func @dispatch_1_capacity(%x: tensor<100x16xf32>, %r: !routing) {
  // expected-error @+1 {{[dispatch-1] result [E, C, d] must have shape [4, 50, 16], got [4, 48, 16]}}
  %d = moe.dispatch %x, %r : tensor<100x16xf32>, !routing -> tensor<4x48x16xf32>
  return
}

// -----

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// dispatch-1: the input has the routing's tokens.
func.func @dispatch_1_tokens(%x: tensor<99x16xf32>, %r: !routing) {
  // expected-error @+1 {{[dispatch-1] input has 99 tokens but the routing has 100}}
  %d = moe.dispatch %x, %r : tensor<99x16xf32>, !routing -> tensor<4x50x16xf32>
  return
}

// -----

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// dispatch-1: dispatch copies rows; it converts no type.
func.func @dispatch_1_element(%x: tensor<100x16xf32>, %r: !routing) {
  // expected-error @+1 {{[dispatch-1] result must have element type 'f32', got 'bf16'}}
  %d = moe.dispatch %x, %r : tensor<100x16xf32>, !routing -> tensor<4x50x16xbf16>
  return
}

// -----

!routing = !moe.routing<tokens = 100, experts = 4, top_k = 2, capacity = 50>
// dispatch-1: a static routing capacity gives a static buffer.
func.func @dispatch_1_dynamic_result(%x: tensor<100x16xf32>, %r: !routing) {
  // expected-error @+1 {{[dispatch-1] result capacity must be static as the routing's, got [4, ?, 16]}}
  %d = moe.dispatch %x, %r : tensor<100x16xf32>, !routing -> tensor<4x?x16xf32>
  return
}
