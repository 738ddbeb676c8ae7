//===- GroupedGemm.cu - grouped_gemm and grouped_gemm_wgrad on cuBLAS -----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the per-expert GEMMs of [expert-1] and their weight
// gradients through cuBLAS, fp32 accumulation (CUBLAS_COMPUTE_32F, no TF32):
//  - static routing (padded layout, fixed capacity C known on the host): one
//    strided-batched GEMM over the E experts' C rows each, padding rows
//    included (they hold zeros or finite values, see CudaKernels.h); no host
//    synchronization, so the pass can be recorded as a CUDA graph;
//  - dynamic routing (ragged layout, or a capacity known only after gating):
//    either the device-sized kernel (DeviceGroupedGemm.cu: one launch, the
//    counts read on the device, graph-recordable), or the valid rows per
//    expert are read to the host once per routing (KernelContext::
//    hostSegments, the one synchronization) and each expert with rows is one
//    cublasGemmEx on the stream. RuntimeOptions::groupedGemm chooses; `auto`
//    takes the kernel where the experts get few rows each (decode), where
//    per-expert launches and the host read dominate, and always while a
//    graph records.
// Bias, activations and `pre` run as one fused elementwise pass afterwards
// (Elementwise.cu): the exact-erf GELU has no cuBLASLt epilogue.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "Elementwise.h"
#include "GroupedGemmInternal.h"
#include "flex/Runtime/Core/GroupedGemmRule.h"

#include <cublas_v2.h>

#include <cmath>
#include <limits>
#include <vector>

namespace flex::cuda {

namespace {

cudaDataType_t cudaTypeOf(DType type) {
  switch (type) {
  case DType::BF16:
    return CUDA_R_16BF;
  case DType::F16:
    return CUDA_R_16F;
  default:
    return CUDA_R_32F;
  }
}

Status checkCublas(cublasStatus_t status, const char *what) {
  if (status == CUBLAS_STATUS_SUCCESS)
    return Status::ok();
  return Status(status == CUBLAS_STATUS_ALLOC_FAILED ? StatusCode::OutOfRange
                                                     : StatusCode::Internal,
                std::string(what) + " failed: " + cublasGetStatusName(status) +
                    " (" + cublasGetStatusString(status) + ")");
}

Status checkOneType(std::initializer_list<DType> types, const char *what) {
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

char *at(void *base, int64_t elements, DType type) {
  return static_cast<char *>(base) +
         elements * static_cast<int64_t>(dtypeSize(type));
}
const char *at(const void *base, int64_t elements, DType type) {
  return static_cast<const char *>(base) +
         elements * static_cast<int64_t>(dtypeSize(type));
}

constexpr int kBiasSplits = 16;
constexpr int kBiasThreads = 256;

/// partial[e][split][col] = sum of gradC over the split's rows of expert e.
template <typename T>
__global__ void biasPartialKernel(const T *__restrict__ gradC, int64_t n,
                                  detail::RowSpace space,
                                  float *__restrict__ partial) {
  int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int32_t split = blockIdx.y, expert = blockIdx.z;
  if (col >= n)
    return;
  int64_t first, count;
  if (space.staticCapacity >= 0) {
    first = expert * space.staticCapacity;
    count = space.staticCapacity;
  } else {
    first = space.offsets[expert];
    count = max(0, space.rows[expert]);
  }
  int64_t perSplit = (count + kBiasSplits - 1) / kBiasSplits;
  int64_t begin = first + split * perSplit;
  int64_t end = min(first + count, begin + perSplit);
  float sum = 0.0f;
  for (int64_t row = begin; row < end; ++row)
    sum += detail::toFloat(gradC[row * n + col]);
  partial[(static_cast<int64_t>(expert) * kBiasSplits + split) * n + col] = sum;
}

template <typename T>
__global__ void biasReduceKernel(const float *__restrict__ partial, int64_t n,
                                 int64_t experts, bool accumulate,
                                 T *__restrict__ gradBias) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= experts * n)
    return;
  int64_t expert = i / n, col = i - expert * n;
  float sum = 0.0f;
  for (int s = 0; s < kBiasSplits; ++s)
    sum += partial[(expert * kBiasSplits + s) * n + col];
  if (accumulate)
    sum += detail::toFloat(gradBias[i]);
  gradBias[i] = detail::fromFloat<T>(sum);
}

/// Whether a dynamic grouped GEMM takes the device-sized kernel: the rule of
/// Core/GroupedGemmRule.h (which the cost model prices), where the kernel
/// applies. A gathered one (`gathered`) follows its own bound
/// (kWgmmaGatheredRowsPerExpert), else its rows are copied first and the
/// plain GEMM's rule runs on the copy: at prefill sizes the device kernels'
/// gathered forms lose to the copy (H100, bench/RESULTS.md Runs 35-36: C3's
/// gathered fc1 2992 us on the mma.sync kernel, 2137 on wgmma, against 1236
/// for cuBLAS on the dispatched rows).
bool useDeviceKernel(const KernelContext &ctx, detail::GroupedGemmPath path,
                     DType type, int64_t k, int64_t n,
                     const ExpertRowSpace &space,
                     std::initializer_list<const void *> pointers,
                     bool weightGradient = false, bool gathered = false) {
  if (space.isStatic() || path == detail::GroupedGemmPath::Cublas ||
      path == detail::GroupedGemmPath::CublasGrouped)
    return false;
  // An aligned space's forward and input-gradient GEMMs need no host read
  // (alignedBlocksGemm): a graph records them on cuBLAS too.
  const bool needsKernelToRecord =
      ctx.capturing && (weightGradient || space.alignedRows == 0);
  if (path == detail::GroupedGemmPath::Auto &&
      !prefersDeviceGemm(ctx.groupedGemm, space.rowBound, space.experts,
                         needsKernelToRecord, weightGradient,
                         detail::hopperGroupedGemmRuns(ctx), gathered))
    return false;
  return detail::deviceGroupedGemmApplies(ctx, type, k, n, space, pointers);
}

/// Whether a dynamic routing's segments, read to the host, are blocks of one
/// size from row `base` on (offsets base + e * block: a padded layout, a
/// pipelined chunk's uniform segments, or equal counts) inside the buffer
/// that run as one batched GEMM (batchesUniformBlocks).
bool uniformBlocks(const int32_t *offsets, const int32_t *rows,
                   const ExpertRowSpace &space, int64_t &base, int64_t &block) {
  const int64_t E = space.experts;
  if (E <= 0 || offsets[0] < 0)
    return false;
  base = offsets[0];
  block = offsets[1] - base;
  int64_t held = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (offsets[e + 1] != base + (e + 1) * block || rows[e] < 0 ||
        rows[e] > block)
      return false;
    held += rows[e];
  }
  return base + E * block <= space.rowBound &&
         batchesUniformBlocks(E, block, held);
}

