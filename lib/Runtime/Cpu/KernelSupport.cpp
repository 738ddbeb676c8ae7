//===- KernelSupport.cpp - Shared pieces of the CPU kernels ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the fp32 GEMM entry (OpenBLAS or a portable loop), the
// typed GEMM drivers that convert bf16/f16 operands to fp32 in blocks, and the
// split of valid expert rows for parallel loops.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

#include <algorithm>
#include <vector>

#ifdef FLEX_HAVE_CBLAS
#include <cblas.h>
#endif

namespace flex::cpu::detail {

std::vector<RowRange> splitValidRows(const ExpertSegments &segments,
                                     int64_t maxRows) {
  std::vector<RowRange> ranges;
  for (int64_t e = 0; e < segments.experts; ++e) {
    int64_t begin = segments.offsets[e];
    int64_t end = begin + std::max<int64_t>(0, segments.rows[e]);
    for (int64_t row = begin; row < end; row += maxRows)
      ranges.push_back({row, std::min(end, row + maxRows), e});
  }
  return ranges;
}

void sgemm(bool transA, bool transB, int64_t m, int64_t n, int64_t k,
           float alpha, const float *a, int64_t lda, const float *b,
           int64_t ldb, float beta, float *c, int64_t ldc) {
  if (m <= 0 || n <= 0)
    return;
  if (k <= 0) {
    // BLAS rejects lda = 0; the product is empty, so C = beta * C.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
#ifdef FLEX_HAVE_CBLAS
  cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
              transB ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
#else
#pragma omp parallel for schedule(static) if (m * n * k > 32768)
  for (int64_t i = 0; i < m; ++i) {
    float *cRow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j)
      cRow[j] = beta == 0.0f ? 0.0f : beta * cRow[j];
    for (int64_t p = 0; p < k; ++p) {
      float aValue = alpha * (transA ? a[p * lda + i] : a[i * lda + p]);
      if (transB) {
        for (int64_t j = 0; j < n; ++j)
          cRow[j] += aValue * b[j * ldb + p];
      } else {
        const float *bRow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j)
          cRow[j] += aValue * bRow[j];
      }
    }
  }
#endif
}

namespace {

/// Rows per block when an operand needs a fp32 copy: about 4M floats of
/// scratch, large enough that the GEMM stays efficient.
int64_t blockRows(int64_t m, int64_t width) {
  int64_t rows = (int64_t{1} << 22) / std::max<int64_t>(1, width);
  return std::clamp<int64_t>(rows, 64, std::max<int64_t>(m, 1));
}

/// Converts rows [row, row + count) of a typed [*, width] buffer to fp32.
void convertRows(ReadBuffer buffer, int64_t row, int64_t count, int64_t width,
                 float *dst) {
#pragma omp parallel for schedule(static) if (count * width > 65536)
  for (int64_t i = 0; i < count; ++i)
    loadRow(buffer, (row + i) * width, width, dst + i * width);
}

/// A fp32 view of `count` rows of `width` elements starting at element
/// `offset`: the buffer itself when it is fp32, else a converted copy in
/// `scratch`.
const float *fp32View(ReadBuffer buffer, int64_t offset, int64_t count,
                      int64_t width, std::vector<float> &scratch) {
  if (buffer.type == DType::F32)
    return static_cast<const float *>(buffer.data) + offset;
  scratch.resize(static_cast<size_t>(count * width));
  ReadBuffer shifted = buffer;
  shifted.data = static_cast<const char *>(buffer.data) +
                 offset * static_cast<int64_t>(dtypeSize(buffer.type));
  convertRows(shifted, 0, count, width, scratch.data());
  return scratch.data();
}

} // namespace

