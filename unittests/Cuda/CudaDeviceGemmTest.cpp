//===- CudaDeviceGemmTest.cpp - The device-sized grouped GEMM -------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The device-sized grouped GEMM (DeviceGroupedGemm.cu) and the cuBLAS path
// beside it, each against a plain fp64 product of the same rounded inputs:
// forward (b and b^T), the weight gradient, accumulation, both tile shapes
// (few and many rows per expert), experts without rows, K and N tails,
// padded and ragged row layouts; rows outside every segment stay untouched;
// a recorded graph replays with other counts (the sizes are read on the
// device); what the kernel does not take is refused with the reason.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"

#include "Elementwise.h"
#include "GroupedGemmInternal.h"
#include "flex/Runtime/Core/GroupedGemmRule.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>

using namespace flex;
using cuda::detail::GroupedGemmPath;
using flex::cudatest::Buffer;
using flex::cudatest::normals;

namespace {

/// The row segments of one routing: padded (expert e's rows start at e * C),
/// ragged (back to back) or aligned (ragged, each expert's first row a
/// multiple of `align`), on the host and the device.
struct Segments {
  std::vector<int32_t> offsets, rows;
  int64_t rowBound = 0;
  int64_t align = 0;
  Buffer dOffsets, dRows;

  /// `base`: the first segment's row (a pipelined chunk's segments start
  /// at the chunk's first row). `align` > 0 (with capacity 0): the aligned
  /// layout.
  Segments(const std::vector<int32_t> &counts, int64_t capacity,
           int32_t base = 0, int64_t align = 0)
      : align(align) {
    int64_t E = static_cast<int64_t>(counts.size());
    offsets.assign(E + 1, base);
    rows = counts;
    for (int64_t e = 0; e < E; ++e)
      offsets[e + 1] =
          capacity > 0 ? static_cast<int32_t>(base + (e + 1) * capacity)
          : align > 0
              ? static_cast<int32_t>(offsets[e] +
                                     (counts[e] + align - 1) / align * align)
              : offsets[e] + counts[e];
    // A ragged buffer is declared larger than its rows (the T * k bound);
    // an aligned one by two blocks and a part of one.
    rowBound = capacity > 0 ? base + E * capacity
               : align > 0  ? offsets[E] + 2 * align + 5
                            : offsets[E] + 7;
    dOffsets = Buffer(DType::I32, E + 1);
    dRows = Buffer(DType::I32, E);
    upload();
  }
  void upload() {
    std::memcpy(dOffsets.host.data(), offsets.data(), 4 * offsets.size());
    std::memcpy(dRows.host.data(), rows.data(), 4 * rows.size());
    dOffsets.upload();
    dRows.upload();
  }
  int64_t experts() const { return static_cast<int64_t>(rows.size()); }
  cuda::ExpertRowSpace space() {
    cuda::ExpertRowSpace s;
    s.offsets = dOffsets.as<int32_t>();
    s.rows = dRows.as<int32_t>();
    s.experts = experts();
    s.rowBound = rowBound;
    s.staticCapacity = -1;
    s.padded = false;
    s.alignedRows = align;
    return s;
  }
  bool inSegment(int64_t row) const {
    for (int64_t e = 0; e < experts(); ++e)
      if (row >= offsets[e] && row < offsets[e] + rows[e])
        return true;
    return false;
  }
};

/// c[r] (+)= a[r] @ b[e] (or b[e]^T) over the segments' rows, in fp64.
std::vector<double> referenceForward(const Buffer &a, const Buffer &b,
                                     const Buffer &c0, const Segments &seg,
                                     int64_t k, int64_t n, bool transB,
                                     bool accumulate) {
  std::vector<double> out(c0.count, 0.0);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = accumulate ? c0.at(i) : 0.0;
  for (int64_t e = 0; e < seg.experts(); ++e)
    for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e]; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0;
        for (int64_t i = 0; i < k; ++i)
          sum += a.at(r * k + i) *
                 b.at(e * k * n + (transB ? j * k + i : i * n + j));
        out[r * n + j] += sum;
      }
  return out;
}

/// grad_b[e] = (initial[e] +) a_e^T grad_c_e over the segments' rows, in
/// fp64.
std::vector<double> referenceWgrad(const Buffer &a, const Buffer &gradC,
                                   const Segments &seg, int64_t k, int64_t n,
                                   const Buffer *initial = nullptr) {
  std::vector<double> out(seg.experts() * k * n, 0.0);
  for (size_t i = 0; i < out.size() && initial; ++i)
    out[i] = initial->at(i);
  for (int64_t e = 0; e < seg.experts(); ++e)
    for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e]; ++r)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j)
          out[(e * k + i) * n + j] += a.at(r * k + i) * gradC.at(r * n + j);
  return out;
}

/// A weight gradient's operands over `seg`'s rows: a and grad_c drawn
/// N(0, 1), grad_b poisoned or (accumulating) drawn N(0, 16), and the fp64
/// reference of what the GEMM leaves in grad_b.
struct WgradOperands {
  Buffer a, gradC, gradB;
  std::vector<double> want;
  WgradOperands(DType dt, const Segments &seg, int64_t k, int64_t n,
                bool accumulate, std::mt19937_64 &rng)
      : a(dt, seg.rowBound * k), gradC(dt, seg.rowBound * n),
        gradB(dt, seg.experts() * k * n) {
    a.set(normals(rng, seg.rowBound * k, 1.0));
    gradC.set(normals(rng, seg.rowBound * n, 1.0));
    if (accumulate)
      gradB.set(normals(rng, seg.experts() * k * n, 4.0));
    else
      gradB.poison();
    want = referenceWgrad(a, gradC, seg, k, n, accumulate ? &gradB : nullptr);
  }
};

/// Relative L2 over the segments' rows; NaN fails.
double segmentError(const Buffer &got, const std::vector<double> &want,
                    const Segments &seg, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t e = 0; e < seg.experts(); ++e)
    for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e]; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double g = got.at(r * n + j), w = want[r * n + j];
        if (!std::isfinite(g))
          return INFINITY;
        diff += (g - w) * (g - w);
        norm += w * w;
      }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

/// Relative L2 over a whole buffer (a weight gradient); NaN fails.
double bufferError(const Buffer &got, const std::vector<double> &want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    double g = got.at(i);
    if (!std::isfinite(g))
      return INFINITY;
    diff += (g - want[i]) * (g - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

/// The first of c's `rows` rows (n elements each) that `skip` does not
/// exempt and whose bytes differ from `before`; -1 when there is none.
template <typename Skip>
int64_t firstRowWritten(const Buffer &c, const std::vector<uint8_t> &before,
                        int64_t rows, int64_t n, Skip skip) {
  const size_t rowBytes = n * dtypeSize(c.type);
  for (int64_t r = 0; r < rows; ++r)
    if (!skip(r) && std::memcmp(c.host.data() + r * rowBytes,
                                before.data() + r * rowBytes, rowBytes) != 0)
      return r;
  return -1;
}

/// The first of the `rows` rows (n elements each) that `compared` takes
/// where `got`'s bytes differ from `want`'s (both downloaded); -1 when
/// there is none.
template <typename Compared>
int64_t firstRowDiffering(const Buffer &got, const Buffer &want, int64_t rows,
                          int64_t n, Compared compared) {
  return firstRowWritten(got, want.host, rows, n,
                         [&](int64_t r) { return !compared(r); });
}

const char *pathName(GroupedGemmPath path) {
  switch (path) {
  case GroupedGemmPath::Device:
    return "device";
  case GroupedGemmPath::Cublas:
    return "cublas";
  case GroupedGemmPath::CublasGrouped:
    return "cublas grouped";
  default:
    return "auto";
  }
}

struct GemmCase {
  std::string name;
  std::vector<int32_t> counts;
  int64_t capacity; ///< > 0: padded layout with this C; 0: ragged
  int64_t k, n;
  int32_t base = 0; ///< the first segment's row
};

/// 70 experts, mean about 20 rows: some empty (30, 31, 32 among them), one
/// of 83 rows.
std::vector<int32_t> manyExpertCounts() {
  std::vector<int32_t> counts(70);
  for (int e = 0; e < 70; ++e)
    counts[e] = e % 5 == 0 || e == 31 || e == 32 ? 0 : (e * 7) % 40;
  counts[33] = 83;
  return counts;
}

std::vector<GemmCase> gemmCases() {
  return {
      // Few rows per expert (decode tiles), an expert without rows, K and N
      // not multiples of the tiles.
      {"decode_ragged", {3, 0, 17, 1, 9, 32}, 0, 136, 264},
      {"decode_padded", {5, 0, 12, 31}, 32, 72, 40},
      // Many rows per expert (prefill tiles), partial last M tiles.
      {"prefill_ragged", {200, 0, 129, 77}, 0, 104, 136},
      {"prefill_padded", {150, 256, 0}, 256, 64, 520},
      // Balanced padded blocks (243 of 256 rows held): the cuBLAS path runs
      // one batched GEMM over the blocks, padding rows included.
      {"balanced_padded", {60, 64, 58, 61}, 64, 72, 40},
      // A pipelined chunk's segments: full blocks from row 96 on (batched
      // on the cuBLAS path; rows before 96 belong to other chunks).
      {"chunk_blocks", {48, 48, 48}, 48, 64, 56, 96},
      // Many experts (the warp scan's second and third pass, empty groups
      // around lanes 31/32), a group of several small tiles, and K deep
      // enough that every pipeline stage is refilled.
      {"many_experts_deep_k", manyExpertCounts(), 0, 392, 136},
      {"prefill_deep_k", {300, 0, 257, 129}, 0, 168, 72},
      // Past 512 rows per expert: auto runs a fused backward as the GEMM
      // (on the device kernel, up to kWgmmaForwardRowsPerExpert) and the
      // pass (autoFusesBackwardInStore).
      {"prefill_many_rows", {900, 700, 0, 800}, 0, 64, 72},
      // Past 2048 (8807 declared rows over 4 experts): auto's rule takes
      // cuBLAS for the GEMMs (the host read, a GEMM per expert above 1024
      // rows).
      {"prefill_past_device_rows", {4200, 0, 2100, 2500}, 0, 64, 40},
  };
}

class CudaDeviceGemm : public ::testing::TestWithParam<GemmCase> {};

TEST_P(CudaDeviceGemm, ForwardMatchesFp64OnBothPaths) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), R = seg.rowBound, k = tc.k, n = tc.n;
  std::mt19937_64 rng(7 + k);
  for (DType dt : {DType::BF16, DType::F16})
    for (bool transB : {false, true})
      for (bool accumulate : {false, true})
        for (GroupedGemmPath path :
             {GroupedGemmPath::Device, GroupedGemmPath::Cublas,
              GroupedGemmPath::CublasGrouped}) {
          SCOPED_TRACE(std::string(toString(dt)) + (transB ? " b^T" : " b") +
                       (accumulate ? " accumulate" : "") + " " +
                       pathName(path));
          Buffer a(dt, R * k), b(dt, E * k * n), c(dt, R * n);
          a.set(normals(rng, R * k, 1.0));
          b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          if (accumulate)
            c.set(normals(rng, R * n, 1.0));
          else
            c.poison();
          std::vector<double> want =
              referenceForward(a, b, c, seg, k, n, transB, accumulate);
          std::vector<uint8_t> before = c.host;
          cuda::ExpertRowSpace space = seg.space();
          std::string reason;
          ASSERT_TRUE(cuda::detail::deviceGroupedGemmApplies(
              *ctx, dt, k, n, space, {a.device, b.device, c.device}, &reason))
              << reason;
          GroupedGemmOptions options;
          options.transB = transB;
          options.accumulate = accumulate;
          Status status = cuda::detail::groupedGemmWith(
              *ctx, {a.device, dt}, {b.device, dt}, {}, {c.device, dt}, k, n,
              space, options, {}, path);
          ASSERT_TRUE(status.isOk()) << status.message();
          c.download();
          EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
          // Rows outside every segment keep their bytes, but for the
          // padding rows inside blocks that the cuBLAS path computes when it
          // batches them (batchesUniformBlocks).
          int64_t held = 0;
          for (int32_t rows : tc.counts)
            held += rows;
          const bool batchedBlocks = path != GroupedGemmPath::Device &&
                                     tc.capacity > 0 &&
                                     batchesUniformBlocks(E, tc.capacity, held);
          ASSERT_EQ(firstRowWritten(c, before, R, n,
                                    [&](int64_t r) {
                                      return seg.inSegment(r) ||
                                             (batchedBlocks && r >= tc.base &&
                                              r < tc.base + E * tc.capacity);
                                    }),
                    -1)
              << "a row outside the segments was written";
        }
}

