/*===- consumer.c - An outside program using the installed Flex ---------===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/*
 * Built by the install test (test/Install) against `cmake --install`'s tree
 * with find_package(Flex): links Flex::Runtime (libflex.so) and, when the
 * package has it, Flex::Compiler (libflex_compiler.so). It compiles a small
 * layer in-process (flexCompilerRegister: libflex.so is linked, so its
 * flexSetCompiler is global) and loads the plan file it is given, runs
 * forward on the CPU and checks the output (flex_layer_check.h).
 *
 * usage: flex-consumer [PLAN.json]   (exit status 0 when every check passed)
\*===----------------------------------------------------------------------===*/

#include "flex-c/Flex.h"
#ifdef FLEX_CONSUMER_HAVE_COMPILER
#include "flex-c/FlexCompiler.h"
#endif

#include "flex_layer_check.h"

int main(int argc, char **argv) {
  FlexApi api = {flexStatusName,
                 flexGetLastError,
                 flexExecutableGetLayerConfig,
                 flexExecutableGetNumArguments,
                 flexExecutableGetArgument,
                 flexExecutableForward};
  const FlexApi *a = &api;
  printf("%s\n", flexGetVersionString());
  FlexContext context;
  FLEX_CHECK_CALL(a, flexContextCreate("cpu", &context));
  int failed = 0, ran = 0;

#ifdef FLEX_CONSUMER_HAVE_COMPILER
  if (flexCompilerGetVersion() != flexGetVersion()) {
    fprintf(stderr, "compiler library C API %u, runtime %u\n",
            flexCompilerGetVersion(), flexGetVersion());
    return 1;
  }
  FLEX_CHECK_CALL(a, flexCompilerRegister());
  FlexLayerConfig config = flex_check_config();
  FlexExecutable compiled;
  FLEX_CHECK_CALL(a, flexCompileLayerConfig(context, &config, NULL, &compiled));
  printf("compiled a layer in-process\n");
  failed |= flex_check_layer(a, compiled);
  FLEX_CHECK_CALL(a, flexExecutableDestroy(compiled));
  ++ran;
#endif

  if (argc > 1) {
    FlexExecutable loaded;
    FLEX_CHECK_CALL(
        a, flexExecutableCreateFromPlanFile(context, argv[1], &loaded));
    printf("loaded %s\n", argv[1]);
    failed |= flex_check_layer(a, loaded);
    FLEX_CHECK_CALL(a, flexExecutableDestroy(loaded));
    ++ran;
  }
  FLEX_CHECK_CALL(a, flexContextDestroy(context));
  if (ran == 0) {
    fprintf(stderr, "nothing ran: no compiler in the package, no plan given\n");
    return 1;
  }
  printf("%s\n", failed ? "FAILED" : "PASSED");
  return failed;
}
