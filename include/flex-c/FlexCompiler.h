/*===- FlexCompiler.h - The C API of the Flex compiler library ---*- C -*-===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/*
 * This file declares what the compiler library exports: the compile hooks
 * the runtime's C API calls (flexSetCompiler, include/flex-c/Flex.h). Two
 * builds of it exist (docs/Embedding.md):
 *
 *  - FlexCompilerCAPI, a static library linked with the runtime's C API into
 *    one program (moe-run, the examples): call flexCompilerRegister() once.
 *  - libflex_compiler.so (target FlexCompilerShared, Flex::Compiler when
 *    installed): MLIR and LLVM linked in statically, needing only libc,
 *    libstdc++ and libm, so it can be carried to a machine without MLIR. It
 *    does not link libflex.so. A caller that loads both libraries on its own
 *    (dlopen, Python's ctypes) asks this one for the hooks and hands them to
 *    the other:
 *
 *        FlexCompilerHooks hooks = {sizeof hooks};
 *        flexCompilerGetHooks(&hooks);   // from libflex_compiler.so
 *        flexSetCompiler(&hooks);        // from libflex.so
 *
 *    flexCompilerRegister() works there too when libflex.so's symbols are
 *    global in the process (the program links it, or it was loaded with
 *    RTLD_GLOBAL); otherwise it returns FLEX_STATUS_UNAVAILABLE.
\*===----------------------------------------------------------------------===*/

#ifndef FLEX_C_FLEXCOMPILER_H
#define FLEX_C_FLEXCOMPILER_H

#include "flex-c/Flex.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define FLEX_COMPILER_EXPORT __attribute__((visibility("default")))
#else
#define FLEX_COMPILER_EXPORT
#endif

/* FLEX_C_API_VERSION of the header the compiler library was built with; it
 * must equal libflex.so's flexGetVersion(). */
FLEX_COMPILER_EXPORT uint32_t flexCompilerGetVersion(void);

/* Fills `hooks` (compile_mlir, compile_config, user_data) for
 * flexSetCompiler. The caller sets hooks->struct_size to
 * sizeof(FlexCompilerHooks); a smaller size or NULL is
 * FLEX_STATUS_INVALID_ARGUMENT. The hooks may also be called directly: each
 * returns a malloc'ed plan JSON or error message, to be free()d. */
FLEX_COMPILER_EXPORT FlexStatus flexCompilerGetHooks(FlexCompilerHooks *hooks);

/* flexSetCompiler(hooks of this library) on the C API linked into this
 * program (see above for the shared library). */
FLEX_COMPILER_EXPORT FlexStatus flexCompilerRegister(void);

#ifdef __cplusplus
}
#endif

#endif /* FLEX_C_FLEXCOMPILER_H */