TEST_P(CudaDeviceGemm, WeightGradientMatchesFp64OnBothPaths) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), k = tc.k, n = tc.n;
  std::mt19937_64 rng(11 + n);
  for (DType dt : {DType::BF16, DType::F16})
    for (bool accumulate : {false, true})
      for (GroupedGemmPath path :
           {GroupedGemmPath::Device, GroupedGemmPath::Cublas}) {
        SCOPED_TRACE(std::string(toString(dt)) +
                     (accumulate ? " accumulate" : "") +
                     (path == GroupedGemmPath::Device ? " device" : " cublas"));
        WgradOperands ops(dt, seg, k, n, accumulate, rng);
        Buffer &a = ops.a, &gradC = ops.gradC, &gradB = ops.gradB;
        const std::vector<double> &want = ops.want;
        std::string reason;
        ASSERT_TRUE(cuda::detail::deviceGroupedGemmApplies(
            *ctx, dt, k, n, seg.space(),
            {a.device, gradC.device, gradB.device}, &reason))
            << reason;
        Status status = cuda::detail::groupedGemmWgradWith(
            *ctx, {a.device, dt}, {gradC.device, dt}, k, n, seg.space(),
            {gradB.device, dt}, {}, accumulate, path);
        ASSERT_TRUE(status.isOk()) << status.message();
        gradB.download();
        EXPECT_LE(bufferError(gradB, want), 1e-2);
        // An expert without rows gets zeros (or keeps its values).
        for (int64_t e = 0; e < E; ++e) {
          if (seg.rows[e] != 0)
            continue;
          for (int64_t i = 0; i < k * n; ++i) {
            ASSERT_EQ(gradB.at(e * k * n + i), want[e * k * n + i])
                << "expert " << e << " element " << i;
          }
        }
      }
}

// The per-expert cuBLAS GEMMs spread over side streams (gemm_streams 3):
// the same calls as on one stream, so the same bytes, forward (b and b^T,
// accumulating or not) and weight gradient; fp64 agrees; rows outside the
// segments keep theirs; and the next step on the context's stream sees
// every expert's rows (it waits for the side streams).
TEST_P(CudaDeviceGemm, PerExpertGemmsOnSideStreamsMatchOneStream) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), R = seg.rowBound, k = tc.k, n = tc.n;
  std::mt19937_64 rng(13 + k + n);
  const DType dt = DType::BF16;
  for (bool transB : {false, true})
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(std::string(transB ? "b^T" : "b") +
                   (accumulate ? " accumulate" : ""));
      Buffer a(dt, R * k), b(dt, E * k * n), c0(dt, R * n);
      a.set(normals(rng, R * k, 1.0));
      b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      c0.set(normals(rng, R * n, 1.0));
      std::vector<double> want =
          referenceForward(a, b, c0, seg, k, n, transB, accumulate);
      GroupedGemmOptions options;
      options.transB = transB;
      options.accumulate = accumulate;
      std::array<Buffer, 2> c = {Buffer(dt, R * n), Buffer(dt, R * n)};
      for (int streams : {1, 3}) {
        Buffer &out = c[streams == 1 ? 0 : 1];
        if (accumulate) {
          out.host = c0.host;
          out.upload();
        } else {
          out.poison();
        }
        ctx->gemmStreams = streams;
        Status status = cuda::detail::groupedGemmWith(
            *ctx, {a.device, dt}, {b.device, dt}, {}, {out.device, dt}, k, n,
            seg.space(), options, {}, GroupedGemmPath::Cublas);
        ASSERT_TRUE(status.isOk()) << status.message();
        out.download();
        EXPECT_LE(segmentError(out, want, seg, n), 1e-2) << streams;
      }
      EXPECT_EQ(
          firstRowDiffering(c[1], c[0], R, n, [](int64_t) { return true; }), -1)
          << "the side streams' product differs from one stream's";
    }
  // The weight gradient, then a copy queued on the context's stream right
  // after: it reads every expert's slice as the GEMMs left it.
  Buffer a(dt, R * k), gradC(dt, R * n);
  a.set(normals(rng, R * k, 1.0));
  gradC.set(normals(rng, R * n, 1.0));
  std::array<Buffer, 2> copies = {Buffer(dt, E * k * n), Buffer(dt, E * k * n)};
  for (int streams : {1, 3}) {
    Buffer gradB(dt, E * k * n);
    gradB.poison();
    Buffer &copy = copies[streams == 1 ? 0 : 1];
    copy.poison();
    ctx->gemmStreams = streams;
    Status status = cuda::detail::groupedGemmWgradWith(
        *ctx, {a.device, dt}, {gradC.device, dt}, k, n, seg.space(),
        {gradB.device, dt}, {}, false, GroupedGemmPath::Cublas);
    ASSERT_TRUE(status.isOk()) << status.message();
    ASSERT_EQ(cudaMemcpyAsync(copy.device, gradB.device, copy.host.size(),
                              cudaMemcpyDeviceToDevice,
                              reinterpret_cast<cudaStream_t>(ctx->stream())),
              cudaSuccess);
    copy.download();
  }
  EXPECT_EQ(firstRowDiffering(copies[1], copies[0], E * k, n,
                              [](int64_t) { return true; }),
            -1)
      << "the side streams' weight gradient differs from one stream's";
  EXPECT_LE(bufferError(copies[1], referenceWgrad(a, gradC, seg, k, n)), 1e-2);
}

/// What spreadOverStreams' ordering test's host functions share.
struct StreamOrder {
  std::atomic<bool> earlierDone{false};
  std::array<std::atomic<bool>, 3> sawEarlier{}, done{};
  std::array<cudaStream_t, 3> stream{};
};
struct StreamItem {
  StreamOrder *order;
  int item;
  bool slow;
};

// KernelContext::spreadOverStreams on its own, the two orders it promises,
// with host functions that take their time: every item starts after the
// work queued on the context's stream before the call (a slow host
// function), and the context's stream waits for every item (slow ones on
// the side streams) before what is queued after. Three items on three
// streams; a synchronize of the context's stream alone must see them done.
TEST(CudaSideStreams, StartAfterEarlierWorkAndJoinBeforeLaterWork) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  ctx->gemmStreams = 3;
  auto stream = reinterpret_cast<cudaStream_t>(ctx->stream());
  for (int round = 0; round < 2; ++round) { // the second reuses the streams
    SCOPED_TRACE(round);
    StreamOrder order;
    ASSERT_EQ(cudaLaunchHostFunc(
                  stream,
                  [](void *data) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(60));
                    static_cast<StreamOrder *>(data)->earlierDone = true;
                  },
                  &order),
              cudaSuccess);
    std::array<StreamItem, 3> items;
    // The heaviest item goes to the context's stream (fast), the two
    // lighter ones to side streams (slow).
    Status status = ctx->spreadOverStreams(
        {30, 20, 10}, [&](int64_t item, void *handle) -> Status {
          cudaStream_t on = nullptr;
          if (cublasGetStream(static_cast<cublasHandle_t>(handle), &on) !=
              CUBLAS_STATUS_SUCCESS)
            return Status(StatusCode::Internal, "cublasGetStream");
          order.stream[item] = on;
          items[item] = {&order, static_cast<int>(item), item > 0};
          return cuda::checkCuda(cudaLaunchHostFunc(
                                     on,
                                     [](void *data) {
                                       auto *it =
                                           static_cast<StreamItem *>(data);
                                       it->order->sawEarlier[it->item] =
                                           it->order->earlierDone.load();
                                       if (it->slow)
                                         std::this_thread::sleep_for(
                                             std::chrono::milliseconds(60));
                                       it->order->done[it->item] = true;
                                     },
                                     &items[item]),
                                 "cudaLaunchHostFunc");
        });
    ASSERT_TRUE(status.isOk()) << status.message();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(order.done[i])
          << "item " << i << " not done when the stream was";
      EXPECT_TRUE(order.sawEarlier[i])
          << "item " << i << " started before the earlier work finished";
    }
    EXPECT_EQ(order.stream[0], stream) << "the heaviest item's stream";
    EXPECT_NE(order.stream[1], stream);
    EXPECT_NE(order.stream[2], stream);
    EXPECT_NE(order.stream[1], order.stream[2]);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
}

