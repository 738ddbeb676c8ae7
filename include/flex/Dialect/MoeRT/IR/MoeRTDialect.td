//===- MoeRTDialect.td - The moert dialect -----------------*- tablegen -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the `moert` dialect: a lowered MoE layer as the runtime
// runs it, steps over explicit buffers.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_DIALECT_MOERT_IR_MOERTDIALECT_TD
#define FLEX_DIALECT_MOERT_IR_MOERTDIALECT_TD

include "mlir/IR/OpBase.td"

def MoeRT_Dialect : Dialect {
  let name = "moert";
  let cppNamespace = "::flex::moert";
  let summary = "MoE layers at buffer level: the runtime's plan as IR";
  let description = [{
    A `moert.plan` is one MoE layer lowered for the runtime: the caller's
    buffers (`moert.argument`), workspace buffers (`moert.alloc`, placed in
    one block by `--moert-plan-memory`), and one or more `moert.variant`s,
    each a forward and a backward list of steps. A step is a kernel, a GEMM
    or (later) a collective; its operands are named by role
    (`ins(x = %x : memref<...>)`), as in the plan file it is serialized to
    (docs/PlanFormat.md). Every variant reads the same arguments in the same
    layout, so the runtime may switch between them from one call to the next.
  }];
  let dependentDialects = ["::flex::moe::MoeDialect"];
  let useDefaultAttributePrinterParser = 1;
}

class MoeRT_Op<string mnemonic, list<Trait> traits = []>
    : Op<MoeRT_Dialect, mnemonic, traits>;

#endif // FLEX_DIALECT_MOERT_IR_MOERTDIALECT_TD
