//===- LtGemm.cu - Strided-batched GEMMs with cuBLASLt's ReLU epilogue ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// A grouped GEMM over equal blocks (a fixed capacity, a padded layout's
// uniform blocks) whose only epilogue is a ReLU runs as one cuBLASLt matmul
// with CUBLASLT_EPILOGUE_RELU: the activation is applied to the fp32 sums in
// the GEMM's own store, so c is written once and the separate epilogue pass
// (a read and a write of [rows, n]: about 180 us of C3's forward on an H100,
// bench/RESULTS.md Run 29) goes away. ReLU commutes with rounding to the
// dtype (monotone, round(0) = 0), so the values are those of the GEMM
// followed by the epilogue kernel, up to the GEMM's own summation order.
// GELU (exact erf here, tanh in cuBLASLt) and SiLU keep the epilogue kernel.
//
// The matmul descriptors and the heuristic's algorithm are kept per shape:
// building them costs tens of microseconds of host time, a call's budget.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "GroupedGemmInternal.h"

#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace flex::cuda::detail {

namespace {

/// One shape's descriptors and algorithm (or none: cuBLASLt has no kernel
/// for it, and the caller runs the unfused path).
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t weights = nullptr, rows = nullptr, out = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;

  LtPlan() = default;
  LtPlan(const LtPlan &) = delete;
  LtPlan &operator=(const LtPlan &) = delete;
  ~LtPlan() {
    for (cublasLtMatrixLayout_t layout : {weights, rows, out})
      if (layout)
        cublasLtMatrixLayoutDestroy(layout);
    if (op)
      cublasLtMatmulDescDestroy(op);
  }
};

/// The pointers' alignments (bytes, at most 256) the algorithm was chosen
/// for: the weights, the rows, the output.
struct LtAlignment {
  uint32_t weights, rows, out;
};

uint32_t alignmentOf(const void *pointer) {
  const auto bits = reinterpret_cast<uintptr_t>(pointer);
  return bits == 0 ? 256u
                   : static_cast<uint32_t>(
                         std::min<uintptr_t>(256, bits & (~bits + 1)));
}

/// The device (ordinal, compute capability: the algorithm depends on the
/// part), the dtype, k, n, the capacity, the experts, opB and the
/// alignments.
using LtKey = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int,
                         uint32_t, uint32_t, uint32_t>;

std::mutex ltMutex;
std::map<LtKey, std::unique_ptr<LtPlan>> ltPlans;

Status checkLt(cublasStatus_t status, const char *what) {
  if (status == CUBLAS_STATUS_SUCCESS)
    return Status::ok();
  return Status(StatusCode::Internal,
                std::string(what) + ": " + cublasGetStatusName(status));
}

/// A column-major layout of `batch` matrices `stride` elements apart.
Status makeLayout(cublasLtMatrixLayout_t &layout, cudaDataType_t type,
                  int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                  int64_t stride) {
  if (Status s = checkLt(cublasLtMatrixLayoutCreate(&layout, type, rows, cols,
                                                    ld),
                         "cublasLtMatrixLayoutCreate");
      !s)
    return s;
  const int32_t count = static_cast<int32_t>(batch);
  if (Status s = checkLt(cublasLtMatrixLayoutSetAttribute(
                             layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                             &count, sizeof(count)),
                         "cublasLtMatrixLayoutSetAttribute (batch count)");
      !s)
    return s;
  return checkLt(cublasLtMatrixLayoutSetAttribute(
                     layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                     &stride, sizeof(stride)),
                 "cublasLtMatrixLayoutSetAttribute (batch stride)");
}