// Bias, pre and the activation: applied in the device kernel's store (its
// few-rows tile) or by the epilogue kernel after it (the larger tiles, and
// the cuBLAS path); c = act(a @ b[e] + bias[e]) and pre = a @ b[e] +
// bias[e] over the segments' rows either way.
TEST_P(CudaDeviceGemm, EpilogueMatchesFp64OnBothPaths) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), R = seg.rowBound, k = tc.k, n = tc.n;
  std::mt19937_64 rng(19 + k);
  for (DType dt : {DType::BF16, DType::F16})
    for (Epilogue epilogue :
         {Epilogue::None, Epilogue::Relu, Epilogue::Gelu, Epilogue::Silu})
      for (bool withBias : {false, true})
        for (GroupedGemmPath path :
             {GroupedGemmPath::Device, GroupedGemmPath::Cublas,
              GroupedGemmPath::CublasGrouped}) {
          SCOPED_TRACE(std::string(toString(dt)) + " epilogue " +
                       std::to_string(static_cast<int>(epilogue)) +
                       (withBias ? " bias" : "") + " " + pathName(path));
          Buffer a(dt, R * k), b(dt, E * k * n), bias(dt, E * n), c(dt, R * n),
              pre(dt, R * n);
          a.set(normals(rng, R * k, 1.0));
          b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          bias.set(normals(rng, E * n, 0.5));
          c.poison();
          pre.poison();
          std::vector<double> want =
              referenceForward(a, b, c, seg, k, n, false, false);
          std::vector<double> wantPre = want;
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e];
                 ++r)
              for (int64_t j = 0; j < n; ++j) {
                double v =
                    want[r * n + j] + (withBias ? bias.at(e * n + j) : 0);
                wantPre[r * n + j] = v;
                double act = v;
                if (epilogue == Epilogue::Relu)
                  act = v > 0 ? v : 0;
                else if (epilogue == Epilogue::Gelu)
                  act = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
                else if (epilogue == Epilogue::Silu)
                  act = v / (1 + std::exp(-v));
                want[r * n + j] = act;
              }
          GroupedGemmOptions options;
          options.epilogue = epilogue;
          Status status = cuda::detail::groupedGemmWith(
              *ctx, {a.device, dt}, {b.device, dt},
              withBias ? ReadBuffer{bias.device, dt} : ReadBuffer{},
              {c.device, dt}, k, n, seg.space(), options, {pre.device, dt},
              path);
          ASSERT_TRUE(status.isOk()) << status.message();
          c.download();
          pre.download();
          EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
          EXPECT_LE(segmentError(pre, wantPre, seg, n), 1e-2);
        }
}

// A gather-fused GEMM (row_tokens): row r reads x[rowTokens[r]] of T token
// rows. The device kernel follows the map in its A loads; the cuBLAS path
// and f32 (which the kernel does not take) gather into scratch first. Both
// must equal the product over the dispatched copy: forward (b and b^T) and
// the weight gradient; a row mapped to -1 (padding) reads zeros.
TEST_P(CudaDeviceGemm, GatheredRowsMatchFp64OnEveryPath) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), R = seg.rowBound, k = tc.k, n = tc.n;
  const int64_t T = 37;
  std::mt19937_64 rng(13 + k + n);
  // Each segment row takes a random token; the rest -1 (never read, or
  // zeros where a path reads whole blocks).
  Buffer rowTokens(DType::I32, R);
  std::vector<int32_t> tokens(R, -1);
  for (int64_t r = 0; r < R; ++r)
    if (seg.inSegment(r))
      tokens[r] = static_cast<int32_t>(rng() % T);
  std::memcpy(rowTokens.host.data(), tokens.data(), 4 * R);
  rowTokens.upload();
  const RowGather gather{rowTokens.as<int32_t>(), T};
  for (DType dt : {DType::BF16, DType::F16, DType::F32})
    for (GroupedGemmPath path :
         {GroupedGemmPath::Auto, GroupedGemmPath::Device,
          GroupedGemmPath::Cublas, GroupedGemmPath::CublasGrouped}) {
      SCOPED_TRACE(std::string(toString(dt)) + " " + pathName(path));
      Buffer x(dt, T * k), b(dt, E * k * n), c(dt, R * n), gradC(dt, R * n),
          gradB(dt, E * k * n), dispatched(dt, R * k);
      x.set(normals(rng, T * k, 1.0));
      b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      gradC.set(normals(rng, R * n, 1.0));
      // The dispatched copy the unfused path would read.
      std::vector<double> copy(R * k, 0.0);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; tokens[r] >= 0 && i < k; ++i)
          copy[r * k + i] = x.at(tokens[r] * k + i);
      dispatched.set(copy);
      for (bool transB : {false, true}) {
        SCOPED_TRACE(transB ? "b^T" : "b");
        c.poison();
        std::vector<double> want =
            referenceForward(dispatched, b, c, seg, k, n, transB, false);
        GroupedGemmOptions options;
        options.transB = transB;
        Status status = cuda::detail::groupedGemmWith(
            *ctx, {x.device, dt}, {b.device, dt}, {}, {c.device, dt}, k, n,
            seg.space(), options, {}, path, gather);
        ASSERT_TRUE(status.isOk()) << status.message();
        c.download();
        EXPECT_LE(segmentError(c, want, seg, n),
                  dt == DType::F32 ? 1e-5 : 1e-2);
      }
      gradB.poison();
      std::vector<double> want(gradB.count, 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e]; ++r)
          for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < n; ++j)
              want[(e * k + i) * n + j] +=
                  copy[r * k + i] * gradC.at(r * n + j);
      Status status = cuda::detail::groupedGemmWgradWith(
          *ctx, {x.device, dt}, {gradC.device, dt}, k, n, seg.space(),
          {gradB.device, dt}, {}, false, path, gather);
      ASSERT_TRUE(status.isOk()) << status.message();
      gradB.download();
      EXPECT_LE(bufferError(gradB, want), dt == DType::F32 ? 1e-5 : 1e-2);
    }
}

// grouped_gemm_glu: the fused kernel (gate and up tiles side by side in one
// CTA, silu(gate) * up in the store) equals the device kernel's two GEMMs
// and the glu kernel bit for bit on a dynamic row space, products kept or
// not, with and without a gathered A; on a static space (fused there too,
// where the unfused GEMMs run cuBLAS) and on the unfused cuBLAS path it
// matches fp64. Rows outside every segment keep their bytes on the fused
// path.
TEST_P(CudaDeviceGemm, GluMatchesTheUnfusedStepsAndFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), k = tc.k, n = tc.n, T = 41;
  const bool staticToo = tc.capacity > 0 && tc.base == 0;
  std::mt19937_64 rng(17 + k + 3 * n);
  for (bool isStatic : {false, true}) {
    if (isStatic && !staticToo)
      continue;
    cuda::ExpertRowSpace space = seg.space();
    std::vector<int32_t> first = seg.offsets, rows = seg.rows;
    if (isStatic) { // every row of [0, E * C) is computed
      space.staticCapacity = tc.capacity;
      space.rowBound = E * tc.capacity;
      for (int64_t e = 0; e < E; ++e)
        rows[e] = static_cast<int32_t>(tc.capacity);
    }
    const int64_t R = space.rowBound;
    auto computed = [&](int64_t r) {
      for (int64_t e = 0; e < E; ++e)
        if (r >= first[e] && r < first[e] + rows[e])
          return true;
      return false;
    };
    for (DType dt : {DType::BF16, DType::F16})
      for (bool gathered : {false, true})
        for (bool keep : {false, true}) {
          SCOPED_TRACE(
              std::string(toString(dt)) + (isStatic ? " static" : " dynamic") +
              (gathered ? " gathered" : "") + (keep ? " products kept" : ""));
          std::vector<int32_t> tokens(R, -1);
          for (int64_t r = 0; r < R; ++r)
            tokens[r] = static_cast<int32_t>(rng() % T);
          Buffer rowTokens(DType::I32, R);
          std::memcpy(rowTokens.host.data(), tokens.data(), 4 * R);
          rowTokens.upload();
          const RowGather gather =
              gathered ? RowGather{rowTokens.as<int32_t>(), T} : RowGather{};
          const int64_t aRows = gathered ? T : R;
          Buffer a(dt, aRows * k), bGate(dt, E * k * n), bUp(dt, E * k * n);
          a.set(normals(rng, aRows * k, 1.0));
          bGate.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          bUp.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          auto aRow = [&](int64_t r) { return gathered ? tokens[r] : r; };

          // fp64: silu(a @ bGate) * (a @ bUp) over the computed rows.
          std::vector<double> wantC(R * n, 0.0), wantG(R * n, 0.0),
              wantU(R * n, 0.0);
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = first[e]; r < first[e] + rows[e]; ++r)
              for (int64_t j = 0; j < n; ++j) {
                double g = 0, u = 0;
                for (int64_t i = 0; i < k; ++i) {
                  double x = a.at(aRow(r) * k + i);
                  g += x * bGate.at((e * k + i) * n + j);
                  u += x * bUp.at((e * k + i) * n + j);
                }
                wantG[r * n + j] = g;
                wantU[r * n + j] = u;
                wantC[r * n + j] = g / (1.0 + std::exp(-g)) * u;
              }
          auto error = [&](const Buffer &got,
                           const std::vector<double> &want) -> double {
            double diff = 0, norm = 0;
            for (int64_t r = 0; r < R; ++r)
              for (int64_t j = 0; computed(r) && j < n; ++j) {
                double v = got.at(r * n + j), w = want[r * n + j];
                if (!std::isfinite(v))
                  return INFINITY;
                diff += (v - w) * (v - w);
                norm += w * w;
              }
            return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
          };

          for (GroupedGemmPath path :
               {GroupedGemmPath::Device, GroupedGemmPath::Cublas}) {
            SCOPED_TRACE(pathName(path));
            Buffer c(dt, R * n), gateIn(dt, R * n), upIn(dt, R * n);
            c.poison();
            gateIn.poison();
            upIn.poison();
            std::vector<uint8_t> before = c.host;
            Status status = cuda::detail::groupedGemmGluWith(
                *ctx, {a.device, dt}, {bGate.device, dt}, {bUp.device, dt},
                {c.device, dt}, k, n, space,
                keep ? WriteBuffer{gateIn.device, dt} : WriteBuffer{},
                keep ? WriteBuffer{upIn.device, dt} : WriteBuffer{}, path,
                gather);
            ASSERT_TRUE(status.isOk()) << status.message();
            c.download();
            gateIn.download();
            upIn.download();
            EXPECT_LE(error(c, wantC), 2e-2);
            if (keep) {
              EXPECT_LE(error(gateIn, wantG), 1e-2);
              EXPECT_LE(error(upIn, wantU), 1e-2);
            }
            // (The cuBLAS path may compute a padded layout's padding rows.)
            if (path == GroupedGemmPath::Device) {
              ASSERT_EQ(firstRowWritten(c, before, R, n, computed), -1)
                  << "a row outside the segments was written";
            }
            if (path != GroupedGemmPath::Device || isStatic)
              continue;
            // The unfused steps on the device kernel: the same bits.
            Buffer g(dt, R * n), u(dt, R * n), c2(dt, R * n);
            c2.poison();
            for (auto [b, out] : {std::pair{&bGate, &g}, std::pair{&bUp, &u}})
              ASSERT_TRUE(cuda::detail::groupedGemmWith(
                              *ctx, {a.device, dt}, {b->device, dt}, {},
                              {out->device, dt}, k, n, space, {}, {},
                              GroupedGemmPath::Device, gather)
                              .isOk());
            ASSERT_TRUE(cuda::glu(*ctx, {g.device, dt}, {u.device, dt},
                                  {c2.device, dt}, n, space)
                            .isOk());
            c2.download();
            g.download();
            u.download();
            ASSERT_EQ(firstRowDiffering(c, c2, R, n, computed), -1)
                << "fused and unfused c differ";
            if (keep) {
              ASSERT_EQ(firstRowDiffering(gateIn, g, R, n, computed), -1)
                  << "kept gate products differ";
              ASSERT_EQ(firstRowDiffering(upIn, u, R, n, computed), -1)
                  << "kept up products differ";
            }
          }
        }
  }
}

