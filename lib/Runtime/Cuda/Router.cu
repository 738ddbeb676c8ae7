//===- Router.cu - router and router_backward on the GPU ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the router GEMM of [gate-1] and its backward. The
// router mixes storage types (bf16 tokens with an fp32 Wg when router_fp32),
// which no cuBLAS GEMM takes as they are, and its N = E is small. With bf16
// tokens both directions go through cuBLAS on bf16 tensor cores, the fp32
// operands split into bf16 parts (v = h1 + h2 + h3 to fp32 precision; the
// products of bf16 values are exact in fp32), so they keep fp32 accuracy at
// the speed of reading x (and grad_x) once. f32 and f16 tokens use the tiled
// fp32 kernels below. For few tokens (T <= 256) the forward is one kernel of
// fp32 FMAs instead (routerFewTokensKernel): three launches (weight split,
// GEMM, part sums) cost more than the work at decode sizes.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "DependentLaunch.cuh"
#include "RouterInternal.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

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

/// Splits grad_logits [T, E] into bf16 parts: parts3 [T, 3E] = [h1 | h2 | h3]
/// (for grad_wg) and pairs [T, 3E] = [h1 | h1 | h2] (for grad_x, against
/// [w1 | w2 | w1]).
__global__ void splitGradLogitsKernel(const float *__restrict__ gradLogits,
                                      int64_t tokens, int64_t experts,
                                      __nv_bfloat16 *__restrict__ parts3,
                                      __nv_bfloat16 *__restrict__ pairs) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= tokens * experts)
    return;
  int64_t t = i / experts, e = i - t * experts;
  float v = gradLogits[i];
  __nv_bfloat16 h1 = __float2bfloat16_rn(v);
  float r1 = v - __bfloat162float(h1);
  __nv_bfloat16 h2 = __float2bfloat16_rn(r1);
  __nv_bfloat16 h3 = __float2bfloat16_rn(r1 - __bfloat162float(h2));
  int64_t row = t * 3 * experts;
  parts3[row + e] = h1;
  parts3[row + experts + e] = h2;
  parts3[row + 2 * experts + e] = h3;
  pairs[row + e] = h1;
  pairs[row + experts + e] = h1;
  pairs[row + 2 * experts + e] = h2;
}

/// wg [d, E] -> [d, 3E] = [w1 | w2 | w1] with w = w1 + w2 in bf16 parts.
template <typename TW>
__global__ void splitRouterWeightKernel(const TW *__restrict__ wg,
                                        int64_t width, int64_t experts,
                                        __nv_bfloat16 *__restrict__ out) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= width * experts)
    return;
  int64_t c = i / experts, e = i - c * experts;
  float w = detail::toFloat(wg[i]);
  __nv_bfloat16 w1 = __float2bfloat16_rn(w);
  __nv_bfloat16 w2 = __float2bfloat16_rn(w - __bfloat162float(w1));
  int64_t row = c * 3 * experts;
  out[row + e] = w1;
  out[row + experts + e] = w2;
  out[row + 2 * experts + e] = w1;
}

/// grad_wg[c, e] = sum of the three part columns of sums [d, 3E].
template <typename TW>
__global__ void sumPartsKernel(const float *__restrict__ sums, int64_t width,
                               int64_t experts, TW *__restrict__ gradWg) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= width * experts)
    return;
  int64_t c = i / experts, e = i - c * experts;
  const float *row = sums + c * 3 * experts;
  gradWg[i] = detail::fromFloat<TW>(row[e] + row[experts + e] +
                                    row[2 * experts + e]);
}

Status checkCublasCall(cublasStatus_t status, const char *what) {
  if (status == CUBLAS_STATUS_SUCCESS)
    return Status::ok();
  return Status(StatusCode::Internal, std::string(what) + " failed: " +
                                          cublasGetStatusName(status));
}

