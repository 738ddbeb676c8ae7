//===- CompilerRegister.cpp - Register the compiler with the C API --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements flexCompilerRegister() for a program that links the
// compiler (FlexCompilerCAPI) and the runtime's C API statically: it gives
// the C API (which has no MLIR in it) this library's compile hooks.
//
//===----------------------------------------------------------------------===//

#include "flex-c/FlexCompiler.h"

extern "C" FlexStatus flexCompilerRegister(void) {
  FlexCompilerHooks hooks{};
  hooks.struct_size = sizeof(FlexCompilerHooks);
  FlexStatus status = flexCompilerGetHooks(&hooks);
  return status == FLEX_STATUS_OK ? flexSetCompiler(&hooks) : status;
}