/// The wgmma form a fused store runs whatever tile is asked
/// (kFusedStoreTile: 128 x 256).
constexpr cuda::detail::DeviceTiles kFusedStoreForm =
    cuda::detail::DeviceTiles::HopperWide;
static_assert(cuda::detail::kFusedStoreTile == cuda::detail::HopperTile::Wide);

/// Whether a fused backward on `path` asks for the wgmma kernel's store:
/// the device path always, cuBLAS never, auto by autoFusesBackwardInStore
/// (the declared rows per expert; eagerly).
bool fusesInStore(const cuda::KernelContext &ctx, GroupedGemmPath path,
                  const cuda::ExpertRowSpace &space) {
  if (path != GroupedGemmPath::Auto && path != GroupedGemmPath::Device)
    return false;
  if (path == GroupedGemmPath::Device ||
      ctx.groupedGemm == GroupedGemmImpl::Device)
    return true;
  return ctx.groupedGemm == GroupedGemmImpl::Auto &&
         autoFusesBackwardInStore(fusedBackwardRows(space.staticCapacity,
                                                    space.experts,
                                                    space.rowBound),
                                  space.experts, false);
}

/// The plain product of a fused backward's GEMM on the engine the fused step
/// took: the form the wgmma kernel's fused store runs for its default tile,
/// or grouped_gemm's path (Device, which asked for the fused kernel, as
/// Auto).
Status productOnTheEngineOf(cuda::KernelContext &ctx, const Buffer &a,
                            const Buffer &b, Buffer &product, DType dt,
                            int64_t k, int64_t n,
                            const cuda::ExpertRowSpace &space, bool transB,
                            GroupedGemmPath path, bool onWgmma) {
  if (onWgmma)
    return cuda::detail::deviceGroupedGemm(ctx, a.device, b.device,
                                           product.device, dt, k, n, space,
                                           transB, false, kFusedStoreForm);
  GroupedGemmOptions options;
  options.transB = transB;
  return cuda::detail::groupedGemmWith(
      ctx, {a.device, dt}, {b.device, dt}, {}, {product.device, dt}, k, n,
      space, options, {},
      path == GroupedGemmPath::Device ? GroupedGemmPath::Auto : path);
}

/// A row space a fused step's test runs on: the case's segments (dynamic),
/// or, for a fixed capacity from row 0, the static space (every row of the
/// E x C blocks computed).
struct CaseRowSpace {
  cuda::ExpertRowSpace space;
  std::vector<int32_t> first, rows;
  bool isStatic = false;
  int64_t rowBound() const { return space.rowBound; }
  bool computed(int64_t r) const {
    for (size_t e = 0; e < rows.size(); ++e)
      if (r >= first[e] && r < first[e] + rows[e])
        return true;
    return false;
  }
};

std::vector<CaseRowSpace> caseRowSpaces(const GemmCase &tc, Segments &seg) {
  std::vector<CaseRowSpace> spaces;
  spaces.push_back({seg.space(), seg.offsets, seg.rows, false});
  if (tc.capacity > 0 && tc.base == 0) {
    CaseRowSpace fixed = spaces.front();
    fixed.isStatic = true;
    fixed.space.staticCapacity = tc.capacity;
    fixed.space.rowBound = seg.experts() * tc.capacity;
    for (int32_t &rows : fixed.rows)
      rows = static_cast<int32_t>(tc.capacity);
    spaces.push_back(fixed);
  }
  return spaces;
}

/// act'(x) in fp64 (GELU's exact erf form).
double activationDerivative64(Activation act, double x) {
  switch (act) {
  case Activation::Relu:
    return x > 0 ? 1.0 : 0.0;
  case Activation::Gelu:
    return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) +
           x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
  case Activation::Silu: {
    const double s = 1.0 / (1.0 + std::exp(-x));
    return s * (1.0 + x * (1.0 - s));
  }
  }
  return 0.0;
}

// grouped_gemm_activation_backward on every path (auto and device: the
// wgmma kernel's store on Hopper where it applies; cublas: the GEMM and the
// pass), static and dynamic row spaces, b transposed (fc2's input
// gradient) or not: near fp64's (a @ b) * act'(pre), bit for bit the GEMM
// on the same engine followed by activationBackward, rows outside the
// segments untouched on the device paths.
TEST_P(CudaDeviceGemm, ActivationBackwardMatchesTheUnfusedStepsAndFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), k = tc.k, n = tc.n;
  std::mt19937_64 rng(29 + k + 5 * n);
  for (const CaseRowSpace &rs : caseRowSpaces(tc, seg)) {
    const cuda::ExpertRowSpace &space = rs.space;
    const std::vector<int32_t> &first = rs.first, &rows = rs.rows;
    const bool isStatic = rs.isStatic;
    const int64_t R = rs.rowBound();
    auto computed = [&](int64_t r) { return rs.computed(r); };
    for (DType dt : {DType::BF16, DType::F16})
      for (bool transB : {true, false})
        for (Activation act :
             {Activation::Relu, Activation::Gelu, Activation::Silu}) {
          SCOPED_TRACE(std::string(toString(dt)) +
                       (isStatic ? " static" : " dynamic") +
                       (transB ? " b^T" : " b") + " activation " +
                       std::to_string(static_cast<int>(act)));
          Buffer a(dt, R * k), b(dt, E * k * n), pre(dt, R * n);
          a.set(normals(rng, R * k, 1.0));
          b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          pre.set(normals(rng, R * n, 1.5));
          std::vector<double> want(R * n, 0.0);
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = first[e]; r < first[e] + rows[e]; ++r)
              for (int64_t j = 0; j < n; ++j) {
                double sum = 0;
                for (int64_t i = 0; i < k; ++i)
                  sum += a.at(r * k + i) *
                         b.at(e * k * n + (transB ? j * k + i : i * n + j));
                want[r * n + j] =
                    sum * activationDerivative64(act, pre.at(r * n + j));
              }
          for (GroupedGemmPath path :
               {GroupedGemmPath::Auto, GroupedGemmPath::Device,
                GroupedGemmPath::Cublas}) {
            SCOPED_TRACE(pathName(path));
            Buffer c(dt, R * n), product(dt, R * n), c2(dt, R * n);
            for (Buffer *x : {&c, &product, &c2})
              x->poison();
            const std::vector<uint8_t> before = c.host;
            Status status = cuda::detail::groupedGemmActivationBackwardWith(
                *ctx, {a.device, dt}, {b.device, dt}, {pre.device, dt},
                {c.device, dt}, k, n, space, transB, act, path);
            ASSERT_TRUE(status.isOk()) << status.message();
            c.download();
            double diff = 0, norm = 0;
            for (int64_t r = 0; r < R; ++r)
              for (int64_t j = 0; computed(r) && j < n; ++j) {
                const double v = c.at(r * n + j), w = want[r * n + j];
                ASSERT_TRUE(std::isfinite(v)) << "row " << r;
                diff += (v - w) * (v - w);
                norm += w * w;
              }
            EXPECT_LE(std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30), 2e-2);
            // The unfused steps on the engine the fused step took.
            const bool onWgmma =
                fusesInStore(*ctx, path, space) &&
                cuda::detail::hopperGroupedGemmRuns(*ctx) &&
                cuda::detail::hopperGroupedGemmApplies(
                    *ctx, dt, k, n, space,
                    {a.device, b.device, c.device, pre.device});
            // (Off the wgmma kernel the GEMM's path may compute a padded
            // layout's padding rows.)
            if (onWgmma && !isStatic) {
              ASSERT_EQ(firstRowWritten(c, before, R, n, computed), -1)
                  << "a row outside the segments was written";
            }
            ASSERT_TRUE(productOnTheEngineOf(*ctx, a, b, product, dt, k, n,
                                             space, transB, path, onWgmma)
                            .isOk());
            ASSERT_TRUE(cuda::activationBackward(*ctx, {pre.device, dt},
                                                 {product.device, dt},
                                                 {c2.device, dt}, n, space, act)
                            .isOk());
            c2.download();
            ASSERT_EQ(firstRowDiffering(c, c2, R, n, computed), -1)
                << "differs from the GEMM and activation_backward"
                << (onWgmma ? " (wgmma)" : "");
          }
        }
  }
  // c over one of its inputs is refused, not computed into garbage.
  Buffer a(DType::BF16, seg.rowBound * k), b(DType::BF16, E * k * n),
      pre(DType::BF16, seg.rowBound * n);
  Status status = cuda::groupedGemmActivationBackward(
      *ctx, {a.device, DType::BF16}, {b.device, DType::BF16},
      {pre.device, DType::BF16}, {pre.device, DType::BF16}, k, n, seg.space(),
      true, Activation::Relu);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
}