/// Builds the plan of one shape (row-major C[cap, n] = A[cap, k] op(B[k, n])
/// per block, as column-major C^T = op(B)^T A^T with B first).
Status buildPlan(KernelContext &ctx, LtPlan &plan, cublasOperation_t opB,
                 cudaDataType_t type, int64_t k, int64_t n, int64_t ldb,
                 int64_t capacity, int64_t experts,
                 const LtAlignment &alignment) {
  if (Status s = checkLt(
          cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
          "cublasLtMatmulDescCreate");
      !s)
    return s;
  const int32_t transA = opB, transB = CUBLAS_OP_N;
  const uint32_t epilogue = CUBLASLT_EPILOGUE_RELU;
  for (auto [attribute, value, size] :
       {std::tuple{CUBLASLT_MATMUL_DESC_TRANSA, (const void *)&transA,
                   sizeof(transA)},
        std::tuple{CUBLASLT_MATMUL_DESC_TRANSB, (const void *)&transB,
                   sizeof(transB)},
        std::tuple{CUBLASLT_MATMUL_DESC_EPILOGUE, (const void *)&epilogue,
                   sizeof(epilogue)}})
    if (Status s = checkLt(
            cublasLtMatmulDescSetAttribute(plan.op, attribute, value, size),
            "cublasLtMatmulDescSetAttribute");
        !s)
      return s;
  // op(B)^T is n x k: B stored [k][n] (n x k column-major, ld n) untransposed,
  // or [n][k] (k x n, ld k) transposed.
  const bool transposed = opB == CUBLAS_OP_T;
  if (Status s = makeLayout(plan.weights, type, transposed ? k : n,
                            transposed ? n : k, ldb, experts, k * n);
      !s)
    return s;
  if (Status s = makeLayout(plan.rows, type, k, capacity, k, experts,
                            capacity * k);
      !s)
    return s;
  if (Status s = makeLayout(plan.out, type, n, capacity, n, experts,
                            capacity * n);
      !s)
    return s;
  cublasLtMatmulPreference_t preference = nullptr;
  if (Status s = checkLt(cublasLtMatmulPreferenceCreate(&preference),
                         "cublasLtMatmulPreferenceCreate");
      !s)
    return s;
  const uint64_t workspace = static_cast<uint64_t>(ctx.cublasWorkspaceBytes());
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  // The heuristic assumes 256-byte aligned pointers unless told: a chunk's
  // rows, a caller's weights or a less aligned workspace may be less.
  cublasStatus_t preferred = cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
      sizeof(workspace));
  for (auto [attribute, bytes] :
       {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                  alignment.weights},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment.rows},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment.out},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment.out}})
    if (preferred == CUBLAS_STATUS_SUCCESS)
      preferred = cublasLtMatmulPreferenceSetAttribute(preference, attribute,
                                                       &bytes, sizeof(bytes));
  const Status set = checkLt(preferred, "cublasLtMatmulPreferenceSetAttribute");
  // No algorithm (CUBLAS_STATUS_NOT_SUPPORTED) is an answer, not an error:
  // the unfused path runs.
  const cublasStatus_t heuristic =
      set ? cublasLtMatmulAlgoGetHeuristic(
                static_cast<cublasLtHandle_t>(ctx.cublasLtHandle()), plan.op,
                plan.weights, plan.rows, plan.out, plan.out, preference, 1,
                &result, &found)
          : CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulPreferenceDestroy(preference);
  if (!set)
    return set;
  if (heuristic != CUBLAS_STATUS_SUCCESS &&
      heuristic != CUBLAS_STATUS_NOT_SUPPORTED)
    return checkLt(heuristic, "cublasLtMatmulAlgoGetHeuristic");
  plan.found = found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  plan.algo = result.algo;
  return Status::ok();
}

} // namespace

Status ltReluBatchedGemm(KernelContext &ctx, bool transB, const void *a,
                         const void *b, void *c, DType dtype, int64_t k,
                         int64_t n, int64_t capacity, int64_t experts,
                         bool &done) {
  done = false;
  const cublasOperation_t opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int64_t ldb = transB ? k : n;
  if (dtype == DType::F32 || capacity <= 0 || experts <= 0 || k <= 0)
    return Status::ok(); // f32 stays on cuBLAS's own path (no TF32 there)
  const cudaDataType_t type = dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  LtPlan *plan = nullptr;
  int device = 0;
  if (Status s = checkCuda(cudaGetDevice(&device), "cudaGetDevice"); !s)
    return s;
  const LtAlignment alignment{alignmentOf(b), alignmentOf(a), alignmentOf(c)};
  {
    std::lock_guard<std::mutex> lock(ltMutex);
    LtKey key{device,
              ctx.computeCapability(),
              static_cast<int>(dtype),
              k,
              n,
              capacity,
              experts,
              static_cast<int>(opB),
              alignment.weights,
              alignment.rows,
              alignment.out};
    auto found = ltPlans.find(key);
    if (found == ltPlans.end()) {
      auto built = std::make_unique<LtPlan>();
      if (Status s = buildPlan(ctx, *built, opB, type, k, n, ldb, capacity,
                               experts, alignment);
          !s)
        return s;
      found = ltPlans.emplace(key, std::move(built)).first;
    }
    plan = found->second.get();
  }
  if (!plan->found)
    return Status::ok();
  const float alpha = 1.0f, beta = 0.0f;
  if (Status s = checkLt(
          cublasLtMatmul(static_cast<cublasLtHandle_t>(ctx.cublasLtHandle()),
                         plan->op, &alpha, b, plan->weights, a, plan->rows,
                         &beta, c, plan->out, c, plan->out, &plan->algo,
                         ctx.cublasWorkspace(),
                         static_cast<size_t>(ctx.cublasWorkspaceBytes()),
                         ctx.stream()),
          "cublasLtMatmul (grouped_gemm, relu epilogue)");
      !s)
    return s;
  done = true;
  return Status::ok();
}

} // namespace flex::cuda::detail
