//===- CompilerRegisterDynamic.cpp - Register from the shared library -----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements flexCompilerRegister() for libflex_compiler.so, which
// does not link the runtime's C API (docs/Embedding.md): it finds
// flexSetCompiler among the process's global symbols, there when the program
// links libflex.so or loaded it with RTLD_GLOBAL. A caller that loaded
// libflex.so locally (ctypes' default) passes flexCompilerGetHooks' hooks to
// its flexSetCompiler instead.
//
//===----------------------------------------------------------------------===//

#include "flex-c/FlexCompiler.h"

#include <dlfcn.h>

extern "C" FlexStatus flexCompilerRegister(void) {
  using SetCompiler = FlexStatus (*)(const FlexCompilerHooks *);
  auto setCompiler =
      reinterpret_cast<SetCompiler>(dlsym(RTLD_DEFAULT, "flexSetCompiler"));
  if (!setCompiler)
    return FLEX_STATUS_UNAVAILABLE;
  FlexCompilerHooks hooks{};
  hooks.struct_size = sizeof(FlexCompilerHooks);
  FlexStatus status = flexCompilerGetHooks(&hooks);
  return status == FLEX_STATUS_OK ? setCompiler(&hooks) : status;
}