/// router_backward for bf16 tokens through cuBLAS (see the file comment):
/// grad_x [T, d] += [h1 | h1 | h2] [T, 3E] @ [w1 | w2 | w1]^T [3E, d] in
/// one GEMM (one pass over grad_x), and grad_wg = x^T [h1 | h2 | h3] summed
/// over the three parts (one pass over x).
Status routerBackwardBf16(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                          const float *gradLogits, int64_t tokens,
                          int64_t modelDim, int64_t experts,
                          WriteBuffer gradX, WriteBuffer gradWg) {
  cudaStream_t stream = ctx.stream();
  auto handle = static_cast<cublasHandle_t>(ctx.cublasHandle());
  const int64_t k3 = 3 * experts;
  auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t partsBytes = align(tokens * k3 * 2);
  const int64_t weightBytes = align(modelDim * k3 * 2);
  const int64_t sumsBytes = align(modelDim * k3 * 4);
  void *scratch = nullptr;
  if (Status s = ctx.scratch(3, 2 * partsBytes + weightBytes + sumsBytes,
                             scratch);
      !s)
    return s;
  char *base = static_cast<char *>(scratch);
  auto *parts3 = reinterpret_cast<__nv_bfloat16 *>(base);
  auto *pairs = reinterpret_cast<__nv_bfloat16 *>(base + partsBytes);
  auto *weights = reinterpret_cast<__nv_bfloat16 *>(base + 2 * partsBytes);
  auto *sums = reinterpret_cast<float *>(base + 2 * partsBytes + weightBytes);

  splitGradLogitsKernel<<<detail::gridFor(tokens * experts, 256, INT32_MAX),
                          256, 0, stream>>>(gradLogits, tokens, experts,
                                            parts3, pairs);
  if (Status s = checkLaunch("router grad_logits split kernel"); !s)
    return s;
  const float one = 1.0f, zero = 0.0f;
  if (gradX.data) {
    Status status = detail::withType(wg.type, [&](auto wTag) -> Status {
      using TW = decltype(wTag);
      splitRouterWeightKernel<TW>
          <<<detail::gridFor(modelDim * experts, 256, INT32_MAX), 256, 0,
             stream>>>(static_cast<const TW *>(wg.data), modelDim, experts,
                       weights);
      return checkLaunch("router weight split kernel");
    });
    if (!status)
      return status;
    // Column-major: grad_x^T [d, T] += weights^T [d, 3E] pairs^T [3E, T].
    if (Status s = checkCublasCall(
            cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N,
                         static_cast<int>(modelDim), static_cast<int>(tokens),
                         static_cast<int>(k3), &one, weights, CUDA_R_16BF,
                         static_cast<int>(k3), pairs, CUDA_R_16BF,
                         static_cast<int>(k3), &one, gradX.data, CUDA_R_16BF,
                         static_cast<int>(modelDim), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx (router_backward grad_x)");
        !s)
      return s;
  }
  if (!gradWg.data)
    return Status::ok();
  // Column-major: sums [3E, d] = parts3 [3E, T] (its row-major [T, 3E]
  // read as is) times x [T, d] (x's column-major [d, T], transposed).
  if (Status s = checkCublasCall(
          cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(k3),
                       static_cast<int>(modelDim), static_cast<int>(tokens),
                       &one, parts3, CUDA_R_16BF, static_cast<int>(k3), x.data,
                       CUDA_R_16BF, static_cast<int>(modelDim), &zero, sums,
                       CUDA_R_32F, static_cast<int>(k3), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx (router_backward grad_wg)");
      !s)
    return s;
  return detail::withType(gradWg.type, [&](auto wTag) -> Status {
    using TW = decltype(wTag);
    sumPartsKernel<TW><<<detail::gridFor(modelDim * experts, 256, INT32_MAX),
                         256, 0, stream>>>(sums, modelDim, experts,
                                           static_cast<TW *>(gradWg.data));
    return checkLaunch("router grad_wg sum kernel");
  });
}

/// wg [d, E] -> [d, P*E]: P bf16 parts of each weight, w = w1 + ... + wP to
/// fp32 precision (P = 3 for an fp32 wg, 1 for a bf16 one).
template <typename TW>
__global__ void weightPartsKernel(const TW *__restrict__ wg, int64_t width,
                                  int64_t experts, int parts,
                                  __nv_bfloat16 *__restrict__ out) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= width * experts)
    return;
  int64_t c = i / experts, e = i - c * experts;
  float rest = detail::toFloat(wg[i]);
  for (int p = 0; p < parts; ++p) {
    __nv_bfloat16 part = __float2bfloat16_rn(rest);
    out[(c * parts + p) * experts + e] = part;
    rest -= __bfloat162float(part);
  }
}

