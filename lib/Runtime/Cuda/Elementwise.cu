//===- Elementwise.cu - Epilogues, GLU and their backward on the GPU ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the elementwise step ops over the rows of
// dispatch-shaped buffers (glu, activation_backward, glu_backward) and the
// GEMM epilogue that cuBLAS does not do for us (bias, exact GELU, SiLU, the
// `pre` copy). One warp per row; fp32 math, one rounding per store.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "Elementwise.h"

namespace flex::cuda {

using detail::kVector;
using detail::RowSpace;

namespace {

constexpr int kThreads = 256;

template <typename T, int V> struct Unit {
  __device__ static void load(const T *p, float *out) {
    if constexpr (V == kVector<T>) {
      detail::loadVector(p, out);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        out[i] = detail::toFloat(p[i]);
    }
  }
  __device__ static void store(T *p, const float *in) {
    if constexpr (V == kVector<T>) {
      detail::storeVector(p, in);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        p[i] = detail::fromFloat<T>(in[i]);
    }
  }
};

/// Calls body(row, expert) for every row the space touches, one warp each.
template <typename Body>
__device__ __forceinline__ void forEachRow(const RowSpace &space, int64_t rows,
                                           Body &&body) {
  int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) +
                  threadIdx.x) >> 5;
  int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // A dynamic routing touches no row past its last segment: the buffer's
  // worst-case bound can be many times more (dropless padded).
  rows = detail::usedRows(rows, space.segmentsEnd());
  for (int64_t row = warp; row < rows; row += warps) {
    int32_t expert = space.expertOf(row);
    if (expert >= 0)
      body(row, expert);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    epilogueKernel(const T *source, const T *__restrict__ bias, T *pre, T *c,
                   int64_t width, RowSpace space, int64_t rows, int epilogue,
                   float biasScale) {
  const int lane = threadIdx.x & 31;
  forEachRow(space, rows, [&](int64_t row, int32_t expert) {
    for (int64_t i = lane * V; i < width; i += 32 * V) {
      float v[V];
      Unit<T, V>::load(source + row * width + i, v);
      if (bias) {
        float b[V];
        Unit<T, V>::load(bias + expert * width + i, b);
        // Scaled first, as the CPU kernel (1 / s in fc2 of a sharded
        // expert: the s partial outputs add the bias once).
#pragma unroll
        for (int j = 0; j < V; ++j)
          v[j] = __fadd_rn(v[j], __fmul_rn(b[j], biasScale));
      }
      if (pre)
        Unit<T, V>::store(pre + row * width + i, v);
#pragma unroll
      for (int j = 0; j < V; ++j)
        v[j] = detail::applyEpilogue(epilogue, v[j]);
      Unit<T, V>::store(c + row * width + i, v);
    }
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gluKernel(const T *__restrict__ gateIn, const T *__restrict__ upIn,
              T *__restrict__ c, int64_t width, RowSpace space, int64_t rows) {
  const int lane = threadIdx.x & 31;
  forEachRow(space, rows, [&](int64_t row, int32_t) {
    for (int64_t i = lane * V; i < width; i += 32 * V) {
      float g[V], u[V];
      Unit<T, V>::load(gateIn + row * width + i, g);
      Unit<T, V>::load(upIn + row * width + i, u);
#pragma unroll
      for (int j = 0; j < V; ++j)
        g[j] = detail::siluForward(g[j]) * u[j];
      Unit<T, V>::store(c + row * width + i, g);
    }
  });
}

// grad and gradPre may be one buffer (grouped_gemm_activation_backward off
// the wgmma kernel applies the derivative in place): not __restrict__.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    activationBackwardKernel(const T *__restrict__ pre, const T *grad,
                             T *gradPre, int64_t width, RowSpace space,
                             int64_t rows, int act) {
  const int lane = threadIdx.x & 31;
  forEachRow(space, rows, [&](int64_t row, int32_t) {
    for (int64_t i = lane * V; i < width; i += 32 * V) {
      float p[V], g[V];
      Unit<T, V>::load(pre + row * width + i, p);
      Unit<T, V>::load(grad + row * width + i, g);
#pragma unroll
      for (int j = 0; j < V; ++j)
        g[j] *= detail::activationDerivative(act, p[j]);
      Unit<T, V>::store(gradPre + row * width + i, g);
    }
  });
}

// grad and gradGateIn may be one buffer (grouped_gemm_glu_backward off the
// wgmma kernel runs it in place): not __restrict__.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gluBackwardKernel(const T *__restrict__ gateIn, const T *__restrict__ upIn,
                      const T *grad, T *gradGateIn, T *__restrict__ gradUpIn,
                      int64_t width, RowSpace space, int64_t rows) {
  const int lane = threadIdx.x & 31;
  forEachRow(space, rows, [&](int64_t row, int32_t) {
    for (int64_t i = lane * V; i < width; i += 32 * V) {
      float g[V], u[V], d[V];
      Unit<T, V>::load(gateIn + row * width + i, g);
      Unit<T, V>::load(upIn + row * width + i, u);
      Unit<T, V>::load(grad + row * width + i, d);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float gradUp = d[j] * detail::siluForward(g[j]);
        float gradGate = d[j] * u[j] * detail::siluDerivative(g[j]);
        g[j] = gradGate;
        u[j] = gradUp;
      }
      Unit<T, V>::store(gradGateIn + row * width + i, g);
      Unit<T, V>::store(gradUpIn + row * width + i, u);
    }
  });
}

unsigned warpGrid(KernelContext &ctx, int64_t rows) {
  int64_t cap = static_cast<int64_t>(ctx.multiprocessors()) * 16;
  return detail::gridFor(rows, kThreads / 32, std::max<int64_t>(cap, 1));
}

Status checkTypes(std::initializer_list<DType> types, const char *what) {
  DType first = *types.begin();
  for (DType type : types)
    if (type != first)
      return Status(StatusCode::Unavailable,
                    std::string(what) +
                        " on CUDA needs operands of one dtype; got " +
                        std::string(toString(first)) + " and " +
                        std::string(toString(type)));
  return Status::ok();
}

} // namespace

Status applyGemmEpilogue(KernelContext &ctx, const void *source,
                         ReadBuffer bias, WriteBuffer pre, WriteBuffer c,
                         int64_t n, const ExpertRowSpace &space,
                         Epilogue epilogue, float biasScale) {
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0 || n == 0)
    return Status::ok();
  return detail::withType(c.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(
        n, sizeof(T), {source, bias.data, pre.data, c.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(source), static_cast<const T *>(bias.data),
          static_cast<T *>(pre.data), static_cast<T *>(c.data), n,
          detail::toKernel(space), rows, static_cast<int>(epilogue),
          biasScale);
    };
    if (vector)
      launch(epilogueKernel<T, kVector<T>>);
    else
      launch(epilogueKernel<T, 1>);
    return checkLaunch("GEMM epilogue kernel");
  });
}

