/*===- flex_layer_check.h - Run a layer and check it ---------*- C -*-===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/*
 * What the install tests run once they have an executable, whether they
 * linked libflex.so (consumer.c, built against the installed package) or
 * dlopen()ed it (DlopenTest.c): the C API is reached through a table of
 * function pointers, FlexApi, filled either way.
 *
 * The check that could fail: every expert gets the same weights, so with
 * normalized gate weights and no dropped token (dropless capacity) the layer
 * is act(x W1) W2 for any routing, which a few loops compute in double.
 * Other layers are checked for outputs of the right shape, finite, nonzero.
\*===----------------------------------------------------------------------===*/

#ifndef FLEX_LAYER_CHECK_H
#define FLEX_LAYER_CHECK_H

#include "flex-c/Flex.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct FlexApi {
  const char *(*statusName)(FlexStatus);
  const char *(*lastError)(void);
  FlexStatus (*getLayerConfig)(FlexExecutable, FlexLayerConfig *);
  FlexStatus (*getNumArguments)(FlexExecutable, int64_t *);
  FlexStatus (*getArgument)(FlexExecutable, int64_t, FlexArgumentInfo *);
  FlexStatus (*forward)(FlexExecutable, const FlexBinding *, int64_t,
                        const FlexRunOptions *);
} FlexApi;

#define FLEX_CHECK_CALL(api, call)                                             \
  do {                                                                         \
    FlexStatus status_ = (call);                                               \
    if (status_ != FLEX_STATUS_OK) {                                           \
      fprintf(stderr, "%s failed: %s: %s\n", #call,                            \
              (api)->statusName(status_), (api)->lastError());                 \
      return 1;                                                                \
    }                                                                          \
  } while (0)

static float flex_check_next(unsigned long long *state) {
  *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (float)((*state >> 40) & 0xFFFFFF) / (float)0x1000000 - 0.5f;
}

static double flex_check_activation(int32_t activation, double v) {
  switch (activation) {
  case FLEX_ACTIVATION_RELU:
    return v > 0 ? v : 0;
  case FLEX_ACTIVATION_GELU:
    return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
  default: /* silu */
    return v / (1.0 + exp(-v));
  }
}

/* Binds every argument (inputs random, expert weights the same for every
 * expert, outputs NaN), runs forward and checks `out`. 0 when it passes. */