/// logits[t, e] = sum over the P part columns of sums [T, P*E].
__global__ void sumLogitPartsKernel(const float *__restrict__ sums,
                                    int64_t tokens, int64_t experts, int parts,
                                    float *__restrict__ logits) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= tokens * experts)
    return;
  int64_t t = i / experts, e = i - t * experts;
  const float *row = sums + t * parts * experts;
  float sum = 0.0f;
  for (int p = 0; p < parts; ++p)
    sum += row[p * experts + e];
  logits[i] = sum;
}

/// The router for bf16 tokens through cuBLAS: logits [T, E] = x [T, d] @
/// [w1 .. wP] [d, P*E], the parts summed in fp32 (one pass over x).
Status routerBf16(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                  float *logits, int64_t tokens, int64_t modelDim,
                  int64_t experts) {
  cudaStream_t stream = ctx.stream();
  auto handle = static_cast<cublasHandle_t>(ctx.cublasHandle());
  const int parts = wg.type == DType::BF16 ? 1 : 3;
  const int64_t n = parts * experts;
  auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t weightBytes = align(modelDim * n * 2);
  void *scratch = nullptr;
  if (Status s = ctx.scratch(4, weightBytes + align(tokens * n * 4), scratch);
      !s)
    return s;
  auto *weights = static_cast<__nv_bfloat16 *>(scratch);
  auto *sums = reinterpret_cast<float *>(static_cast<char *>(scratch) +
                                         weightBytes);
  Status status = detail::withType(wg.type, [&](auto wTag) -> Status {
    using TW = decltype(wTag);
    weightPartsKernel<TW>
        <<<detail::gridFor(modelDim * experts, 256, INT32_MAX), 256, 0,
           stream>>>(static_cast<const TW *>(wg.data), modelDim, experts,
                     parts, weights);
    return checkLaunch("router weight parts kernel");
  });
  if (!status)
    return status;
  // Column-major: sums [P*E, T] = weights [P*E, d] x [d, T] (both row-major
  // buffers read as they are).
  const float one = 1.0f, zero = 0.0f;
  if (Status s = checkCublasCall(
          cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                       static_cast<int>(tokens), static_cast<int>(modelDim),
                       &one, weights, CUDA_R_16BF, static_cast<int>(n), x.data,
                       CUDA_R_16BF, static_cast<int>(modelDim), &zero, sums,
                       CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx (router)");
      !s)
    return s;
  sumLogitPartsKernel<<<detail::gridFor(tokens * experts, 256, INT32_MAX),
                        256, 0, stream>>>(sums, tokens, experts, parts,
                                          logits);
  return checkLaunch("router logits sum kernel");
}

//===----------------------------------------------------------------------===//
// The router for few tokens
//===----------------------------------------------------------------------===//

/// Few tokens: at T <= 256 the kernel below does T * E * d FMAs on CUDA
/// cores, where the bf16 path pays three launches (weight split, cuBLAS,
/// part sums) whatever T. Its work grows with T while the tensor-core GEMM's
/// barely does, and it reads wg again per token tile: measured on an H100
/// (bench/RESULTS.md Run 23, d 2048, E 64) 16.0 against 18.5 us at T 256,
/// 21.9 against 18.5 at T 512, so larger T keeps the GEMM.
constexpr int64_t kRouterFewTokens = 256;
/// x columns staged per step: one 256-thread load of 8 elements per thread
/// for 8 tokens; each warp takes 32 of them.
constexpr int kFewChunk = 256;
constexpr int kFewWarps = kThreads / 32;

/// logits[t0 .. t0+TT, e0 .. e0+32] (f32) = x @ wg over the K columns of
/// split blockIdx.z for one block: lane = expert, the K columns of each
/// staged chunk split over the 8 warps, each warp a chain of fp32 FMAs
/// (exact products, one rounding each), the warps' sums then added in warp
/// order: the same bits on every run. With several splits each writes its
/// sums to `out` + split * T * E; with `tickets` (one per token and expert
/// tile, zero) the tile's last split to finish adds the splits' sums in
/// split order into `logits` and leaves its ticket zero, else
/// routerSplitSumKernel does.
template <typename TX, typename TW, int TT>
__global__ void __launch_bounds__(kThreads)
    routerFewTokensKernel(const TX *__restrict__ x, const TW *__restrict__ wg,
                          float *__restrict__ out, int64_t tokens,
                          int64_t width, int64_t experts, bool vectorX,
                          int64_t splitWidth, uint32_t *__restrict__ tickets,
                          float *__restrict__ logits) {
  __shared__ __align__(16) float xs[TT][kFewChunk];
  __shared__ float partial[kFewWarps][TT][32];
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * 32 + lane;
  const int64_t kBegin = static_cast<int64_t>(blockIdx.z) * splitWidth;
  const int64_t kEnd = min(width, kBegin + splitWidth);
  float acc[TT] = {};
  for (int64_t k0 = kBegin; k0 < kEnd; k0 += kFewChunk) {
    for (int i = tid; i < TT * kFewChunk / 8; i += kThreads) {
      const int row = i / (kFewChunk / 8), column = (i % (kFewChunk / 8)) * 8;
      float values[8] = {};
      if (t0 + row < tokens && k0 + column < kEnd)
        load8(x + (t0 + row) * width + k0 + column, kEnd - (k0 + column),
              vectorX, values);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        xs[row][column + j] = values[j];
    }
    __syncthreads();
    const int begin = warp * (kFewChunk / kFewWarps);
    float w[kFewChunk / kFewWarps];
#pragma unroll
    for (int j = 0; j < kFewChunk / kFewWarps; ++j) {
      const int64_t k = k0 + begin + j;
      w[j] =
          k < kEnd && e < experts ? detail::toFloat(wg[k * experts + e]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kFewChunk / kFewWarps; j += 4)
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float4 v = *reinterpret_cast<const float4 *>(&xs[t][begin + j]);
        acc[t] = __fmaf_rn(v.x, w[j], acc[t]);
        acc[t] = __fmaf_rn(v.y, w[j + 1], acc[t]);
        acc[t] = __fmaf_rn(v.z, w[j + 2], acc[t]);
        acc[t] = __fmaf_rn(v.w, w[j + 3], acc[t]);
      }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < TT; ++t)
    partial[warp][t][lane] = acc[t];
  __syncthreads();
  // The tile's TT x 32 sums, a thread each in rounds of the block (TT 16
  // has two per thread: 256 threads).
  const int64_t count = tokens * experts;
  for (int cell = tid; cell < TT * 32; cell += kThreads) {
    const int t = cell / 32;
    if (t0 + t >= tokens || e >= experts)
      continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kFewWarps; ++w)
      sum = __fadd_rn(sum, partial[w][t][lane]);
    out[static_cast<int64_t>(blockIdx.z) * count + (t0 + t) * experts + e] =
        sum;
  }
  if (!tickets)
    return;
  // The fence orders each thread's sums before the block's ticket; the
  // last block's fence orders its reads after the other splits' tickets.
  __shared__ bool lastSplit;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    uint32_t *ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
    lastSplit = atomicAdd(ticket, 1u) == gridDim.z - 1;
    if (lastSplit)
      *ticket = 0;
  }
  __syncthreads();
  if (!lastSplit)
    return;
  __threadfence();
  for (int cell = tid; cell < TT * 32; cell += kThreads) {
    const int t = cell / 32;
    if (t0 + t >= tokens || e >= experts)
      continue;
    const int64_t at = (t0 + t) * experts + e;
    float sum = 0.0f;
    for (unsigned z = 0; z < gridDim.z; ++z)
      sum = __fadd_rn(sum, __ldcg(out + z * count + at));
    logits[at] = sum;
  }
}