// grouped_gemm_glu_backward on every path, static and dynamic row spaces,
// b transposed or not: near fp64's gradients of silu(gate) * up at
// d = a @ b, bit for bit the GEMM on the same engine followed by
// gluBackward, rows outside the segments untouched on the wgmma kernel.
TEST_P(CudaDeviceGemm, GluBackwardMatchesTheUnfusedStepsAndFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GemmCase &tc = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(tc.counts, tc.capacity, tc.base);
  const int64_t E = seg.experts(), k = tc.k, n = tc.n;
  std::mt19937_64 rng(31 + k + 7 * n);
  for (const CaseRowSpace &rs : caseRowSpaces(tc, seg)) {
    const cuda::ExpertRowSpace &space = rs.space;
    const std::vector<int32_t> &first = rs.first, &rows = rs.rows;
    const bool isStatic = rs.isStatic;
    const int64_t R = rs.rowBound();
    auto computed = [&](int64_t r) { return rs.computed(r); };
    for (DType dt : {DType::BF16, DType::F16})
      for (bool transB : {true, false}) {
        SCOPED_TRACE(std::string(toString(dt)) +
                     (isStatic ? " static" : " dynamic") +
                     (transB ? " b^T" : " b"));
        Buffer a(dt, R * k), b(dt, E * k * n), gate(dt, R * n), up(dt, R * n);
        a.set(normals(rng, R * k, 1.0));
        b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
        gate.set(normals(rng, R * n, 1.5));
        up.set(normals(rng, R * n, 1.0));
        std::vector<double> wantGate(R * n, 0.0), wantUp(R * n, 0.0);
        for (int64_t e = 0; e < E; ++e)
          for (int64_t r = first[e]; r < first[e] + rows[e]; ++r)
            for (int64_t j = 0; j < n; ++j) {
              double d = 0;
              for (int64_t i = 0; i < k; ++i)
                d += a.at(r * k + i) *
                     b.at(e * k * n + (transB ? j * k + i : i * n + j));
              const double x = gate.at(r * n + j),
                           s = 1.0 / (1.0 + std::exp(-x));
              wantGate[r * n + j] =
                  d * up.at(r * n + j) * s * (1.0 + x * (1.0 - s));
              wantUp[r * n + j] = d * x * s;
            }
        auto error = [&](const Buffer &got,
                         const std::vector<double> &want) -> double {
          double diff = 0, norm = 0;
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; computed(r) && j < n; ++j) {
              const double v = got.at(r * n + j), w = want[r * n + j];
              if (!std::isfinite(v))
                return INFINITY;
              diff += (v - w) * (v - w);
              norm += w * w;
            }
          return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
        };
        for (GroupedGemmPath path :
             {GroupedGemmPath::Auto, GroupedGemmPath::Device,
              GroupedGemmPath::Cublas}) {
          SCOPED_TRACE(pathName(path));
          Buffer gradGate(dt, R * n), gradUp(dt, R * n), product(dt, R * n),
              gradGate2(dt, R * n), gradUp2(dt, R * n);
          for (Buffer *x : {&gradGate, &gradUp, &product, &gradGate2, &gradUp2})
            x->poison();
          const std::vector<uint8_t> before = gradGate.host;
          Status status = cuda::detail::groupedGemmGluBackwardWith(
              *ctx, {a.device, dt}, {b.device, dt}, {gate.device, dt},
              {up.device, dt}, {gradGate.device, dt}, {gradUp.device, dt}, k, n,
              space, transB, path);
          ASSERT_TRUE(status.isOk()) << status.message();
          gradGate.download();
          gradUp.download();
          EXPECT_LE(error(gradGate, wantGate), 2e-2);
          EXPECT_LE(error(gradUp, wantUp), 2e-2);
          const bool onWgmma = fusesInStore(*ctx, path, space) &&
                               cuda::detail::hopperGroupedGemmRuns(*ctx) &&
                               cuda::detail::hopperGroupedGemmApplies(
                                   *ctx, dt, k, n, space,
                                   {a.device, b.device, gradGate.device,
                                    gradUp.device, gate.device, up.device});
          if (onWgmma && !isStatic) {
            ASSERT_EQ(firstRowWritten(gradGate, before, R, n, computed), -1)
                << "a row outside the segments was written";
          }
          ASSERT_TRUE(productOnTheEngineOf(*ctx, a, b, product, dt, k, n, space,
                                           transB, path, onWgmma)
                          .isOk());
          ASSERT_TRUE(cuda::gluBackward(*ctx, {gate.device, dt},
                                        {up.device, dt}, {product.device, dt},
                                        {gradGate2.device, dt},
                                        {gradUp2.device, dt}, n, space)
                          .isOk());
          gradGate2.download();
          gradUp2.download();
          ASSERT_EQ(firstRowDiffering(gradGate, gradGate2, R, n, computed), -1)
              << "grad_gate_in differs" << (onWgmma ? " (wgmma)" : "");
          ASSERT_EQ(firstRowDiffering(gradUp, gradUp2, R, n, computed), -1)
              << "grad_up_in differs" << (onWgmma ? " (wgmma)" : "");
        }
      }
  }
}

// A fixed capacity's ReLU in cuBLASLt's epilogue (relu_in_gemm on, the
// automatic path; the explicit cuBLAS path keeps the GEMM and the epilogue
// kernel): both equal
// relu of the fp64 product, every row of the E x C blocks written, also
// where a and c start one row into their buffers (a pipelined chunk's
// shifted rows: less than cuBLASLt's default 256-byte alignment).
TEST(CudaStaticGemm, ReluInTheGemmMatchesTheEpilogueKernelAndFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  ctx->reluInGemm = true;
  std::mt19937_64 rng(31);
  for (auto [E, C, k, n] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t>{4, 96, 72, 136},
        {3, 17, 40, 24},
        {8, 256, 128, 64}})
    for (DType dt : {DType::BF16, DType::F16, DType::F32})
      for (bool transB : {false, true})
        for (int64_t shift : {0, 1}) {
          SCOPED_TRACE(std::string(toString(dt)) + (transB ? " b^T" : " b") +
                       " E " + std::to_string(E) + " C " + std::to_string(C) +
                       " shifted by " + std::to_string(shift) + " row");
          const int64_t R = E * C;
          const size_t size = dtypeSize(dt);
          Buffer a(dt, (R + shift) * k), b(dt, E * k * n);
          a.set(normals(rng, (R + shift) * k, 1.0));
          b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          std::vector<double> want(R * n);
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = e * C; r < (e + 1) * C; ++r)
              for (int64_t j = 0; j < n; ++j) {
                double sum = 0;
                for (int64_t i = 0; i < k; ++i)
                  sum += a.at((r + shift) * k + i) *
                         b.at(e * k * n + (transB ? j * k + i : i * n + j));
                want[r * n + j] = std::max(sum, 0.0);
              }
          cuda::ExpertRowSpace space;
          space.experts = E;
          space.rowBound = R;
          space.staticCapacity = C;
          GroupedGemmOptions options;
          options.transB = transB;
          options.epilogue = Epilogue::Relu;
          for (GroupedGemmPath path :
               {GroupedGemmPath::Auto, GroupedGemmPath::Cublas}) {
            SCOPED_TRACE(pathName(path));
            Buffer c(dt, (R + shift) * n);
            c.poison();
            Status status = cuda::detail::groupedGemmWith(
                *ctx, {static_cast<char *>(a.device) + shift * k * size, dt},
                {b.device, dt}, {},
                {static_cast<char *>(c.device) + shift * n * size, dt}, k, n,
                space, options, {}, path);
            ASSERT_TRUE(status.isOk()) << status.message();
            c.download();
            double diff = 0, norm = 0;
            for (int64_t i = 0; i < R * n; ++i) {
              const double got = c.at(shift * n + i);
              ASSERT_GE(got, 0.0) << "element " << i << " is not relu'd";
              diff += (got - want[i]) * (got - want[i]);
              norm += want[i] * want[i];
            }
            EXPECT_LE(std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30),
                      dt == DType::F32 ? 1e-5 : 1e-2);
          }
        }
}

