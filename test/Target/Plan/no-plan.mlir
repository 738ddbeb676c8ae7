// RUN: not moe-translate %s --moert-to-plan 2>&1 | FileCheck %s

// moe IR that was not lowered has no plan to write.
// CHECK: error: [plan-3] a plan file holds one moert.plan; the module has 0

func.func @empty() {
  return
}