/// logits = the splits' sums added in split order (the same bits every run).
__global__ void routerSplitSumKernel(const float *__restrict__ partial,
                                     int64_t splits, int64_t count,
                                     float *__restrict__ logits) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count)
    return;
  float sum = 0.0f;
  for (int64_t z = 0; z < splits; ++z)
    sum = __fadd_rn(sum, partial[z * count + i]);
  logits[i] = sum;
}

/// 4 tokens per block where 8 would leave SMs idle, else 8 (fewer re-reads
/// of wg). K is split over blocks of kFewSplitChunks staged chunks each (the
/// splits' sums added by one more kernel, in split order): each block's
/// serial chain of staged chunks is what bounds the kernel at these sizes
/// (16 chunks of d 4096 in one block took 38.5 us at T 128 on an H100, 4
/// splits of 4 chunks 19.3 us: Runs 26, 27). The split depends on d alone,
/// so a token's logits have the same bits whatever T (<= 256) and the card.
constexpr int64_t kFewSplitChunks = 2;

/// Whether Auto adds the K splits in each tile's last block instead of a
/// second kernel (RouterPath::FewTokensLastSplit): the same bits, 0.5-0.7 us
/// less on an H100 (flex-gate-bench, d 2048, E 64, T 32 to 2048,
/// 2026-12-07).
constexpr bool kAutoSumsInLastSplit = true;
/// Auto's choice; FLEX_ROUTER_SUM=last-split or =kernel to time the layers
/// with either (a knob of the measurements, as HopperGroupedGemm.cu's
/// FLEX_WGMMA_*).
bool autoSumsInLastSplit() {
  static const bool sums = [] {
    const char *v = std::getenv("FLEX_ROUTER_SUM");
    if (v && std::string_view(v) == "kernel")
      return false;
    return v ? std::string_view(v) == "last-split" : kAutoSumsInLastSplit;
  }();
  return sums;
}

