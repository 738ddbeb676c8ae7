/*===- CAPIHeaderCheck.c - The C API header compiles as C ------------------===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/* This file checks that include/flex-c/Flex.h is valid C and usable from C:
 * CAPITest calls flexCHeaderCheck. */

#include "flex-c/Flex.h"

int flexCHeaderCheck(void) {
  FlexContext context = NULL;
  FlexBinding binding = {"x", NULL, 0};
  FlexRunOptions options = {sizeof(FlexRunOptions), FLEX_RUN_NO_TIMING, NULL};
  FlexRunOptions perCall = {
      sizeof(FlexRunOptions), FLEX_RUN_SEED, NULL, NULL, 0, 42};
  (void)binding;
  (void)options;
  (void)perCall;
  if (flexGetVersion() != FLEX_C_API_VERSION)
    return 1;
  /* The layout callers of the first header (struct_size 16) rely on, and
   * the per-call fields after it (LP64). */
  if (sizeof(void *) == 8 &&
      (offsetof(FlexRunOptions, stream) != 8 ||
       offsetof(FlexRunOptions, workspace) != 16 ||
       offsetof(FlexRunOptions, workspace_bytes) != 24 ||
       offsetof(FlexRunOptions, seed) != 32 || sizeof(FlexRunOptions) != 40))
    return 4;
  if (flexGetRunOptionsSize() != sizeof(FlexRunOptions))
    return 5;
  if (flexContextCreate(NULL, &context) != FLEX_STATUS_OK)
    return 2;
  if (flexContextDestroy(context) != FLEX_STATUS_OK)
    return 3;
  return 0;
}
