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
  (void)binding;
  (void)options;
  if (flexGetVersion() != FLEX_C_API_VERSION)
    return 1;
  if (flexContextCreate(NULL, &context) != FLEX_STATUS_OK)
    return 2;
  if (flexContextDestroy(context) != FLEX_STATUS_OK)
    return 3;
  return 0;
}