/// Tokens per block of the few-token kernel: `rule`'s, or 4, 8 or 16 from
/// FLEX_ROUTER_TILE_TOKENS (a knob of the measurements: every block re-reads
/// its split of wg from L2, 32 MB at D1's T 256 with 4 tokens a block, so
/// larger tiles read less but fill fewer SMs). A token's sums are the same
/// whatever the tile: each token's chain of FMAs does not depend on it.
int routerTileTokens(int rule) {
  static const int asked = [] {
    const char *v = std::getenv("FLEX_ROUTER_TILE_TOKENS");
    const int n = v ? std::atoi(v) : 0;
    return n == 4 || n == 8 || n == 16 ? n : 0;
  }();
  return asked ? asked : rule;
}

/// The few-token kernel's tickets: a zeroed scratch area the kernel leaves
/// zero again.
constexpr int kRouterTicketSlot = 11;

Status routerFewTokens(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                       float *logits, int64_t tokens, int64_t modelDim,
                       int64_t experts, bool sumInLastSplit,
                       int tileTokensAsked) {
  const unsigned expertTiles = detail::gridFor(experts, 32, 65535);
  const int64_t chunks =
      std::max<int64_t>(1, (modelDim + kFewChunk - 1) / kFewChunk);
  const int64_t chunksPerSplit =
      std::max(kFewSplitChunks, (chunks + 65534) / 65535);
  const int64_t splits = (chunks + chunksPerSplit - 1) / chunksPerSplit;
  // 8 tokens a block (each block re-reads its split of wg from L2) unless
  // its blocks, splits counted, would fill fewer than half the SMs: on an
  // H100 (d 2048, E 64, flex-gate-bench, 2026-12-07) 8 took 13.5 us against
  // 16.3 for 4 at T 256 and 11.3 against 12.2 at T 128, 4 took 10.8 against
  // 12.2 at T 32.
  const bool small =
      int64_t{detail::gridFor(tokens, 8, INT32_MAX)} * expertTiles * splits <
      ctx.multiprocessors() / 2;
  const int tileTokens =
      tileTokensAsked ? tileTokensAsked : routerTileTokens(small ? 4 : 8);
  float *out = logits;
  uint32_t *tickets = nullptr;
  const unsigned tokenTiles = detail::gridFor(tokens, tileTokens, INT32_MAX);
  if (splits > 1) {
    void *scratch = nullptr;
    if (Status s = ctx.scratch(6, 4 * splits * tokens * experts, scratch); !s)
      return s;
    out = static_cast<float *>(scratch);
    if (sumInLastSplit) {
      void *zeroed = nullptr;
      if (Status s = ctx.zeroedScratch(
              kRouterTicketSlot, 4 * int64_t{tokenTiles} * expertTiles, zeroed);
          !s)
        return s;
      tickets = static_cast<uint32_t *>(zeroed);
    }
  }
  return detail::withType(x.type, [&](auto xTag) -> Status {
    using TX = decltype(xTag);
    return detail::withType(wg.type, [&](auto wTag) -> Status {
      using TW = decltype(wTag);
      const bool vectorX = detail::vectorizable(modelDim, sizeof(TX), {x.data});
      auto launch = [&](auto kernel) {
        dim3 grid(tokenTiles, expertTiles, static_cast<unsigned>(splits));
        detail::launchDependent(
            ctx, kernel, grid, kThreads, 0, static_cast<const TX *>(x.data),
            static_cast<const TW *>(wg.data), out, tokens, modelDim, experts,
            vectorX, chunksPerSplit * kFewChunk, tickets, logits);
      };
      if (tileTokens == 4)
        launch(routerFewTokensKernel<TX, TW, 4>);
      else if (tileTokens == 8)
        launch(routerFewTokensKernel<TX, TW, 8>);
      else
        launch(routerFewTokensKernel<TX, TW, 16>);
      if (Status s = checkLaunch("router few-token kernel"); !s)
        return s;
      if (splits == 1 || tickets)
        return Status::ok();
      const int64_t count = tokens * experts;
      detail::launchDependent(ctx, routerSplitSumKernel,
                              detail::gridFor(count, kThreads), kThreads, 0,
                              out, splits, count, logits);
      return checkLaunch("router split sum kernel");
    });
  });
}
} // namespace