/// Copies row rowTokens[r] of a [tokens, k] into row r of `rows`, for the
/// rows below the space's end (zeros for a token outside [0, tokens)).
template <typename T>
__global__ void gatherRowsKernel(const T *__restrict__ a, int64_t k,
                                 const int32_t *__restrict__ rowTokens,
                                 int64_t tokens, int64_t rowCount,
                                 const int32_t *__restrict__ rowsEnd,
                                 T *__restrict__ rows) {
  rowCount = detail::usedRows(rowCount, rowsEnd);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < rowCount * k; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t row = i / k, col = i - row * k;
    int64_t token = rowTokens[row];
    rows[i] = token >= 0 && token < tokens ? a[token * k + col]
                                           : detail::fromFloat<T>(0.0f);
  }
}

/// c[rows of e] = a[rows of e] @ op(b[e]) for every expert with rows, as one
/// cublasGemmGroupedBatchedEx (a group per expert; sizes and scalars from
/// the host, the operand pointers in device scratch slot 7).
Status groupedCublasCall(KernelContext &ctx, cublasOperation_t opB,
                         const void *a, const void *b, void *c, DType dtype,
                         int64_t k, int64_t n, int64_t ldb,
                         const int32_t *offsets, const int32_t *rows,
                         int64_t experts, float beta) {
  std::vector<int> m, ns, ks, lda, ldbs, ldc, sizes;
  std::vector<cublasOperation_t> opA, opBs;
  std::vector<float> alphas, betas;
  std::vector<const void *> pointers; // A..., then B..., then C...
  std::vector<const void *> as, bs, cs;
  for (int64_t e = 0; e < experts; ++e) {
    if (rows[e] <= 0)
      continue;
    // Column-major C^T[n, rows] = op(B)^T[n, k] A^T[k, rows], as the
    // per-expert call.
    opA.push_back(opB);
    opBs.push_back(CUBLAS_OP_N);
    m.push_back(static_cast<int>(n));
    ns.push_back(rows[e]);
    ks.push_back(static_cast<int>(k));
    lda.push_back(static_cast<int>(ldb));
    ldbs.push_back(static_cast<int>(k));
    ldc.push_back(static_cast<int>(n));
    alphas.push_back(1.0f);
    betas.push_back(beta);
    sizes.push_back(1);
    as.push_back(at(b, e * k * n, dtype));
    bs.push_back(at(a, int64_t{offsets[e]} * k, dtype));
    cs.push_back(at(c, int64_t{offsets[e]} * n, dtype));
  }
  const int groups = static_cast<int>(m.size());
  if (groups == 0)
    return Status::ok();
  pointers.insert(pointers.end(), as.begin(), as.end());
  pointers.insert(pointers.end(), bs.begin(), bs.end());
  pointers.insert(pointers.end(), cs.begin(), cs.end());
  void *scratch = nullptr;
  const int64_t bytes = static_cast<int64_t>(pointers.size() * sizeof(void *));
  if (Status s = ctx.scratch(7, bytes, scratch); !s)
    return s;
  // Pageable memory: the copy has taken the bytes when it returns.
  if (Status s =
          checkCuda(cudaMemcpyAsync(scratch, pointers.data(), bytes,
                                    cudaMemcpyHostToDevice, ctx.stream()),
                    "copying the grouped GEMM's pointers");
      !s)
    return s;
  auto *device = static_cast<const void **>(scratch);
  const cudaDataType_t type = cudaTypeOf(dtype);
  return checkCublas(cublasGemmGroupedBatchedEx(
                         static_cast<cublasHandle_t>(ctx.cublasHandle()),
                         opA.data(), opBs.data(), m.data(), ns.data(),
                         ks.data(), alphas.data(), device, type, lda.data(),
                         device + groups, type, ldbs.data(), betas.data(),
                         const_cast<void *const *>(device + 2 * groups), type,
                         ldc.data(), groups, sizes.data(), CUBLAS_COMPUTE_32F),
                     "cublasGemmGroupedBatchedEx (grouped_gemm)");
}

