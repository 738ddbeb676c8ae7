/*===- embed.c - Embedding Flex through its C API -----------------------===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/*
 * What a framework does to use Flex: register the compiler, compile a layer
 * from a configuration struct (JIT), ask the executable which buffers it
 * takes, bind the caller's memory by name, run forward and backward, and
 * turn every failure into a message. Only include/flex-c/Flex.h is used.
 *
 * usage: flex-embed-example   (exit status 0 when every step worked)
 */

#include "flex-c/Flex.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

FlexStatus flexCompilerRegister(void); /* from the compiler library */

#define CHECK(call)                                                           \
  do {                                                                        \
    FlexStatus status_ = (call);                                              \
    if (status_ != FLEX_STATUS_OK) {                                          \
      fprintf(stderr, "%s failed: %s: %s\n", #call,                           \
              flexStatusName(status_), flexGetLastError());                   \
      return 1;                                                               \
    }                                                                         \
  } while (0)

/* A small deterministic generator, so the example needs nothing else. */
static float next_value(unsigned long long *state) {
  *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (float)((*state >> 40) & 0xFFFFFF) / (float)0x1000000 - 0.5f;
}

int main(void) {
  printf("Flex %s\n", flexGetVersionString());
  CHECK(flexCompilerRegister());

  /* The layer, as a framework would describe it. */
  FlexLayerConfig config;
  memset(&config, 0, sizeof config);
  config.tokens = 96;
  config.model_dim = 32;
  config.hidden_dim = 64;
  config.experts = 4;
  config.top_k = 2;
  config.capacity_mode = FLEX_CAPACITY_FIXED;
  config.capacity_factor = 1.25;
  config.expert_kind = FLEX_EXPERT_FFN;
  config.activation = FLEX_ACTIVATION_GELU;
  config.bias = 1;
  config.dtype = FLEX_DTYPE_F32;
  config.router_fp32 = 1;
  config.normalize_gate = 1;

  FlexCompileOptions options;
  memset(&options, 0, sizeof options);
  options.struct_size = sizeof options;
  options.training = 1;

  FlexContext context;
  FlexExecutable layer;
  CHECK(flexContextCreate("cpu", &context));
  CHECK(flexCompileLayerConfig(context, &config, &options, &layer));

  /* Bind every argument by name, with the size the executable asks for. */
  int64_t count = 0;
  CHECK(flexExecutableGetNumArguments(layer, &count));
  FlexBinding *bindings = calloc((size_t)count, sizeof *bindings);
  unsigned long long state = 42;
  float *out = NULL, *grad_w1 = NULL;
  int64_t out_count = 0, grad_w1_count = 0;
  for (int64_t i = 0; i < count; ++i) {
    FlexArgumentInfo info;
    CHECK(flexExecutableGetArgument(layer, i, &info));
    float *data = malloc((size_t)info.bytes);
    int64_t elements = info.bytes / (int64_t)sizeof(float);
    for (int64_t j = 0; j < elements; ++j)
      data[j] = info.role == FLEX_ROLE_INPUT || info.role == FLEX_ROLE_GRAD_INPUT
                    ? next_value(&state)
                    : NAN; /* outputs start as NaN: each must be written */
    bindings[i].name = info.name;
    bindings[i].data = data;
    bindings[i].bytes = info.bytes;
    if (strcmp(info.name, "out") == 0) {
      out = data;
      out_count = elements;
    } else if (strcmp(info.name, "grad_w1") == 0) {
      grad_w1 = data;
      grad_w1_count = elements;
    }
    printf("  %-10s role %d  %lld bytes\n", info.name, info.role,
           (long long)info.bytes);
  }

  CHECK(flexExecutableForward(layer, bindings, count, NULL));
  CHECK(flexExecutableBackward(layer, bindings, count, NULL));

  int written = out != NULL && grad_w1 != NULL;
  for (int64_t j = 0; written && j < out_count; ++j)
    written = !isnan(out[j]);
  for (int64_t j = 0; written && j < grad_w1_count; ++j)
    written = !isnan(grad_w1[j]);
  double run_us = 0;
  CHECK(flexExecutableGetLastRunMicros(layer, &run_us));
  printf("forward and backward ran (%s; backward %.1f us)\n",
         written ? "every output written" : "OUTPUT MISSING", run_us);

  /* A configuration that cannot be: the compiler says why. */
  FlexLayerConfig impossible = config;
  impossible.top_k = 9;
  FlexExecutable rejected = NULL;
  FlexStatus status =
      flexCompileLayerConfig(context, &impossible, &options, &rejected);
  printf("top_k = 9 of 4 experts: %s: %s\n", flexStatusName(status),
         flexGetLastError());

  for (int64_t i = 0; i < count; ++i)
    free(bindings[i].data);
  free(bindings);
  CHECK(flexExecutableDestroy(layer));
  CHECK(flexContextDestroy(context));
  return written && status != FLEX_STATUS_OK ? 0 : 1;
}
