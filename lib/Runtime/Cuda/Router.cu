//===- Router.cu - router and router_backward on the GPU ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the router GEMM of [gate-1] and its backward as
// tiled fp32 kernels rather than cuBLAS: the router mixes storage types
// (bf16 tokens with an fp32 Wg when router_fp32), which no cuBLAS GEMM
// takes without an fp32 copy of x, and its N = E is small, where a GEMM
// library tiles poorly. All three are bound by reading x once.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

namespace flex::cuda {

namespace {

constexpr int kThreads = 256;

/// Loads 8 consecutive elements of a row as fp32, zero past `limit`.
template <typename T>
__device__ __forceinline__ void load8(const T *p, int64_t available,
                                      bool vector, float *out) {
  if (vector && available >= 8) {
    if constexpr (sizeof(T) == 2) {
      detail::loadVector(p, out);
    } else {
      detail::loadVector(p, out);
      detail::loadVector(p + 4, out + 4);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    out[i] = i < available ? detail::toFloat(p[i]) : 0.0f;
}

/// logits[M, N] (f32) = a[M, K] @ b[K, N]; BN columns per block.
template <typename TA, typename TB, int BN>
__global__ void __launch_bounds__(kThreads)
    skinnyGemmKernel(const TA *__restrict__ a, const TB *__restrict__ b,
                     float *__restrict__ c, int64_t m, int64_t n, int64_t k,
                     bool vectorA) {
  constexpr int BM = 64, BK = 32, TN = BN / 8;
  __shared__ float as[BK][BM + 4];
  __shared__ float bs[BK][BN];
  const int tid = threadIdx.x, ty = tid / 8, tx = tid % 8;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  float acc[2][TN] = {};
  const int loadRow = tid / 4, loadK = (tid % 4) * 8;
  for (int64_t k0 = 0; k0 < k; k0 += BK) {
    float values[8];
    int64_t row = m0 + loadRow;
    if (row < m) {
      load8(a + row * k + k0 + loadK, k - (k0 + loadK), vectorA, values);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        values[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      as[loadK + i][loadRow] = values[i];
    for (int i = tid; i < BK * BN; i += kThreads) {
      int kk = i / BN, nn = i % BN;
      bs[kk][nn] = k0 + kk < k && n0 + nn < n
                       ? detail::toFloat(b[(k0 + kk) * n + n0 + nn])
                       : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float a0 = as[kk][ty * 2], a1 = as[kk][ty * 2 + 1];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        float bv = bs[kk][tx * TN + j];
        acc[0][j] += a0 * bv;
        acc[1][j] += a1 * bv;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int64_t row = m0 + ty * 2 + r;
    if (row >= m)
      continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      int64_t col = n0 + tx * TN + j;
      if (col < n)
        c[row * n + col] = acc[r][j];
    }
  }
}

/// gradX[T, d] += gradLogits[T, E] @ wg[d, E]^T: 32 tokens x 256 columns
/// per block, experts in chunks of 32.
template <typename TX, typename TW>
__global__ void __launch_bounds__(kThreads)
    routerGradXKernel(const float *__restrict__ gradLogits,
                      const TW *__restrict__ wg, TX *__restrict__ gradX,
                      int64_t tokens, int64_t width, int64_t experts) {
  constexpr int TT = 32, EC = 32;
  __shared__ float gl[TT][EC + 1];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TT;
  float acc[TT] = {};
  for (int64_t e0 = 0; e0 < experts; e0 += EC) {
    for (int idx = threadIdx.x; idx < TT * EC; idx += kThreads) {
      int tt = idx / EC, ee = idx % EC;
      gl[tt][ee] = t0 + tt < tokens && e0 + ee < experts
                       ? gradLogits[(t0 + tt) * experts + e0 + ee]
                       : 0.0f;
    }
    float w[EC];
#pragma unroll
    for (int ee = 0; ee < EC; ++ee)
      w[ee] = i < width && e0 + ee < experts
                  ? detail::toFloat(wg[i * experts + e0 + ee])
                  : 0.0f;
    __syncthreads();
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int ee = 0; ee < EC; ++ee)
        acc[tt] += gl[tt][ee] * w[ee];
    __syncthreads();
  }
  if (i >= width)
    return;
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    if (t0 + tt >= tokens)
      break;
    TX *p = gradX + (t0 + tt) * width + i;
    *p = detail::fromFloat<TX>(detail::toFloat(*p) + acc[tt]);
  }
}

/// partial[split][d, E] = x[tokens of split]^T @ gradLogits[same tokens]:
/// 64 columns of x per block, experts in chunks of 32 (8 per thread).
template <typename TX>
__global__ void __launch_bounds__(kThreads)
    routerGradWgKernel(const TX *__restrict__ x,
                       const float *__restrict__ gradLogits, int64_t tokens,
                       int64_t width, int64_t experts, int64_t tokensPerSplit,
                       float *__restrict__ partial) {
  constexpr int TT = 32, IC = 64, EC = 32;
  __shared__ float xs[TT][IC + 1];
  __shared__ float gs[TT][EC + 1];
  const int il = threadIdx.x % IC, eg = threadIdx.x / IC; // eg in 0..3
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * IC;
  const int64_t split = blockIdx.y;
  const int64_t tBegin = split * tokensPerSplit;
  const int64_t tEnd = min(tokens, tBegin + tokensPerSplit);
  for (int64_t e0 = 0; e0 < experts; e0 += EC) {
    float acc[EC / 4] = {};
    for (int64_t t0 = tBegin; t0 < tEnd; t0 += TT) {
      for (int idx = threadIdx.x; idx < TT * IC; idx += kThreads) {
        int tt = idx / IC, ii = idx % IC;
        xs[tt][ii] = t0 + tt < tEnd && i0 + ii < width
                         ? detail::toFloat(x[(t0 + tt) * width + i0 + ii])
                         : 0.0f;
      }
      for (int idx = threadIdx.x; idx < TT * EC; idx += kThreads) {
        int tt = idx / EC, ee = idx % EC;
        gs[tt][ee] = t0 + tt < tEnd && e0 + ee < experts
                         ? gradLogits[(t0 + tt) * experts + e0 + ee]
                         : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int tt = 0; tt < TT; ++tt) {
        float xv = xs[tt][il];
#pragma unroll
        for (int q = 0; q < EC / 4; ++q)
          acc[q] += xv * gs[tt][eg + 4 * q];
      }
      __syncthreads();
    }
    int64_t i = i0 + il;
    if (i < width)
#pragma unroll
      for (int q = 0; q < EC / 4; ++q) {
        int64_t e = e0 + eg + 4 * q;
        if (e < experts)
          partial[(split * width + i) * experts + e] = acc[q];
      }
  }
}

template <typename TW>
__global__ void splitReduceKernel(const float *__restrict__ partial,
                                  int64_t count, int64_t splits,
                                  TW *__restrict__ out) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count)
    return;
  float sum = 0.0f;
  for (int64_t s = 0; s < splits; ++s)
    sum += partial[s * count + i];
  out[i] = detail::fromFloat<TW>(sum);
}

} // namespace

Status router(KernelContext &ctx, ReadBuffer x, ReadBuffer wg, float *logits,
              int64_t tokens, int64_t modelDim, int64_t experts) {
  if (tokens == 0 || experts == 0)
    return Status::ok();
  return detail::withType(x.type, [&](auto xTag) -> Status {
    using TA = decltype(xTag);
    return detail::withType(wg.type, [&](auto wTag) -> Status {
      using TB = decltype(wTag);
      bool vectorA = modelDim % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
      auto launch = [&](auto kernel, int bn) {
        dim3 grid(detail::gridFor(tokens, 64, INT32_MAX),
                  detail::gridFor(experts, bn, 65535));
        kernel<<<grid, kThreads, 0, ctx.stream()>>>(
            static_cast<const TA *>(x.data), static_cast<const TB *>(wg.data),
            logits, tokens, experts, modelDim, vectorA);
      };
      if (experts <= 8)
        launch(skinnyGemmKernel<TA, TB, 8>, 8);
      else if (experts <= 16)
        launch(skinnyGemmKernel<TA, TB, 16>, 16);
      else if (experts <= 32)
        launch(skinnyGemmKernel<TA, TB, 32>, 32);
      else
        launch(skinnyGemmKernel<TA, TB, 64>, 64);
      return checkLaunch("router kernel");
    });
  });
}

Status routerBackward(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                      const float *gradLogits, int64_t tokens,
                      int64_t modelDim, int64_t experts, WriteBuffer gradX,
                      WriteBuffer gradWg) {
  cudaStream_t stream = ctx.stream();
  if (gradX.data && tokens > 0 && modelDim > 0) {
    Status status = detail::withType(gradX.type, [&](auto xTag) -> Status {
      using TX = decltype(xTag);
      return detail::withType(wg.type, [&](auto wTag) -> Status {
        using TW = decltype(wTag);
        dim3 grid(detail::gridFor(modelDim, kThreads, INT32_MAX),
                  detail::gridFor(tokens, 32, 65535));
        if ((tokens + 31) / 32 > 65535)
          return Status(StatusCode::Unavailable,
                        "router_backward on CUDA supports up to 2097120 "
                        "tokens; got " + std::to_string(tokens));
        routerGradXKernel<TX, TW><<<grid, kThreads, 0, stream>>>(
            gradLogits, static_cast<const TW *>(wg.data),
            static_cast<TX *>(gradX.data), tokens, modelDim, experts);
        return checkLaunch("router grad_x kernel");
      });
    });
    if (!status)
      return status;
  }
  if (!gradWg.data || modelDim == 0 || experts == 0)
    return Status::ok();
  int64_t count = modelDim * experts;
  if (tokens == 0)
    return checkCuda(cudaMemsetAsync(gradWg.data, 0,
                                     count * dtypeSize(gradWg.type), stream),
                     "clearing grad_wg");
  // Split the token reduction so the grid fills the device.
  int64_t columnTiles = (modelDim + 63) / 64;
  int64_t splits = std::clamp<int64_t>(
      (4 * ctx.multiprocessors() + columnTiles - 1) / columnTiles, 1,
      std::min<int64_t>((tokens + 31) / 32, 65535));
  int64_t tokensPerSplit = ((tokens + splits - 1) / splits + 31) / 32 * 32;
  splits = (tokens + tokensPerSplit - 1) / tokensPerSplit;
  void *scratch = nullptr;
  if (Status s = ctx.scratch(3, 4 * splits * count, scratch); !s)
    return s;
  auto *partial = static_cast<float *>(scratch);
  Status status = detail::withType(x.type, [&](auto xTag) -> Status {
    using TX = decltype(xTag);
    dim3 grid(static_cast<unsigned>(columnTiles),
              static_cast<unsigned>(splits));
    routerGradWgKernel<TX><<<grid, kThreads, 0, stream>>>(
        static_cast<const TX *>(x.data), gradLogits, tokens, modelDim,
        experts, tokensPerSplit, partial);
    return checkLaunch("router grad_wg kernel");
  });
  if (!status)
    return status;
  return detail::withType(gradWg.type, [&](auto wTag) -> Status {
    using TW = decltype(wTag);
    splitReduceKernel<TW><<<detail::gridFor(count, 256, INT32_MAX), 256, 0,
                            stream>>>(partial, count, splits,
                                      static_cast<TW *>(gradWg.data));
    return checkLaunch("router grad_wg reduce kernel");
  });
}

} // namespace flex::cuda