// A NaN in a row of A stays NaN through the ReLU on every path, as the CPU
// keeps it (NaN propagates as in PyTorch): a ReLU that clipped it to 0 would
// hide a diverging layer. cuBLASLt documents its ReLU epilogue as max(x, 0),
// so relu_in_gemm (on by default) is checked here too, on a small and a
// C3-sized block (its algorithm may differ by shape).
TEST(CudaStaticGemm, ReluKeepsNaNOnEveryPath) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  EXPECT_TRUE(ctx->reluInGemm); // the default
  std::mt19937_64 rng(37);
  for (auto [E, C, k, n] : {std::array<int64_t, 4>{4, 64, 72, 136},
                            std::array<int64_t, 4>{8, 256, 2048, 1408}})
    for (DType dt : {DType::BF16, DType::F16}) {
      const int64_t R = E * C;
      SCOPED_TRACE(std::string(toString(dt)) + " k " + std::to_string(k));
      Buffer a(dt, R * k), b(dt, E * k * n);
      std::vector<double> values = normals(rng, R * k, 1.0);
      values[5 * k + 3] = std::nan(""); // row 5 of expert 0
      a.set(values);
      b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      cuda::ExpertRowSpace space;
      space.experts = E;
      space.rowBound = R;
      space.staticCapacity = C;
      GroupedGemmOptions options;
      options.epilogue = Epilogue::Relu;
      for (bool reluInGemm : {true, false})
        for (GroupedGemmPath path :
             {GroupedGemmPath::Auto, GroupedGemmPath::Cublas}) {
          SCOPED_TRACE(std::string(pathName(path)) +
                       (reluInGemm ? " relu_in_gemm" : ""));
          ctx->reluInGemm = reluInGemm;
          Buffer c(dt, R * n);
          c.poison();
          ASSERT_TRUE(cuda::detail::groupedGemmWith(
                          *ctx, {a.device, dt}, {b.device, dt}, {},
                          {c.device, dt}, k, n, space, options, {}, path)
                          .isOk());
          c.download();
          for (int64_t j = 0; j < n; ++j)
            ASSERT_TRUE(std::isnan(c.at(5 * n + j))) << "column " << j;
          for (int64_t j = 0; j < n; ++j)
            ASSERT_FALSE(std::isnan(c.at(6 * n + j))) << "column " << j;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDeviceGemm,
                         ::testing::ValuesIn(gemmCases()),
                         [](const auto &info) { return info.param.name; });

// Every CTA tile (the automatic choice takes small or large; the wide one
// only the benchmark) computes the same product.
TEST(CudaDeviceGemmTiles, EveryTileMatchesFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg({70, 0, 300, 5, 129}, 0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 200, n = 264;
  std::mt19937_64 rng(29);
  const DType dt = DType::BF16;
  Buffer a(dt, R * k), b(dt, E * k * n), c(dt, R * n);
  a.set(normals(rng, R * k, 1.0));
  b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
  for (bool transB : {false, true}) {
    std::vector<double> want =
        referenceForward(a, b, c, seg, k, n, transB, false);
    for (auto tiles :
         {cuda::detail::DeviceTiles::Small, cuda::detail::DeviceTiles::Large,
          cuda::detail::DeviceTiles::Wide}) {
      SCOPED_TRACE(std::string(transB ? "b^T" : "b") + " tile " +
                   std::to_string(static_cast<int>(tiles)));
      c.poison();
      Status status = cuda::detail::deviceGroupedGemm(
          *ctx, a.device, b.device, c.device, dt, k, n, seg.space(), transB,
          false, tiles);
      ASSERT_TRUE(status.isOk()) << status.message();
      c.download();
      EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
    }
  }
}

/// The wgmma kernel's tests: a context on a device that runs the kernel
/// (compute capability 9.0 and the sm_90a part), else skipped with the
/// reason.
class CudaHopperGemm : public ::testing::Test {
protected:
  void SetUp() override {
    FLEX_SKIP_WITHOUT_CUDA();
    ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
    std::string why;
    if (!cuda::detail::hopperGroupedGemmRuns(*ctx, &why))
      GTEST_SKIP() << why;
  }
  std::unique_ptr<cuda::KernelContext> ctx;
};

/// The forward's wgmma tiles.
constexpr std::array<cuda::detail::DeviceTiles, 4> kHopperForwardTiles = {
    cuda::detail::DeviceTiles::HopperCooperative,
    cuda::detail::DeviceTiles::HopperWide,
    cuda::detail::DeviceTiles::HopperPingPong,
    cuda::detail::DeviceTiles::HopperWidePair};

// The wgmma kernel (sm_90a) on each of its tiles, both B layouts, both
// dtypes, accumulating or not, on a ragged row space (empty experts, partial
// M tiles, K past the stages' ring, N not a multiple of the tile) and on a
// static one (a fixed capacity: offsets unused). Rows outside the segments
// keep their bytes.
TEST_F(CudaHopperGemm, EveryTileAndLayoutMatchesFp64) {
  std::mt19937_64 rng(41);
  struct Layout {
    const char *name;
    std::vector<int32_t> counts;
    int64_t capacity, k, n;
    bool isStatic;
  };
  const std::vector<Layout> layouts = {
      {"ragged", {70, 0, 300, 5, 129, 0, 260}, 0, 392, 264, false},
      {"static", {96, 96, 96}, 96, 136, 320, true},
  };
  for (const Layout &l : layouts) {
    Segments seg(l.counts, l.capacity);
    const int64_t E = seg.experts(), R = seg.rowBound, k = l.k, n = l.n;
    cuda::ExpertRowSpace space = seg.space();
    if (l.isStatic)
      space.staticCapacity = l.capacity;
    for (auto tiles : kHopperForwardTiles)
      for (DType dt : {DType::BF16, DType::F16})
        for (bool transB : {false, true})
          for (bool accumulate : {false, true}) {
            SCOPED_TRACE(std::string(l.name) + " " + std::string(toString(dt)) +
                         (transB ? " b^T" : " b") +
                         (accumulate ? " accumulate" : "") + " tile " +
                         std::to_string(static_cast<int>(tiles)));
            Buffer a(dt, R * k), b(dt, E * k * n), c(dt, R * n);
            a.set(normals(rng, R * k, 1.0));
            b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
            if (accumulate)
              c.set(normals(rng, R * n, 1.0));
            else
              c.poison();
            std::vector<uint8_t> before = c.host;
            std::vector<double> want =
                referenceForward(a, b, c, seg, k, n, transB, accumulate);
            Status status = cuda::detail::deviceGroupedGemm(
                *ctx, a.device, b.device, c.device, dt, k, n, space, transB,
                accumulate, tiles);
            ASSERT_TRUE(status.isOk()) << status.message();
            c.download();
            EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
            ASSERT_EQ(
                firstRowWritten(c, before, R, n,
                                [&](int64_t r) { return seg.inSegment(r); }),
                -1)
                << "a row outside the segments was written";
          }
  }
}

// The wgmma weight gradient reduces each expert's rows in blocks of 64; a
// block past the expert's last row holds the next expert's rows, which it
// must not add: a NaN or Inf there stays out of this expert's gradient
// (zeros in both operands, not in one). Each tile, accumulating or not, on
// 16 experts (empty ones, counts not multiples of 64, one of 300 rows: more
// blocks than stages), k = 264 (three 128-row tiles: a cluster's second
// CTA past k) and n = 520: more tiles than SMs, so CTAs and clusters take
// several. An expert without rows gets zeros, or keeps its gradient when
// accumulating.
TEST_F(CudaHopperGemm, WeightGradientKeepsTheNextExpertsRowsOut) {
  Segments seg({70, 0, 129, 5, 300, 17, 64, 0, 200, 1, 90, 33, 260, 0, 7, 128},
               0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 264, n = 520;
  std::mt19937_64 rng(43);
  for (DType dt : {DType::BF16, DType::F16}) {
    Buffer a(dt, R * k), gradC(dt, R * n), gradB(dt, E * k * n);
    std::vector<double> av = normals(rng, R * k, 1.0),
                        gv = normals(rng, R * n, 1.0),
                        initial = normals(rng, E * k * n, 4.0);
    // Expert 2's first row (right after expert 0's 70: expert 1 is empty)
    // holds Inf in A and NaN in gradC.
    av[70 * k + 3] = INFINITY;
    gv[70 * n + 5] = std::nan("");
    a.set(av);
    gradC.set(gv);
    // The fp64 gradients of every expert but 2.
    std::vector<double> want(E * k * n, 0.0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = seg.offsets[e];
           e != 2 && r < seg.offsets[e] + seg.rows[e]; ++r)
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < n; ++j)
            want[(e * k + i) * n + j] += a.at(r * k + i) * gradC.at(r * n + j);
    for (auto tiles : kHopperForwardTiles)
      for (bool accumulate : {false, true}) {
        SCOPED_TRACE(std::string(toString(dt)) + " tile " +
                     std::to_string(static_cast<int>(tiles)) +
                     (accumulate ? " accumulate" : ""));
        if (accumulate)
          gradB.set(initial);
        else
          gradB.poison();
        std::vector<double> start(E * k * n, 0.0);
        if (accumulate)
          for (int64_t i = 0; i < E * k * n; ++i)
            start[i] = gradB.at(i); // the initial values as stored
        ASSERT_TRUE(cuda::detail::deviceGroupedGemmWgrad(
                        *ctx, a.device, gradC.device, gradB.device, dt, k, n,
                        seg.space(), accumulate, {}, tiles)
                        .isOk());
        gradB.download();
        for (int64_t e = 0; e < E; ++e) {
          if (e == 2)
            continue;
          double diff = 0, norm = 0;
          for (int64_t i = 0; i < k * n; ++i) {
            const int64_t at = e * k * n + i;
            const double got = gradB.at(at), expect = start[at] + want[at];
            ASSERT_TRUE(std::isfinite(got))
                << "expert " << e << " element " << i
                << " took another expert's rows";
            if (seg.rows[e] == 0) {
              ASSERT_EQ(got, start[at])
                  << "expert " << e << " (no rows) element " << i;
              continue;
            }
            diff += (got - expect) * (got - expect);
            norm += expect * expect;
          }
          if (seg.rows[e] > 0) {
            EXPECT_LE(std::sqrt(diff / norm), 1e-2) << "expert " << e;
          }
        }
      }
  }
}

// The weight gradient on each wgmma tile over 70 experts (runs of empty
// ones, one across the warp scan's lanes 31/32), k = 392 (a last M tile of
// 8 rows) and n = 136 (a last N tile of 8 columns), accumulating or not,
// against fp64; an expert without rows gets zeros, or keeps its gradient.
// One tile per test, so a kernel that traps leaves the others' results.
class CudaHopperWgradTiles
    : public ::testing::TestWithParam<cuda::detail::DeviceTiles> {};

TEST_P(CudaHopperWgradTiles, ManyExpertsMatchFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::string why;
  if (!cuda::detail::hopperGroupedGemmRuns(*ctx, &why))
    GTEST_SKIP() << why;
  Segments seg(manyExpertCounts(), 0);
  const int64_t E = seg.experts(), k = 392, n = 136;
  std::mt19937_64 rng(61);
  for (DType dt : {DType::BF16, DType::F16})
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(std::string(toString(dt)) +
                   (accumulate ? " accumulate" : ""));
      WgradOperands ops(dt, seg, k, n, accumulate, rng);
      Buffer &gradB = ops.gradB;
      const std::vector<double> &want = ops.want;
      Status status = cuda::detail::deviceGroupedGemmWgrad(
          *ctx, ops.a.device, ops.gradC.device, gradB.device, dt, k, n,
          seg.space(), accumulate, {}, GetParam());
      ASSERT_TRUE(status.isOk()) << status.message();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      gradB.download();
      EXPECT_LE(bufferError(gradB, want), 1e-2);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; seg.rows[e] == 0 && i < k * n; ++i)
          ASSERT_EQ(gradB.at(e * k * n + i), want[e * k * n + i])
              << "expert " << e << " (no rows) element " << i;
    }
}

INSTANTIATE_TEST_SUITE_P(
    Tiles, CudaHopperWgradTiles, ::testing::ValuesIn(kHopperForwardTiles),
    [](const ::testing::TestParamInfo<cuda::detail::DeviceTiles> &info) {
      switch (info.param) {
      case cuda::detail::DeviceTiles::HopperCooperative:
        return std::string("cooperative");
      case cuda::detail::DeviceTiles::HopperWide:
        return std::string("wide");
      case cuda::detail::DeviceTiles::HopperPingPong:
        return std::string("ping_pong");
      default:
        return std::string("wide_pair");
      }
    });