Status glu(KernelContext &ctx, ReadBuffer gateIn, ReadBuffer upIn,
           WriteBuffer c, int64_t n, const ExpertRowSpace &space) {
  if (Status s = checkTypes({gateIn.type, upIn.type, c.type}, "glu"); !s)
    return s;
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0 || n == 0)
    return Status::ok();
  return detail::withType(c.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector =
        detail::vectorizable(n, sizeof(T), {gateIn.data, upIn.data, c.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(gateIn.data),
          static_cast<const T *>(upIn.data), static_cast<T *>(c.data), n,
          detail::toKernel(space), rows);
    };
    if (vector)
      launch(gluKernel<T, kVector<T>>);
    else
      launch(gluKernel<T, 1>);
    return checkLaunch("glu kernel");
  });
}

Status activationBackward(KernelContext &ctx, ReadBuffer pre, ReadBuffer grad,
                          WriteBuffer gradPre, int64_t n,
                          const ExpertRowSpace &space, Activation act) {
  if (Status s = checkTypes({pre.type, grad.type, gradPre.type},
                            "activation_backward");
      !s)
    return s;
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0 || n == 0)
    return Status::ok();
  return detail::withType(gradPre.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(n, sizeof(T),
                                       {pre.data, grad.data, gradPre.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(pre.data), static_cast<const T *>(grad.data),
          static_cast<T *>(gradPre.data), n, detail::toKernel(space), rows,
          static_cast<int>(act));
    };
    if (vector)
      launch(activationBackwardKernel<T, kVector<T>>);
    else
      launch(activationBackwardKernel<T, 1>);
    return checkLaunch("activation backward kernel");
  });
}

Status gluBackward(KernelContext &ctx, ReadBuffer gateIn, ReadBuffer upIn,
                   ReadBuffer grad, WriteBuffer gradGateIn,
                   WriteBuffer gradUpIn, int64_t n,
                   const ExpertRowSpace &space) {
  if (Status s = checkTypes({gateIn.type, upIn.type, grad.type,
                             gradGateIn.type, gradUpIn.type},
                            "glu_backward");
      !s)
    return s;
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0 || n == 0)
    return Status::ok();
  return detail::withType(grad.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(
        n, sizeof(T),
        {gateIn.data, upIn.data, grad.data, gradGateIn.data, gradUpIn.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(gateIn.data),
          static_cast<const T *>(upIn.data), static_cast<const T *>(grad.data),
          static_cast<T *>(gradGateIn.data), static_cast<T *>(gradUpIn.data),
          n, detail::toKernel(space), rows);
    };
    if (vector)
      launch(gluBackwardKernel<T, kVector<T>>);
    else
      launch(gluBackwardKernel<T, 1>);
    return checkLaunch("glu backward kernel");
  });
}

} // namespace flex::cuda
