// RUN: not moe-translate %s --moert-to-plan 2>&1 | FileCheck %s

// A plan whose workspace was not placed cannot be written.
// CHECK: error: 'moert.plan' op [plan-3] place the workspace first (--moert-plan-memory)


moert.plan @unplaced attributes {layer = {}} {
  %x = moert.argument "x" input : memref<8x4xf32>
}