// The activation's backward in the wgmma kernel's store (fc2's input
// gradient, b^T, fused with activation_backward): every tile, dtype and
// activation, on the ragged row space; grad_pre bit for bit the product of
// the form a fused store runs whatever tile is asked (kFusedStoreForm)
// followed by activationBackward, rows outside the segments
// untouched. The mma.sync kernel refuses it.
TEST_F(CudaHopperGemm, ActivationBackwardInTheStoreMatchesThePass) {
  std::mt19937_64 rng(53);
  Segments seg({70, 0, 300, 5, 129, 0, 260}, 0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 200, n = 264;
  auto inside = [&](int64_t r) { return seg.inSegment(r); };
  for (DType dt : {DType::BF16, DType::F16}) {
    // gradY [R, k] @ w2[e]^T (w2 [E, n, k]) -> grad_hidden [R, n].
    Buffer a(dt, R * k), b(dt, E * n * k), pre(dt, R * n);
    a.set(normals(rng, R * k, 1.0));
    b.set(normals(rng, E * n * k, 1.0 / std::sqrt(k)));
    pre.set(normals(rng, R * n, 1.5));
    for (auto tiles : kHopperForwardTiles)
      for (Activation act :
           {Activation::Relu, Activation::Gelu, Activation::Silu}) {
        SCOPED_TRACE(std::string(toString(dt)) + " tile " +
                     std::to_string(static_cast<int>(tiles)) + " activation " +
                     std::to_string(static_cast<int>(act)));
        Buffer c(dt, R * n), product(dt, R * n), c2(dt, R * n);
        for (Buffer *x : {&c, &product, &c2})
          x->poison();
        const std::vector<uint8_t> before = c.host;
        cuda::detail::DeviceGemmEpilogue backward;
        backward.fused = true;
        backward.activationInput = pre.device;
        backward.derivative = act;
        ASSERT_TRUE(cuda::detail::deviceGroupedGemm(
                        *ctx, a.device, b.device, c.device, dt, k, n,
                        seg.space(), /*transB=*/true, false, tiles, {},
                        backward)
                        .isOk());
        ASSERT_TRUE(cuda::detail::deviceGroupedGemm(
                        *ctx, a.device, b.device, product.device, dt, k, n,
                        seg.space(), true, false, kFusedStoreForm)
                        .isOk());
        ASSERT_TRUE(cuda::activationBackward(
                        *ctx, {pre.device, dt}, {product.device, dt},
                        {c2.device, dt}, n, seg.space(), act)
                        .isOk());
        c.download();
        c2.download();
        ASSERT_EQ(firstRowWritten(c, before, R, n, inside), -1)
            << "a row outside the segments was written";
        ASSERT_EQ(firstRowDiffering(c, c2, R, n, inside), -1)
            << "differs from activation_backward's";
      }
    cuda::detail::DeviceGemmEpilogue backward;
    backward.fused = true;
    backward.activationInput = pre.device;
    Buffer c(dt, R * n);
    Status status = cuda::detail::deviceGroupedGemm(
        *ctx, a.device, b.device, c.device, dt, k, n, seg.space(), true, false,
        cuda::detail::DeviceTiles::Small, {}, backward);
    EXPECT_EQ(status.code(), StatusCode::Internal);
    EXPECT_NE(status.message().find("wgmma kernel only"), std::string::npos)
        << status.message();
  }
}

// The GLU step on each wgmma tile (64 + 64, 128 + 128 and the 2-CTA
// cluster's), both dtypes, on a ragged row space whose groups end in the
// first or the second CTA of a cluster's tile: c, gate and up bit for bit
// the wgmma kernel's two GEMMs and the glu kernel, c near fp64's
// silu(a b_gate) * (a b_up), rows outside the segments untouched.
TEST_F(CudaHopperGemm, GluTilesMatchTheUnfusedSteps) {
  std::mt19937_64 rng(43);
  Segments seg({70, 0, 300, 5, 129, 0, 260}, 0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 328, n = 200;
  for (auto tiles : kHopperForwardTiles)
    for (DType dt : {DType::BF16, DType::F16}) {
      SCOPED_TRACE(std::string(toString(dt)) + " tile " +
                   std::to_string(static_cast<int>(tiles)));
      Buffer a(dt, R * k), bGate(dt, E * k * n), bUp(dt, E * k * n);
      a.set(normals(rng, R * k, 1.0));
      bGate.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      bUp.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      Buffer c(dt, R * n), gate(dt, R * n), up(dt, R * n);
      c.poison();
      gate.poison();
      up.poison();
      const std::vector<uint8_t> before = c.host;
      Status status = cuda::detail::deviceGroupedGemmGlu(
          *ctx, a.device, bGate.device, bUp.device, c.device, gate.device,
          up.device, dt, k, n, seg.space(), {}, tiles);
      ASSERT_TRUE(status.isOk()) << status.message();
      c.download();
      gate.download();
      up.download();
      ASSERT_EQ(firstRowWritten(c, before, R, n,
                                [&](int64_t r) { return seg.inSegment(r); }),
                -1)
          << "a row outside the segments was written";
      // The unfused steps: the wgmma kernel's GEMMs (its default tile) and
      // the glu kernel.
      Buffer g(dt, R * n), u(dt, R * n), c2(dt, R * n);
      for (auto [b, out] : {std::pair{&bGate, &g}, std::pair{&bUp, &u}})
        ASSERT_TRUE(cuda::detail::deviceGroupedGemm(
                        *ctx, a.device, b->device, out->device, dt, k, n,
                        seg.space(), false, false,
                        cuda::detail::DeviceTiles::Hopper)
                        .isOk());
      ASSERT_TRUE(cuda::glu(*ctx, {g.device, dt}, {u.device, dt},
                            {c2.device, dt}, n, seg.space())
                      .isOk());
      c2.download();
      g.download();
      u.download();
      auto inside = [&](int64_t r) { return seg.inSegment(r); };
      for (const auto &[have, wantBytes] :
           {std::pair{&c, &c2}, std::pair{&gate, &g}, std::pair{&up, &u}})
        ASSERT_EQ(firstRowDiffering(*have, *wantBytes, R, n, inside), -1)
            << "the fused step differs from the unfused ones";
      std::vector<double> want(R * n, 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t r = seg.offsets[e]; r < seg.offsets[e] + seg.rows[e];
             ++r) {
          for (int64_t j = 0; j < n; ++j) {
            double sg = 0, su = 0;
            for (int64_t i = 0; i < k; ++i) {
              sg += a.at(r * k + i) * bGate.at((e * k + i) * n + j);
              su += a.at(r * k + i) * bUp.at((e * k + i) * n + j);
            }
            want[r * n + j] = sg / (1.0 + std::exp(-sg)) * su;
          }
        }
      EXPECT_LE(segmentError(c, want, seg, n), 2e-2);
    }
}

// The wgmma kernel refuses what it cannot run (a gathered A with [N][K]
// weights, which no plan asks for; the few-rows tile's fused epilogue) with
// a clear status instead of a wrong product.
TEST_F(CudaHopperGemm, RefusesWhatItCannotRun) {
  Segments seg({130, 7}, 0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 64, n = 128;
  const DType dt = DType::BF16;
  Buffer a(dt, R * k), b(dt, E * k * n), c(dt, R * n), tokens(DType::I32, R);
  RowGather gather;
  gather.rowTokens = tokens.as<int32_t>();
  gather.tokens = R;
  Status status = cuda::detail::deviceGroupedGemm(
      *ctx, a.device, b.device, c.device, dt, k, n, seg.space(),
      /*transB=*/true, false, cuda::detail::DeviceTiles::Hopper, gather);
  EXPECT_FALSE(status.isOk());
  EXPECT_NE(status.message().find("gathers A for [K][N] weights only"),
            std::string::npos)
      << status.message();
  // A fused epilogue: the wgmma kernel has it, the large mma.sync tile not
  // (it would store the bare product).
  cuda::detail::DeviceGemmEpilogue fused;
  fused.fused = true;
  fused.epilogue = Epilogue::Relu;
  status = cuda::detail::deviceGroupedGemm(
      *ctx, a.device, b.device, c.device, dt, k, n, seg.space(), false, false,
      cuda::detail::DeviceTiles::Large, {}, fused);
  EXPECT_EQ(status.code(), StatusCode::Internal);
  EXPECT_NE(status.message().find("few-rows tile only"), std::string::npos)
      << status.message();
  status = cuda::detail::deviceGroupedGemm(
      *ctx, a.device, b.device, c.device, dt, k, n, seg.space(), false,
      /*accumulate=*/true, cuda::detail::DeviceTiles::Hopper, {}, fused);
  EXPECT_FALSE(status.isOk());
}

// The bias, `pre` and activation in the wgmma kernel's store, on each tile
// and dtype, every activation, with and without bias and pre, on a ragged
// row space (empty groups, groups ending in a cluster's first CTA): c and
// pre bit for bit the product of the form a fused store runs whatever tile
// is asked (kFusedStoreForm) followed by the epilogue pass
// (applyGemmEpilogue), rows outside the segments untouched.
TEST_F(CudaHopperGemm, FusedEpilogueMatchesTheEpiloguePass) {
  std::mt19937_64 rng(47);
  Segments seg({70, 0, 300, 5, 129, 0, 260}, 0);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 200, n = 264;
  auto inside = [&](int64_t r) { return seg.inSegment(r); };
  for (auto tiles : kHopperForwardTiles)
    for (DType dt : {DType::BF16, DType::F16}) {
      Buffer a(dt, R * k), b(dt, E * k * n), bias(dt, E * n);
      a.set(normals(rng, R * k, 1.0));
      b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
      bias.set(normals(rng, E * n, 0.5));
      for (Epilogue epilogue :
           {Epilogue::None, Epilogue::Relu, Epilogue::Gelu, Epilogue::Silu})
        for (bool withBias : {false, true})
          for (bool withPre : {false, true}) {
            SCOPED_TRACE(std::string(toString(dt)) + " tile " +
                         std::to_string(static_cast<int>(tiles)) +
                         " epilogue " +
                         std::to_string(static_cast<int>(epilogue)) +
                         (withBias ? " bias" : "") + (withPre ? " pre" : ""));
            Buffer c(dt, R * n), pre(dt, R * n), c2(dt, R * n), pre2(dt, R * n);
            for (Buffer *x : {&c, &pre, &c2, &pre2})
              x->poison();
            const std::vector<uint8_t> before = c.host, preBefore = pre.host;
            cuda::detail::DeviceGemmEpilogue fused{
                true, withBias ? bias.device : nullptr,
                withPre ? pre.device : nullptr, epilogue, 0.75f};
            Status status = cuda::detail::deviceGroupedGemm(
                *ctx, a.device, b.device, c.device, dt, k, n, seg.space(),
                false, false, tiles, {}, fused);
            ASSERT_TRUE(status.isOk()) << status.message();
            // The bare product (into pre2) of the form a fused store runs,
            // then the pass.
            ASSERT_TRUE(cuda::detail::deviceGroupedGemm(
                            *ctx, a.device, b.device, pre2.device, dt, k, n,
                            seg.space(), false, false, kFusedStoreForm)
                            .isOk());
            ASSERT_TRUE(
                cuda::applyGemmEpilogue(*ctx, pre2.device,
                                        withBias ? ReadBuffer{bias.device, dt}
                                                 : ReadBuffer{},
                                        {pre2.device, dt}, {c2.device, dt}, n,
                                        seg.space(), epilogue, 0.75f)
                    .isOk());
            for (Buffer *x : {&c, &pre, &c2, &pre2})
              x->download();
            ASSERT_EQ(firstRowWritten(c, before, R, n, inside), -1)
                << "a row outside the segments was written";
            if (!withPre) {
              ASSERT_EQ(pre.host, preBefore) << "pre was written";
            }
            ASSERT_EQ(firstRowDiffering(c, c2, R, n, inside), -1)
                << "c differs from the epilogue pass's";
            if (withPre) {
              ASSERT_EQ(firstRowDiffering(pre, pre2, R, n, inside), -1)
                  << "pre differs from the epilogue pass's";
            }
          }
    }
}

// Counts that disagree with the buffer (a segment reaching past the
// declared rows) are clamped on the device: nothing past the buffer is
// written, and the rows inside still get their product.
TEST(CudaDeviceGemmTiles, CountsPastTheBufferAreClamped) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg({20, 30}, 0);
  const int64_t k = 64, n = 64, R = seg.rowBound; // 57 rows declared
  seg.rows = {20, 60};                            // 20 + 60 > 57
  seg.upload();
  const DType dt = DType::BF16;
  std::mt19937_64 rng(31);
  // One buffer with a guard region after the declared rows.
  const int64_t guardRows = 64;
  Buffer a(dt, (R + guardRows) * k), b(dt, 2 * k * n),
      c(dt, (R + guardRows) * n);
  a.set(normals(rng, (R + guardRows) * k, 1.0));
  b.set(normals(rng, 2 * k * n, 0.1));
  c.poison();
  std::vector<uint8_t> before = c.host;
  Status status = cuda::detail::deviceGroupedGemm(
      *ctx, a.device, b.device, c.device, dt, k, n, seg.space(), false, false,
      cuda::detail::DeviceTiles::Auto);
  ASSERT_TRUE(status.isOk()) << status.message();
  c.download();
  const size_t rowBytes = n * dtypeSize(dt);
  EXPECT_EQ(std::memcmp(c.host.data() + R * rowBytes,
                        before.data() + R * rowBytes, guardRows * rowBytes),
            0)
      << "rows past the declared buffer were written";
  Segments inside({20, static_cast<int32_t>(R - 20)}, 0);
  std::vector<double> want =
      referenceForward(a, b, c, inside, k, n, false, false);
  EXPECT_LE(segmentError(c, want, inside, n), 1e-2);
}

namespace {

/// One routing's segments: offsets [E + 1] and rows [E].
using SegmentRows = std::pair<std::vector<int32_t>, std::vector<int32_t>>;

/// Records cuda::groupedGemm over `seg`'s space (k x n experts, bf16) as a
/// CUDA graph on a fresh stream, after one eager call on `eagerPath` (as the
/// executor runs a pass before it records), then replays it for each of
/// `routings` (uploaded into seg's device buffers in place: the same bound)
/// and checks each replay's product against fp64.
void expectGraphReplays(cuda::KernelContext &ctx, Segments &seg, int64_t k,
                        int64_t n, GroupedGemmPath eagerPath, uint64_t seed,
                        const std::vector<SegmentRows> &routings) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_TRUE(ctx.setStream(stream).isOk());
  const DType dt = DType::BF16;
  const int64_t E = seg.experts(), R = seg.rowBound;
  std::mt19937_64 rng(seed);
  Buffer a(dt, R * k), b(dt, E * k * n), c(dt, R * n);
  a.set(normals(rng, R * k, 1.0));
  b.set(normals(rng, E * k * n, 0.1));
  c.poison();
  GroupedGemmOptions options;
  ASSERT_TRUE(cuda::detail::groupedGemmWith(ctx, {a.device, dt}, {b.device, dt},
                                            {}, {c.device, dt}, k, n,
                                            seg.space(), options, {}, eagerPath)
                  .isOk());
  ctx.capturing = true;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
            cudaSuccess);
  Status status = cuda::groupedGemm(ctx, {a.device, dt}, {b.device, dt}, {},
                                    {c.device, dt}, k, n, seg.space(), options);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ctx.capturing = false;
  ASSERT_TRUE(status.isOk()) << status.message();
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (const SegmentRows &routing : routings) {
    ASSERT_LE(routing.first.back(), R);
    seg.offsets = routing.first;
    seg.rows = routing.second;
    seg.upload();
    c.poison();
    std::vector<double> want =
        referenceForward(a, b, c, seg, k, n, false, false);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    c.download();
    EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  ASSERT_TRUE(ctx.setStream(nullptr).isOk());
  cudaStreamDestroy(stream);
}

} // namespace

// The sizes are read on the device: a graph recorded with one routing
// replays correctly after the counts change in place.
TEST(CudaDeviceGemmGraph, ReplaysWithNewCounts) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg({10, 64, 0, 33}, 64);
  // Auto takes the device kernel while a graph records.
  expectGraphReplays(
      *ctx, seg, 96, 80, GroupedGemmPath::Device, 3,
      {{seg.offsets, {10, 64, 0, 33}}, {seg.offsets, {0, 5, 64, 1}}});
}

