// RUN: moe-opt %s --split-input-file --verify-diagnostics

// Negative tests of [plan-3]: the structure of a plan and of its steps.

moert.plan @unknown_role attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] unknown ins role 'y'; expected one of x, wg}}
    moert.router ins(y = %x : memref<8x4xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @missing_role attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  %wg = moert.argument "wg" input : memref<4x2xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] missing role 'logits'}}
    moert.router ins(x = %x : memref<8x4xf32>, wg = %wg : memref<4x2xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @role_twice attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  moert.variant "v" forward {
    // expected-error @+1 {{[plan-3] role 'x' given twice}}
    moert.router ins(x = %x : memref<8x4xf32>, x = %x : memref<8x4xf32>) outs()
  } backward {
  }
}

// -----

moert.plan @duplicate_name attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
  // expected-error @+1 {{[plan-3] buffer name 'x' is defined twice in the plan}}
  %y = moert.alloc "x" : memref<8x4xf32>
}

// -----

moert.plan @alignment attributes {layer = {}, workspace_alignment = 100 : i64} {
  // expected-error @-1 {{[plan-3] workspace alignment must be a power of two, got 100}}
}

// -----

// expected-error @+1 {{'moert.alloc' op expects parent op 'moert.plan'}}
%a = moert.alloc "a" : memref<4xf32>