static int flex_check_layer(const FlexApi *api, FlexExecutable layer) {
  FlexLayerConfig c;
  FLEX_CHECK_CALL(api, api->getLayerConfig(layer, &c));
  int exact = c.dtype == FLEX_DTYPE_F32 && c.expert_kind == FLEX_EXPERT_FFN &&
              !c.bias && c.normalize_gate && c.gate_noise == 0 &&
              c.capacity_mode == FLEX_CAPACITY_DROPLESS;
  int64_t count = 0;
  FLEX_CHECK_CALL(api, api->getNumArguments(layer, &count));
  FlexBinding *bindings = calloc((size_t)count, sizeof *bindings);
  float *x = NULL, *w1 = NULL, *w2 = NULL, *out = NULL;
  int64_t out_elements = 0;
  int out_shape_ok = 0;
  unsigned long long state = 7;
  for (int64_t i = 0; i < count; ++i) {
    FlexArgumentInfo info;
    FLEX_CHECK_CALL(api, api->getArgument(layer, i, &info));
    unsigned char *data = malloc((size_t)info.bytes);
    int input =
        info.role == FLEX_ROLE_INPUT || info.role == FLEX_ROLE_GRAD_INPUT;
    if (info.dtype == FLEX_DTYPE_F32) {
      float *values = (float *)data;
      int64_t n = info.bytes / 4;
      /* Expert weights [E, a, b]: expert 0's repeated E times. */
      int64_t period = n;
      if (info.rank == 3 &&
          (!strcmp(info.name, "w1") || !strcmp(info.name, "w2")))
        period = info.shape[1] * info.shape[2];
      for (int64_t j = 0; j < n; ++j)
        values[j] = !input       ? NAN
                    : j < period ? flex_check_next(&state)
                                 : values[j % period];
    } else {
      memset(data, 0, (size_t)info.bytes); /* bf16/f16 zeros: finite */
    }
    bindings[i].name = info.name;
    bindings[i].data = data;
    bindings[i].bytes = info.bytes;
    if (!strcmp(info.name, "x"))
      x = (float *)data;
    else if (!strcmp(info.name, "w1"))
      w1 = (float *)data;
    else if (!strcmp(info.name, "w2"))
      w2 = (float *)data;
    else if (!strcmp(info.name, "out")) {
      out = (float *)data;
      out_elements = info.bytes / 4;
      out_shape_ok = info.rank == 2 && info.shape[0] == c.tokens &&
                     info.shape[1] == c.model_dim;
    }
  }
  FLEX_CHECK_CALL(api, api->forward(layer, bindings, count, NULL));

  int failed = !out || !out_shape_ok;
  if (failed)
    fprintf(stderr, "no output 'out' of shape [%lld, %lld]\n",
            (long long)c.tokens, (long long)c.model_dim);
  double max_error = 0, max_ref = 0, max_out = 0;
  if (!failed && c.dtype == FLEX_DTYPE_F32) {
    for (int64_t j = 0; j < out_elements; ++j) {
      if (!isfinite(out[j]))
        failed = 1;
      max_out = fmax(max_out, fabs(out[j]));
    }
    if (max_out == 0)
      failed = 1;
  }
  if (!failed && exact && x && w1 && w2) {
    int64_t d = c.model_dim, h = c.hidden_dim;
    double *hidden = malloc((size_t)h * sizeof(double));
    for (int64_t t = 0; t < c.tokens; ++t) {
      for (int64_t k = 0; k < h; ++k) {
        double sum = 0;
        for (int64_t i = 0; i < d; ++i)
          sum += (double)x[t * d + i] * w1[i * h + k];
        hidden[k] = flex_check_activation(c.activation, sum);
      }
      for (int64_t i = 0; i < d; ++i) {
        double sum = 0;
        for (int64_t k = 0; k < h; ++k)
          sum += hidden[k] * w2[k * d + i];
        max_ref = fmax(max_ref, fabs(sum));
        max_error = fmax(max_error, fabs(sum - out[t * d + i]));
      }
    }
    free(hidden);
    failed = max_ref == 0 || max_error > 1e-4 * max_ref;
  }
  printf("forward: out [%lld, %lld], max |out| %.4g, %s", (long long)c.tokens,
         (long long)c.model_dim, max_out,
         exact ? "identical experts: max error " : "finite and nonzero");
  if (exact)
    printf("%.3g of max |ref| %.4g", max_error, max_ref);
  printf(" -> %s\n", failed ? "FAIL" : "ok");
  for (int64_t i = 0; i < count; ++i)
    free(bindings[i].data);
  free(bindings);
  return failed;
}

/* The layer the tests compile: small, every expert kind's path through the
 * gate, dispatch, experts and combine. */
static FlexLayerConfig flex_check_config(void) {
  FlexLayerConfig c;
  memset(&c, 0, sizeof c);
  c.tokens = 64;
  c.model_dim = 32;
  c.hidden_dim = 48;
  c.experts = 4;
  c.top_k = 2;
  c.capacity_mode = FLEX_CAPACITY_DROPLESS;
  c.expert_kind = FLEX_EXPERT_FFN;
  c.activation = FLEX_ACTIVATION_RELU;
  c.dtype = FLEX_DTYPE_F32;
  c.router_fp32 = 1;
  c.normalize_gate = 1;
  c.batch_prioritized = 1;
  return c;
}

#endif /* FLEX_LAYER_CHECK_H */