/// The operands of block i of an aligned row space (the `blockRows` rows
/// from row i * blockRows) for cublasGemmBatchedEx, in three arrays of
/// `blocks` pointers: its expert's weight slice, its rows of A, its rows of
/// C. A block below offsets[E] is one expert's (its first row is that
/// expert's); one past it (the bound's slack) computes rows no step reads,
/// with the last expert's weights.
__global__ void
alignedBlockOperandsKernel(detail::RowSpace space, int64_t blocks,
                           int64_t blockRows, const char *a, const char *b,
                           char *c, int64_t aRowBytes, int64_t bSliceBytes,
                           int64_t cRowBytes, const void **operands) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= blocks)
    return;
  const int64_t row = i * blockRows;
  int32_t e = space.expertOf(row);
  if (e < 0)
    e = space.experts - 1;
  operands[i] = b + e * bSliceBytes;
  operands[blocks + i] = a + row * aRowBytes;
  operands[2 * blocks + i] = c + row * cRowBytes;
}

/// c[rows of e] = a[rows of e] @ op(b[e]) over an aligned row space with
/// no host read: every block of space.alignedRows rows that the declared
/// rows hold is one GEMM of one cublasGemmBatchedEx, its operands found on
/// the device (alignedBlockOperandsKernel, into scratch slot 7). Rows past
/// an expert's count compute values no step reads. A CUDA graph can record
/// it. (cuBLASLt's pointer-array matmul offered no algorithm with the ReLU
/// epilogue on an H100, Run 37: an activation runs as the epilogue pass.)
Status alignedBlocksGemm(KernelContext &ctx, cublasOperation_t opB,
                         const void *a, const void *b, void *c, DType dtype,
                         int64_t k, int64_t n, int64_t ldb,
                         const ExpertRowSpace &space, float beta) {
  const int64_t blockRows = space.alignedRows;
  const int64_t blocks = space.rowBound / blockRows;
  if (blocks == 0 || space.experts <= 0)
    return Status::ok();
  if (blocks > std::numeric_limits<int>::max())
    return Status(StatusCode::OutOfRange,
                  "grouped_gemm: " + std::to_string(blocks) +
                      " row blocks exceed cuBLAS's batch count");
  void *scratch = nullptr;
  const int64_t bytes = 3 * blocks * static_cast<int64_t>(sizeof(void *));
  if (Status s = ctx.scratch(7, bytes, scratch); !s)
    return s;
  auto **operands = static_cast<const void **>(scratch);
  const auto size = static_cast<int64_t>(dtypeSize(dtype));
  alignedBlockOperandsKernel<<<detail::gridFor(blocks, 256), 256, 0,
                               ctx.stream()>>>(
      detail::toKernel(space), blocks, blockRows, static_cast<const char *>(a),
      static_cast<const char *>(b), static_cast<char *>(c), k * size,
      k * n * size, n * size, operands);
  if (Status s = checkLaunch("grouped_gemm's block operands kernel"); !s)
    return s;
  const float alpha = 1.0f;
  const cudaDataType_t type = cudaTypeOf(dtype);
  // Column-major C^T[n, rows] = op(B)^T[n, k] A^T[k, rows], per block.
  return checkCublas(
      cublasGemmBatchedEx(static_cast<cublasHandle_t>(ctx.cublasHandle()), opB,
                          CUBLAS_OP_N, static_cast<int>(n),
                          static_cast<int>(blockRows), static_cast<int>(k),
                          &alpha, operands, type, static_cast<int>(ldb),
                          operands + blocks, type, static_cast<int>(k), &beta,
                          const_cast<void *const *>(operands + 2 * blocks),
                          type, static_cast<int>(n), static_cast<int>(blocks),
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmBatchedEx (grouped_gemm over aligned blocks)");
}

/// Queues call(e, handle) for every expert e with rows (host counts),
/// spread over the context's gemm_streams streams by rows
/// (KernelContext::spreadOverStreams).
template <typename Call>
Status perExpertOnStreams(KernelContext &ctx, const int32_t *rows,
                          int64_t experts, Call call) {
  std::vector<int64_t> with, weights;
  for (int64_t e = 0; e < experts; ++e)
    if (rows[e] > 0) {
      with.push_back(e);
      weights.push_back(rows[e]);
    }
  return ctx.spreadOverStreams(weights, [&](int64_t item, void *handle) {
    return call(with[item], static_cast<cublasHandle_t>(handle));
  });
}

/// c[rows of e] = a[rows of e] @ op(b[e]) as one cublasGemmEx per expert with
/// rows (host counts), spread over gemm_streams streams: one expert's few
/// thousand rows leave SMs idle.
Status perExpertGemms(KernelContext &ctx, cublasOperation_t opB, const void *a,
                      const void *b, void *c, DType dtype, int64_t k, int64_t n,
                      int64_t ldb, const int32_t *offsets, const int32_t *rows,
                      int64_t experts, float beta) {
  const float alpha = 1.0f;
  const cudaDataType_t type = cudaTypeOf(dtype);
  return perExpertOnStreams(
      ctx, rows, experts, [&](int64_t e, cublasHandle_t on) {
        const int64_t first = offsets[e];
        return checkCublas(
            cublasGemmEx(on, opB, CUBLAS_OP_N, static_cast<int>(n), rows[e],
                         static_cast<int>(k), &alpha, at(b, e * k * n, dtype),
                         type, static_cast<int>(ldb), at(a, first * k, dtype),
                         type, static_cast<int>(k), &beta,
                         at(c, first * n, dtype), type, static_cast<int>(n),
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx (grouped_gemm)");
      });
}

/// The largest of the host's counts.
int64_t largestCount(const int32_t *rows, int64_t experts) {
  int64_t largest = 0;
  for (int64_t e = 0; e < experts; ++e)
    largest = std::max<int64_t>(largest, rows[e]);
  return largest;
}

/// A gathered GEMM that the device kernel does not run (grouped_gemm=cublas,
/// or where it cannot: f32, an older GPU, a
/// grid past its limits): the rows gathered into scratch first, which the
/// unfused paths then read as their A. Scratch slot 5 is this copy's alone.
Status gatherRows(KernelContext &ctx, ReadBuffer a, int64_t k,
                  const ExpertRowSpace &space, const RowGather &gather,
                  ReadBuffer &rows) {
  const int64_t count = space.rowBound;
  void *data = nullptr;
  if (Status s = ctx.scratch(
          5, std::max<int64_t>(count * k * dtypeSize(a.type), 4), data);
      !s)
    return s;
  rows = ReadBuffer{data, a.type};
  if (count == 0 || k == 0)
    return Status::ok();
  const int32_t *end =
      space.isStatic() ? nullptr : space.offsets + space.experts;
  return detail::withType(a.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    gatherRowsKernel<T>
        <<<detail::gridFor(std::min<int64_t>(count * k, 1 << 22), 256), 256, 0,
           ctx.stream()>>>(static_cast<const T *>(a.data), k, gather.rowTokens,
                           gather.tokens, count, end, static_cast<T *>(data));
    return checkLaunch("grouped GEMM row gather kernel");
  });
}

/// Whether a fused backward (grouped_gemm_activation_backward,
/// grouped_gemm_glu_backward) runs in the wgmma kernel's store, where that
/// kernel runs and applies (a static row space too): always on the device
/// path (grouped_gemm=device), never with grouped_gemm=cublas, and under
/// auto by autoFusesBackwardInStore (few rows per expert, or recording a
/// dynamic row space, whose GEMM then runs on the device kernel anyway; a
/// fixed capacity records cuBLAS's batched GEMM and the pass as it runs
/// them eagerly), else as the GEMM on grouped_gemm's path and the pass.
bool fusedBackwardOnWgmma(const KernelContext &ctx,
                          detail::GroupedGemmPath path, DType type, int64_t k,
                          int64_t n, const ExpertRowSpace &space,
                          std::initializer_list<const void *> pointers) {
  using detail::GroupedGemmPath;
  const int64_t rows =
      fusedBackwardRows(space.staticCapacity, space.experts, space.rowBound);
  const bool wanted =
      path == GroupedGemmPath::Device ||
      (path == GroupedGemmPath::Auto &&
       (ctx.groupedGemm == GroupedGemmImpl::Device ||
        (ctx.groupedGemm == GroupedGemmImpl::Auto &&
         autoFusesBackwardInStore(rows, space.experts,
                                  ctx.capturing && !space.isStatic()))));
  return wanted && detail::hopperGroupedGemmRuns(ctx) &&
         detail::hopperGroupedGemmApplies(ctx, type, k, n, space, pointers);
}

/// A fused backward off the wgmma kernel: its GEMM's product into `out` on
/// grouped_gemm's path (Device, which asked for the fused kernel, as Auto).
Status unfusedProduct(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                      WriteBuffer out, int64_t k, int64_t n,
                      const ExpertRowSpace &space, bool transB,
                      detail::GroupedGemmPath path) {
  using detail::GroupedGemmPath;
  GroupedGemmOptions options;
  options.transB = transB;
  return detail::groupedGemmWith(
      ctx, a, b, ReadBuffer{}, out, k, n, space, options, WriteBuffer{},
      path == GroupedGemmPath::Device ? GroupedGemmPath::Auto : path);
}

} // namespace

Status groupedGemm(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                   ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                   const ExpertRowSpace &space,
                   const GroupedGemmOptions &options, WriteBuffer pre,
                   const RowGather &gather) {
  return detail::groupedGemmWith(ctx, a, b, bias, c, k, n, space, options, pre,
                                 detail::GroupedGemmPath::Auto, gather);
}

Status groupedGemmGlu(KernelContext &ctx, ReadBuffer a, ReadBuffer bGate,
                      ReadBuffer bUp, WriteBuffer c, int64_t k, int64_t n,
                      const ExpertRowSpace &space, WriteBuffer gateIn,
                      WriteBuffer upIn, const RowGather &gather) {
  return detail::groupedGemmGluWith(ctx, a, bGate, bUp, c, k, n, space, gateIn,
                                    upIn, detail::GroupedGemmPath::Auto,
                                    gather);
}

Status groupedGemmActivationBackward(KernelContext &ctx, ReadBuffer a,
                                     ReadBuffer b, ReadBuffer pre,
                                     WriteBuffer c, int64_t k, int64_t n,
                                     const ExpertRowSpace &space, bool transB,
                                     Activation act) {
  return detail::groupedGemmActivationBackwardWith(
      ctx, a, b, pre, c, k, n, space, transB, act,
      detail::GroupedGemmPath::Auto);
}

Status groupedGemmCombine(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                          ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                          const ExpertRowSpace &space,
                          const GroupedGemmOptions &options,
                          const Routing &routing, const int32_t *rowTokens,
                          WriteBuffer out) {
  return detail::groupedGemmCombineWith(ctx, a, b, bias, c, k, n, space,
                                        options, routing, rowTokens, out,
                                        detail::GroupedGemmPath::Auto);
}

Status groupedGemmGluBackward(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                              ReadBuffer gateIn, ReadBuffer upIn,
                              WriteBuffer gradGateIn, WriteBuffer gradUpIn,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool transB) {
  return detail::groupedGemmGluBackwardWith(ctx, a, b, gateIn, upIn, gradGateIn,
                                            gradUpIn, k, n, space, transB,
                                            detail::GroupedGemmPath::Auto);
}

Status groupedGemmWgrad(KernelContext &ctx, ReadBuffer a, ReadBuffer gradC,
                        int64_t k, int64_t n, const ExpertRowSpace &space,
                        WriteBuffer gradB, WriteBuffer gradBias,
                        bool accumulate, const RowGather &gather) {
  return detail::groupedGemmWgradWith(ctx, a, gradC, k, n, space, gradB,
                                      gradBias, accumulate,
                                      detail::GroupedGemmPath::Auto, gather);
}

namespace detail {

Status groupedGemmWith(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                       ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                       const ExpertRowSpace &space,
                       const GroupedGemmOptions &options, WriteBuffer pre,
                       GroupedGemmPath path, const RowGather &gather) {
  if (Status s = checkOneType({a.type, b.type, c.type}, "grouped_gemm"); !s)
    return s;
  if (pre.data)
    if (Status s = checkOneType({c.type, pre.type}, "grouped_gemm"); !s)
      return s;
  if (bias.data)
    if (Status s = checkOneType({c.type, bias.type}, "grouped_gemm"); !s)
      return s;
  if (!(options.biasScale > 0.0f) || std::isinf(options.biasScale))
    return Status(StatusCode::InvalidArgument,
                  "grouped_gemm: bias_scale is " +
                      std::to_string(options.biasScale) +
                      "; it must be a finite number > 0");
  auto handle = static_cast<cublasHandle_t>(ctx.cublasHandle());
  const cudaDataType_t type = cudaTypeOf(c.type);
  const DType dtype = c.type;
  // The GEMM writes into pre when pre is the value it produces; the
  // epilogue then derives c from it.
  WriteBuffer target = pre.data && !options.accumulate ? pre : c;
  const float alpha = 1.0f, beta = options.accumulate ? 1.0f : 0.0f;
  const cublasOperation_t opB = options.transB ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int64_t ldb = options.transB ? k : n;
  if (n == 0)
    return Status::ok();

  // With relu_in_gemm (the default), a ReLU with nothing else to apply runs
  // in cuBLASLt's epilogue over equal blocks (LtGemm.cu): c written once, no
  // epilogue pass (it keeps NaN: ReluKeepsNaNOnEveryPath).
  const bool reluInGemm = ctx.reluInGemm &&
                          options.epilogue == Epilogue::Relu && !bias.data &&
                          !pre.data && !options.accumulate;
  bool epilogueApplied = false;
  // Row-major C[rows, n] = A[rows, k] B[k, n] is column-major
  // C^T[n, rows] = B^T[n, k] A^T[k, rows]: B goes first. One call over
  // blocks of `capacity` rows per expert.
  auto batched = [&](int64_t base, int64_t capacity) -> Status {
    if (capacity <= 0 || space.experts <= 0)
      return Status::ok();
    if (reluInGemm && path != GroupedGemmPath::Cublas) {
      if (Status s = ltReluBatchedGemm(
              ctx, options.transB, at(a.data, base * k, dtype), b.data,
              at(c.data, base * n, dtype), dtype, k, n, capacity, space.experts,
              epilogueApplied);
          !s || epilogueApplied)
        return s;
    }
    return checkCublas(
        cublasGemmStridedBatchedEx(
            handle, opB, CUBLAS_OP_N, static_cast<int>(n),
            static_cast<int>(capacity), static_cast<int>(k), &alpha, b.data,
            type, static_cast<int>(ldb), k * n, at(a.data, base * k, dtype),
            type, static_cast<int>(k), capacity * k, &beta,
            at(target.data, base * n, dtype), type, static_cast<int>(n),
            capacity * n, static_cast<int>(space.experts), CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx (grouped_gemm)");
  };
  // A gathered A: the device kernel follows the map wherever it applies
  // (the variant was chosen for it); elsewhere the rows are copied first.
  const bool gathered = gather.rowTokens != nullptr;
  if (gathered && !useDeviceKernel(ctx, path, dtype, k, n, space,
                                   {a.data, b.data, target.data},
                                   /*weightGradient=*/false,
                                   /*gathered=*/true)) {
    if (Status s = gatherRows(ctx, a, k, space, gather, a); !s)
      return s;
    return groupedGemmWith(ctx, a, b, bias, c, k, n, space, options, pre, path,
                           RowGather{});
  }
  if (space.isStatic()) {
    if (Status s = batched(0, space.staticCapacity); !s)
      return s;
  } else if (gathered || useDeviceKernel(ctx, path, dtype, k, n, space,
                                         {a.data, b.data, target.data})) {
    // The bias and activation in the kernel's store where it can (its
    // few-rows tile and the wgmma kernel, not accumulating; bias, pre and c
    // in 16-byte vectors): c is written once, with no second launch, bit for
    // bit applyGemmEpilogue's result.
    DeviceGemmEpilogue fused;
    if ((bias.data || pre.data || options.epilogue != Epilogue::None) &&
        !options.accumulate &&
        vectorizable(n, 2, {c.data, pre.data, bias.data}) &&
        deviceGroupedGemmFusesEpilogue(ctx, dtype, k, n, space, options.transB,
                                       gather, {a.data, b.data, c.data}))
      fused = {true, bias.data, pre.data, options.epilogue, options.biasScale};
    if (Status s = deviceGroupedGemm(
            ctx, a.data, b.data, fused.fused ? c.data : target.data, dtype, k,
            n, space, options.transB, options.accumulate, DeviceTiles::Auto,
            gather, fused);
        !s)
      return s;
    if (fused.fused)
      return Status::ok();
  } else if (space.alignedRows > 0) {
    if (Status s = alignedBlocksGemm(ctx, opB, a.data, b.data, target.data,
                                     dtype, k, n, ldb, space, beta);
        !s)
      return s;
  } else {
    const int32_t *offsets = nullptr, *rows = nullptr;
    if (Status s = ctx.hostSegments(space, offsets, rows); !s)
      return s;
    // Blocks of one size (a padded layout) run as one batched call, their
    // padding rows computed too (from A's padding rows: padding stays
    // padding); otherwise a GEMM per expert with rows.
    int64_t base = 0, block = 0;
    if (uniformBlocks(offsets, rows, space, base, block)) {
      if (Status s = batched(base, block); !s)
        return s;
    } else if (path == GroupedGemmPath::CublasGrouped ||
               (path == GroupedGemmPath::Auto &&
                groupedCublasTakes(largestCount(rows, space.experts)))) {
      if (Status s =
              groupedCublasCall(ctx, opB, a.data, b.data, target.data, dtype, k,
                                n, ldb, offsets, rows, space.experts, beta);
          !s)
        return s;
    } else if (Status s = perExpertGemms(ctx, opB, a.data, b.data, target.data,
                                         dtype, k, n, ldb, offsets, rows,
                                         space.experts, beta);
               !s) {
      return s;
    }
  }
  if (epilogueApplied ||
      (!bias.data && options.epilogue == Epilogue::None && !pre.data))
    return Status::ok();
  return applyGemmEpilogue(ctx, target.data, bias,
                           pre.data ? pre : WriteBuffer{}, c, n, space,
                           options.epilogue, options.biasScale);
}

Status groupedGemmGluWith(KernelContext &ctx, ReadBuffer a, ReadBuffer bGate,
                          ReadBuffer bUp, WriteBuffer c, int64_t k, int64_t n,
                          const ExpertRowSpace &space, WriteBuffer gateIn,
                          WriteBuffer upIn, GroupedGemmPath path,
                          const RowGather &gather) {
  if (Status s = checkOneType({a.type, bGate.type, bUp.type, c.type},
                              "grouped_gemm_glu");
      !s)
    return s;
  for (const WriteBuffer &kept : {gateIn, upIn})
    if (kept.data)
      if (Status s = checkOneType({c.type, kept.type}, "grouped_gemm_glu"); !s)
        return s;
  if (n == 0)
    return Status::ok();
  // The fused kernel is the point of the step: it runs wherever it applies
  // (a static row space too, which no cuBLAS call fuses), unless the path or
  // grouped_gemm=cublas asks for the unfused GEMMs.
  const bool fused = (path == GroupedGemmPath::Device ||
                      (path == GroupedGemmPath::Auto &&
                       ctx.groupedGemm != GroupedGemmImpl::Cublas)) &&
                     deviceGroupedGemmApplies(ctx, c.type, k, n, space,
                                              {a.data, bGate.data, bUp.data,
                                               c.data, gateIn.data, upIn.data},
                                              nullptr, /*staticToo=*/true);
  if (fused)
    return deviceGroupedGemmGlu(ctx, a.data, bGate.data, bUp.data, c.data,
                                gateIn.data, upIn.data, c.type, k, n, space,
                                gather);
  // Unfused: the products where the caller keeps them, else in scratch
  // slot 8 (this step's alone), then glu.
  const int64_t productBytes =
      space.rowBound * n * static_cast<int64_t>(dtypeSize(c.type));
  if (!gateIn.data || !upIn.data) {
    void *data = nullptr;
    if (Status s = ctx.scratch(8, std::max<int64_t>(2 * productBytes, 4), data);
        !s)
      return s;
    if (!gateIn.data)
      gateIn = WriteBuffer{data, c.type};
    if (!upIn.data)
      upIn = WriteBuffer{static_cast<char *>(data) + productBytes, c.type};
  }
  const GroupedGemmPath gemmPath =
      path == GroupedGemmPath::Device ? GroupedGemmPath::Auto : path;
  for (auto [b, product] : {std::pair{bGate, gateIn}, std::pair{bUp, upIn}})
    if (Status s = groupedGemmWith(ctx, a, b, ReadBuffer{}, product, k, n,
                                   space, GroupedGemmOptions{}, WriteBuffer{},
                                   gemmPath, gather);
        !s)
      return s;
  return glu(ctx, ReadBuffer{gateIn.data, c.type},
             ReadBuffer{upIn.data, c.type}, c, n, space);
}

Status groupedGemmActivationBackwardWith(KernelContext &ctx, ReadBuffer a,
                                         ReadBuffer b, ReadBuffer pre,
                                         WriteBuffer c, int64_t k, int64_t n,
                                         const ExpertRowSpace &space,
                                         bool transB, Activation act,
                                         GroupedGemmPath path) {
  if (Status s = checkOneType({a.type, b.type, pre.type, c.type},
                              "grouped_gemm_activation_backward");
      !s)
    return s;
  if (c.data == pre.data || c.data == a.data || c.data == b.data)
    return Status(StatusCode::InvalidArgument,
                  "grouped_gemm_activation_backward: c is also its a, b or "
                  "pre; it writes c apart from what it reads");
  if (n == 0)
    return Status::ok();
  if (fusedBackwardOnWgmma(ctx, path, c.type, k, n, space,
                           {a.data, b.data, c.data, pre.data})) {
    DeviceGemmEpilogue backward;
    backward.fused = true;
    backward.activationInput = pre.data;
    backward.derivative = act;
    return deviceGroupedGemm(ctx, a.data, b.data, c.data, c.type, k, n, space,
                             transB, /*accumulate=*/false, DeviceTiles::Hopper,
                             RowGather{}, backward);
  }
  // Unfused: the derivative over the product in place (each element read
  // before it is written).
  if (Status s = unfusedProduct(ctx, a, b, c, k, n, space, transB, path); !s)
    return s;
  return activationBackward(ctx, pre, ReadBuffer{c.data, c.type}, c, n, space,
                            act);
}

bool combinesInStore(const KernelContext &ctx, GroupedGemmPath path, DType type,
                     int64_t k, int64_t n, const ExpertRowSpace &space,
                     bool transB,
                     std::initializer_list<const void *> pointers) {
  // Where grouped_gemm would run the device kernel with its epilogue fused
  // (the few-rows tile, the wgmma kernel): the same product, then the
  // combine's sums from the stored rows.
  return useDeviceKernel(ctx, path, type, k, n, space, pointers) &&
         vectorizable(n, 2, pointers) &&
         deviceGroupedGemmFusesEpilogue(ctx, type, k, n, space, transB,
                                        RowGather{}, pointers);
}

Status groupedGemmCombineWith(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                              ReadBuffer bias, WriteBuffer c, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              const GroupedGemmOptions &options,
                              const Routing &routing, const int32_t *rowTokens,
                              WriteBuffer out, GroupedGemmPath path) {
  if (Status s = checkOneType({a.type, b.type, c.type, out.type},
                              "grouped_gemm_combine");
      !s)
    return s;
  if (bias.data)
    if (Status s = checkOneType({c.type, bias.type}, "grouped_gemm_combine");
        !s)
      return s;
  if (options.accumulate)
    return Status(StatusCode::Internal,
                  "grouped_gemm_combine does not accumulate");
  for (const void *output : {c.data, out.data})
    if (output == a.data || output == b.data ||
        (bias.data && output == bias.data))
      return Status(StatusCode::InvalidArgument,
                    "grouped_gemm_combine: c or out is also its a, b or bias; "
                    "it writes its outputs apart from what it reads");
  const bool inStore =
      rowTokens && n > 0 && routing.tokens > 0 &&
      combinesInStore(ctx, path, c.type, k, n, space, options.transB,
                      {a.data, b.data, c.data, out.data, bias.data});
  if (!inStore) {
    if (Status s = groupedGemmWith(ctx, a, b, bias, c, k, n, space, options,
                                   WriteBuffer{}, path);
        !s)
      return s;
    return combine(ctx, ReadBuffer{c.data, c.type}, n, routing, out);
  }
  DeviceGemmEpilogue fused{true, bias.data, nullptr, options.epilogue,
                           options.biasScale};
  CombineInStore &combined = fused.combine;
  combined.out = out.data;
  combined.routing = routing;
  combined.rowTokens = rowTokens;
  combined.blocks = (n + kCombineBlockColumns - 1) / kCombineBlockColumns;
  void *arrivals = nullptr;
  if (Status s = ctx.zeroedScratch(
          9, std::max<int64_t>(4 * routing.tokens * combined.blocks, 4),
          arrivals);
      !s)
    return s;
  combined.arrivals = static_cast<int32_t *>(arrivals);
  return deviceGroupedGemm(ctx, a.data, b.data, c.data, c.type, k, n, space,
                           options.transB, /*accumulate=*/false,
                           DeviceTiles::Auto, RowGather{}, fused);
}

Status groupedGemmGluBackwardWith(KernelContext &ctx, ReadBuffer a,
                                  ReadBuffer b, ReadBuffer gateIn,
                                  ReadBuffer upIn, WriteBuffer gradGateIn,
                                  WriteBuffer gradUpIn, int64_t k, int64_t n,
                                  const ExpertRowSpace &space, bool transB,
                                  GroupedGemmPath path) {
  if (Status s = checkOneType({a.type, b.type, gateIn.type, upIn.type,
                               gradGateIn.type, gradUpIn.type},
                              "grouped_gemm_glu_backward");
      !s)
    return s;
  for (const void *input : {a.data, b.data, gateIn.data, upIn.data})
    for (const void *output : {gradGateIn.data, gradUpIn.data})
      if (input == output)
        return Status(StatusCode::InvalidArgument,
                      "grouped_gemm_glu_backward: an output is also an "
                      "input; it writes its outputs apart from what it "
                      "reads");
  if (gradGateIn.data == gradUpIn.data)
    return Status(StatusCode::InvalidArgument,
                  "grouped_gemm_glu_backward: grad_gate_in and grad_up_in "
                  "are one buffer");
  if (n == 0)
    return Status::ok();
  if (fusedBackwardOnWgmma(ctx, path, gradGateIn.type, k, n, space,
                           {a.data, b.data, gradGateIn.data, gradUpIn.data,
                            gateIn.data, upIn.data})) {
    DeviceGemmEpilogue backward;
    backward.fused = true;
    backward.gluGate = gateIn.data;
    backward.gluUp = upIn.data;
    backward.gluGradUp = gradUpIn.data;
    return deviceGroupedGemm(ctx, a.data, b.data, gradGateIn.data,
                             gradGateIn.type, k, n, space, transB,
                             /*accumulate=*/false, DeviceTiles::Hopper,
                             RowGather{}, backward);
  }
  if (Status s =
          unfusedProduct(ctx, a, b, gradGateIn, k, n, space, transB, path);
      !s)
    return s;
  return gluBackward(ctx, gateIn, upIn,
                     ReadBuffer{gradGateIn.data, gradGateIn.type}, gradGateIn,
                     gradUpIn, n, space);
}

Status groupedGemmWgradWith(KernelContext &ctx, ReadBuffer a, ReadBuffer gradC,
                            int64_t k, int64_t n, const ExpertRowSpace &space,
                            WriteBuffer gradB, WriteBuffer gradBias,
                            bool accumulate, GroupedGemmPath path,
                            const RowGather &gather) {
  if (Status s = checkOneType({a.type, gradC.type, gradB.type},
                              "grouped_gemm_wgrad");
      !s)
    return s;
  const bool gathered = gather.rowTokens != nullptr;
  if (gathered &&
      !useDeviceKernel(ctx, path, gradB.type, k, n, space,
                       {a.data, gradC.data, gradB.data},
                       /*weightGradient=*/true, /*gathered=*/true)) {
    if (Status s = gatherRows(ctx, a, k, space, gather, a); !s)
      return s;
    return groupedGemmWgradWith(ctx, a, gradC, k, n, space, gradB, gradBias,
                                accumulate, path, RowGather{});
  }
  auto handle = static_cast<cublasHandle_t>(ctx.cublasHandle());
  const DType dtype = gradB.type;
  const cudaDataType_t type = cudaTypeOf(dtype);
  // With accumulate the chunks of a pipelined backward add up (beta = 1).
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cudaStream_t stream = ctx.stream();
  const int64_t E = space.experts;
  const int64_t sliceBytes = k * n * static_cast<int64_t>(dtypeSize(dtype));

  // Column-major gradB^T[n, k] = gradC^T[n, rows] (a^T)^T[rows, k].
  if (space.isStatic()) {
    const int64_t capacity = space.staticCapacity;
    if (capacity == 0) {
      if (accumulate)
        return Status::ok();
      if (Status s = checkCuda(cudaMemsetAsync(gradB.data, 0, E * sliceBytes,
                                               stream),
                               "clearing grad_b");
          !s)
        return s;
    } else if (E > 0 && k > 0 && n > 0) {
      if (Status s = checkCublas(
              cublasGemmStridedBatchedEx(
                  handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(n),
                  static_cast<int>(k), static_cast<int>(capacity), &alpha,
                  gradC.data, type, static_cast<int>(n), capacity * n, a.data,
                  type, static_cast<int>(k), capacity * k, &beta, gradB.data,
                  type, static_cast<int>(n), k * n, static_cast<int>(E),
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmStridedBatchedEx (grouped_gemm_wgrad)");
          !s)
        return s;
    }
  } else if (gathered || useDeviceKernel(ctx, path, dtype, k, n, space,
                                         {a.data, gradC.data, gradB.data},
                                         /*weightGradient=*/true)) {
    if (Status s =
            deviceGroupedGemmWgrad(ctx, a.data, gradC.data, gradB.data, dtype,
                                   k, n, space, accumulate, gather);
        !s)
      return s;
  } else {
    const int32_t *offsets = nullptr, *rows = nullptr;
    if (Status s = ctx.hostSegments(space, offsets, rows); !s)
      return s;
    // An expert with no rows gets zeros, as on the CPU.
    for (int64_t e = 0; e < E && !accumulate; ++e)
      if (rows[e] <= 0)
        if (Status s =
                checkCuda(cudaMemsetAsync(at(gradB.data, e * k * n, dtype), 0,
                                          sliceBytes, stream),
                          "clearing grad_b");
            !s)
          return s;
    // A GEMM per expert with rows, spread over gemm_streams streams.
    if (Status s = perExpertOnStreams(
            ctx, rows, E,
            [&](int64_t e, cublasHandle_t on) {
              const int64_t first = offsets[e];
              return checkCublas(
                  cublasGemmEx(
                      on, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(n),
                      static_cast<int>(k), rows[e], &alpha,
                      at(gradC.data, first * n, dtype), type,
                      static_cast<int>(n), at(a.data, first * k, dtype), type,
                      static_cast<int>(k), &beta,
                      at(gradB.data, e * k * n, dtype), type,
                      static_cast<int>(n), CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT),
                  "cublasGemmEx (grouped_gemm_wgrad)");
            });
        !s)
      return s;
  }

  if (!gradBias.data || E == 0 || n == 0)
    return Status::ok();
  if (Status s = checkOneType({gradC.type, gradBias.type},
                              "grouped_gemm_wgrad");
      !s)
    return s;
  void *scratch = nullptr;
  if (Status s = ctx.scratch(2, 4 * E * kBiasSplits * n, scratch); !s)
    return s;
  auto *partial = static_cast<float *>(scratch);
  return detail::withType(dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    dim3 grid(detail::gridFor(n, kBiasThreads), kBiasSplits,
              static_cast<unsigned>(E));
    biasPartialKernel<T><<<grid, kBiasThreads, 0, stream>>>(
        static_cast<const T *>(gradC.data), n, detail::toKernel(space),
        partial);
    if (Status s = checkLaunch("grad_bias partial kernel"); !s)
      return s;
    biasReduceKernel<T><<<detail::gridFor(E * n, 256), 256, 0, stream>>>(
        partial, n, E, accumulate, static_cast<T *>(gradBias.data));
    return checkLaunch("grad_bias reduce kernel");
  });
}

} // namespace detail
} // namespace flex::cuda