bool detail::routerFewTokensApplies(int64_t tokens) {
  return tokens <= kRouterFewTokens;
}

Status router(KernelContext &ctx, ReadBuffer x, ReadBuffer wg, float *logits,
              int64_t tokens, int64_t modelDim, int64_t experts) {
  return detail::routerWith(ctx, x, wg, logits, tokens, modelDim, experts,
                            detail::RouterPath::Auto);
}

Status detail::routerWith(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                          float *logits, int64_t tokens, int64_t modelDim,
                          int64_t experts, RouterPath path, int tileTokens) {
  if (tileTokens != 0 && tileTokens != 4 && tileTokens != 8 && tileTokens != 16)
    return Status(StatusCode::InvalidArgument,
                  "the few-token router takes 4, 8 or 16 tokens a block; got " +
                      std::to_string(tileTokens));
  if (tokens == 0 || experts == 0)
    return Status::ok();
  // (Its grid has up to 65535 tiles of 32 experts.)
  if (experts <= 32 * int64_t{65535} &&
      (path == RouterPath::FewTokens ||
       path == RouterPath::FewTokensLastSplit ||
       (path == RouterPath::Auto && routerFewTokensApplies(tokens))))
    return routerFewTokens(
        ctx, x, wg, logits, tokens, modelDim, experts,
        path == RouterPath::FewTokensLastSplit ||
            (path == RouterPath::Auto && autoSumsInLastSplit()),
        tileTokens);
  // bf16 tokens: cuBLAS on bf16 parts of wg (int-sized dimensions only).
  if (x.type == DType::BF16 && modelDim > 0 && tokens < INT32_MAX &&
      modelDim < INT32_MAX && 3 * experts < INT32_MAX)
    return routerBf16(ctx, x, wg, logits, tokens, modelDim, experts);
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
  // bf16 tokens: cuBLAS on bf16 parts (int-sized dimensions only).
  if (x.type == DType::BF16 && (!gradX.data || gradX.type == DType::BF16) &&
      tokens > 0 && modelDim > 0 && experts > 0 && tokens < INT32_MAX &&
      modelDim < INT32_MAX && 3 * experts < INT32_MAX)
    return routerBackwardBf16(ctx, x, wg, gradLogits, tokens, modelDim,
                              experts, gradX, gradWg);
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