/// Expert rows for the aligned layout's tests: an empty expert, one of
/// exactly one block, one of a block and a row, tails of 1 to 127 rows.
const std::vector<int32_t> kAlignedCounts = {200, 0, 129, 77, 1, 128, 3, 256};

// The aligned layout on cuBLAS: one batched call over 128-row blocks whose
// operands are found on the device (GroupedGemm.cu's alignedBlocksGemm),
// for every dtype, b and b^T, accumulating or not, on the paths that do not
// take the device kernel; fp64 agrees on every expert's rows, and nothing
// past the declared rows is written (guard rows after them keep their
// bytes). The weight gradient over the same space (per expert, its rows
// found from the aligned offsets) agrees too.
TEST(CudaAlignedGemm, BlocksMatchFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg(kAlignedCounts, 0, 0, kAlignedLayoutRows);
  const int64_t E = seg.experts(), R = seg.rowBound, k = 136, n = 264;
  const int64_t guard = 64;
  std::mt19937_64 rng(17);
  for (DType dt : {DType::BF16, DType::F16, DType::F32})
    for (bool transB : {false, true})
      for (bool accumulate : {false, true})
        for (GroupedGemmPath path :
             {GroupedGemmPath::Cublas, GroupedGemmPath::CublasGrouped}) {
          SCOPED_TRACE(std::string(toString(dt)) + (transB ? " b^T" : " b") +
                       (accumulate ? " accumulate" : "") + " " +
                       pathName(path));
          Buffer a(dt, R * k), b(dt, E * k * n), c(dt, (R + guard) * n);
          a.set(normals(rng, R * k, 1.0));
          b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
          if (accumulate)
            c.set(normals(rng, (R + guard) * n, 1.0));
          else
            c.poison();
          std::vector<double> want =
              referenceForward(a, b, c, seg, k, n, transB, accumulate);
          std::vector<uint8_t> before = c.host;
          GroupedGemmOptions options;
          options.transB = transB;
          options.accumulate = accumulate;
          Status status = cuda::detail::groupedGemmWith(
              *ctx, {a.device, dt}, {b.device, dt}, {}, {c.device, dt}, k, n,
              seg.space(), options, {}, path);
          ASSERT_TRUE(status.isOk()) << status.message();
          c.download();
          EXPECT_LE(segmentError(c, want, seg, n),
                    dt == DType::F32 ? 1e-5 : 1e-2);
          ASSERT_EQ(firstRowWritten(c, before, R + guard, n,
                                    [&](int64_t r) { return r < R; }),
                    -1)
              << "a row past the declared rows was written";
        }
  // A ReLU epilogue (the epilogue pass after the blocks) agrees with relu of
  // the fp64 product on both cuBLAS paths.
  for (DType dt : {DType::BF16, DType::F16})
    for (bool transB : {false, true})
      for (GroupedGemmPath path :
           {GroupedGemmPath::Cublas, GroupedGemmPath::CublasGrouped}) {
        SCOPED_TRACE(std::string(toString(dt)) + (transB ? " b^T" : " b") +
                     " relu " + pathName(path));
        Buffer a(dt, R * k), b(dt, E * k * n), c(dt, (R + guard) * n);
        a.set(normals(rng, R * k, 1.0));
        b.set(normals(rng, E * k * n, 1.0 / std::sqrt(k)));
        c.poison();
        std::vector<double> want =
            referenceForward(a, b, c, seg, k, n, transB, false);
        for (double &v : want)
          v = v > 0 ? v : 0.0;
        std::vector<uint8_t> before = c.host;
        GroupedGemmOptions options;
        options.transB = transB;
        options.epilogue = Epilogue::Relu;
        Status status = cuda::detail::groupedGemmWith(
            *ctx, {a.device, dt}, {b.device, dt}, {}, {c.device, dt}, k, n,
            seg.space(), options, {}, path);
        ASSERT_TRUE(status.isOk()) << status.message();
        c.download();
        EXPECT_LE(segmentError(c, want, seg, n), 1e-2);
        ASSERT_EQ(firstRowWritten(c, before, R + guard, n,
                                  [&](int64_t r) { return r < R; }),
                  -1)
            << "a row past the declared rows was written";
      }
  for (DType dt : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(std::string(toString(dt)) + " weight gradient");
    Buffer a(dt, R * k), gradC(dt, R * n), gradB(dt, E * k * n);
    a.set(normals(rng, R * k, 1.0));
    gradC.set(normals(rng, R * n, 1.0));
    gradB.poison();
    std::vector<double> want = referenceWgrad(a, gradC, seg, k, n);
    Status status = cuda::detail::groupedGemmWgradWith(
        *ctx, {a.device, dt}, {gradC.device, dt}, k, n, seg.space(),
        {gradB.device, dt}, {}, false, GroupedGemmPath::Cublas);
    ASSERT_TRUE(status.isOk()) << status.message();
    gradB.download();
    EXPECT_LE(bufferError(gradB, want), dt == DType::F32 ? 1e-5 : 1e-2);
  }
}

// The aligned layout's forward reads no count on the host: recorded in a
// CUDA graph on the cuBLAS path (a host read would fail the capture), the
// graph replays with other counts and offsets (same bound) and computes
// them.
TEST(CudaAlignedGemm, RecordsAndReplaysWithNewCounts) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  ctx->groupedGemm = GroupedGemmImpl::Cublas;
  Segments seg(kAlignedCounts, 0, 0, kAlignedLayoutRows);
  Segments other({0, 300, 5, 0, 250, 1, 0, 129}, 0, 0, kAlignedLayoutRows);
  expectGraphReplays(*ctx, seg, 96, 80, GroupedGemmPath::Cublas, 5,
                     {{seg.offsets, seg.rows}, {other.offsets, other.rows}});
}

// What the kernel does not take is refused with the reason, and the public
// entry point falls back to cuBLAS for it.
TEST(CudaDeviceGemmGraph, RefusesWhatItCannotRun) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  Segments seg({4, 2}, 0);
  cuda::ExpertRowSpace space = seg.space();
  Buffer a(DType::BF16, 64 * 64);
  std::string reason;
  EXPECT_FALSE(cuda::detail::deviceGroupedGemmApplies(
      *ctx, DType::F32, 64, 64, space, {a.device}, &reason));
  EXPECT_NE(reason.find("bf16 or f16"), std::string::npos) << reason;
  EXPECT_FALSE(cuda::detail::deviceGroupedGemmApplies(
      *ctx, DType::BF16, 12, 64, space, {a.device}, &reason));
  EXPECT_NE(reason.find("16-byte aligned"), std::string::npos) << reason;
  EXPECT_FALSE(cuda::detail::deviceGroupedGemmApplies(
      *ctx, DType::BF16, 64, 64, space, {static_cast<char *>(a.device) + 2},
      &reason));
  cuda::ExpertRowSpace fixed = space;
  fixed.staticCapacity = 4;
  EXPECT_FALSE(cuda::detail::deviceGroupedGemmApplies(
      *ctx, DType::BF16, 64, 64, fixed, {a.device}, &reason));
  EXPECT_NE(reason.find("static"), std::string::npos) << reason;
}

} // namespace