void typedGemm(ReadBuffer a, int64_t aRow, ReadBuffer b, int64_t bOffset,
               ReadBuffer bias, int64_t biasOffset, WriteBuffer c, int64_t cRow,
               WriteBuffer pre, int64_t m, int64_t k, int64_t n,
               const GroupedGemmOptions &options) {
  if (m <= 0 || n <= 0)
    return;
  std::vector<float> bScratch;
  const float *bF = fp32View(b, bOffset, options.transB ? n : k,
                             options.transB ? k : n, bScratch);
  int64_t ldb = options.transB ? k : n;
  std::vector<float> biasF;
  if (bias.data) {
    biasF.resize(static_cast<size_t>(n));
    loadRow(bias, biasOffset, n, biasF.data());
    if (options.biasScale != 1.0f)
      for (float &value : biasF)
        value *= options.biasScale;
  }

  // Where the GEMM writes: straight into an fp32 output when no other copy
  // of the result is needed, else into a scratch block.
  bool intoC = c.type == DType::F32 && !pre.data;
  bool intoPre =
      !intoC && pre.data && pre.type == DType::F32 && !options.accumulate;
  bool needsPass =
      bias.data || options.epilogue != Epilogue::None || pre.data || !intoC;
  bool aDirect = a.type == DType::F32;
  int64_t rowsPerBlock = intoC || intoPre ? (aDirect ? m : blockRows(m, k))
                                          : blockRows(m, std::max(n, k));

  std::vector<float> aScratch, accScratch;
  for (int64_t r0 = 0; r0 < m; r0 += rowsPerBlock) {
    int64_t mb = std::min(rowsPerBlock, m - r0);
    const float *aF;
    if (aDirect) {
      aF = static_cast<const float *>(a.data) + (aRow + r0) * k;
    } else {
      aScratch.resize(static_cast<size_t>(mb * k));
      convertRows(a, aRow + r0, mb, k, aScratch.data());
      aF = aScratch.data();
    }
    int64_t outRow = cRow + r0;
    float *acc;
    if (intoC) {
      acc = static_cast<float *>(c.data) + outRow * n;
    } else if (intoPre) {
      acc = static_cast<float *>(pre.data) + outRow * n;
    } else {
      accScratch.resize(static_cast<size_t>(mb * n));
      acc = accScratch.data();
    }
    float beta = 0.0f;
    if (options.accumulate) {
      beta = 1.0f;
      if (!intoC)
        convertRows(ReadBuffer{c.data, c.type}, outRow, mb, n, acc);
    }
    sgemm(false, options.transB, mb, n, k, 1.0f, aF, k, bF, ldb, beta, acc, n);
    if (!needsPass)
      continue;
    const float *biasPtr = bias.data ? biasF.data() : nullptr;
    Epilogue epilogue = options.epilogue;
#pragma omp parallel if (mb * n > 32768)
    {
      // With pre as the GEMM target, pre keeps the value before the
      // epilogue and c gets the activated copy from this row buffer.
      std::vector<float> activated(intoPre ? static_cast<size_t>(n) : 0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < mb; ++i) {
        float *v = acc + i * n;
        if (biasPtr)
          for (int64_t j = 0; j < n; ++j)
            v[j] += biasPtr[j];
        if (intoPre) {
          for (int64_t j = 0; j < n; ++j)
            activated[j] = applyEpilogue(epilogue, v[j]);
          storeRow(c, (outRow + i) * n, n, activated.data());
          continue;
        }
        if (pre.data)
          storeRow(pre, (outRow + i) * n, n, v);
        if (epilogue != Epilogue::None)
          for (int64_t j = 0; j < n; ++j)
            v[j] = applyEpilogue(epilogue, v[j]);
        if (!intoC)
          storeRow(c, (outRow + i) * n, n, v);
      }
    }
  }
}

void typedWgrad(ReadBuffer a, ReadBuffer gradC, int64_t row, int64_t m,
                int64_t k, int64_t n, WriteBuffer gradB, int64_t gradBOffset,
                WriteBuffer gradBias, int64_t gradBiasOffset, bool accumulate,
                int64_t aRow) {
  const int64_t aFirst = aRow < 0 ? row : aRow;
  if (gradBias.data) {
    // Column sums in row order, split by columns: the same bits for any
    // number of threads.
    constexpr int64_t kColumnBlock = 256;
    int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (m * n > 65536 && blocks > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t j0 = blk * kColumnBlock;
      int64_t width = std::min(kColumnBlock, n - j0);
      float sums[kColumnBlock] = {};
      float values[kColumnBlock];
      if (accumulate)
        loadRow(gradBias, gradBiasOffset + j0, width, sums);
      for (int64_t i = 0; i < m; ++i) {
        loadRow(gradC, (row + i) * n + j0, width, values);
        for (int64_t j = 0; j < width; ++j)
          sums[j] += values[j];
      }
      storeRow(gradBias, gradBiasOffset + j0, width, sums);
    }
  }
  if (m <= 0 || k <= 0) {
    if (!accumulate)
      storeZeros(gradB, gradBOffset, k * n);
    return;
  }
  bool direct = gradB.type == DType::F32;
  std::vector<float> accScratch;
  float *acc;
  if (direct) {
    acc = static_cast<float *>(gradB.data) + gradBOffset;
  } else {
    accScratch.resize(static_cast<size_t>(k * n));
    acc = accScratch.data();
    if (accumulate)
      loadRow(gradB, gradBOffset, k * n, acc);
  }
  bool bothFp32 = a.type == DType::F32 && gradC.type == DType::F32;
  int64_t rowsPerBlock = bothFp32 ? m : blockRows(m, std::max(k, n));
  std::vector<float> aScratch, gScratch;
  for (int64_t r0 = 0; r0 < m; r0 += rowsPerBlock) {
    int64_t mb = std::min(rowsPerBlock, m - r0);
    const float *aF = fp32View(a, (aFirst + r0) * k, mb, k, aScratch);
    const float *gF = fp32View(gradC, (row + r0) * n, mb, n, gScratch);
    sgemm(true, false, k, n, mb, 1.0f, aF, k, gF, n,
          r0 == 0 && !accumulate ? 0.0f : 1.0f, acc, n);
  }
  if (!direct) {
#pragma omp parallel for schedule(static) if (k * n > 65536)
    for (int64_t i = 0; i < k; ++i)
      storeRow(gradB, gradBOffset + i * n, n, acc + i * n);
  }
}

} // namespace flex::cpu::detail
