//===- GemmBench.cpp - The grouped GEMM's implementations, side by side ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// flex-gemm-bench [--iters N] [--only NAME,...]: times, on the same card in one
// process, a grouped GEMM of a dynamic routing on its two paths - the
// device-sized kernel (DeviceGroupedGemm.cu) and the host-read counts with
// one cuBLAS GEMM per expert - beside them the host-read counts with one
// cublasGemmGroupedBatchedEx over the experts ("grouped", not taken by the
// runtime's auto yet), and, where every expert has the same rows,
// cuBLAS's strided-batched GEMM (what a static capacity runs). Shapes: the
// benchmark layers' fc1, fc2, input and weight gradients at their token
// counts (C1, C3, uniform, random and skewed) and decode-sized ones, where the
// floor is reading the touched experts' weights once at the copy bandwidth
// measured here. Each time is the median over N calls of host time from the
// call to the end of the stream (the cuBLAS path's host read included, as a
// layer pays it). The paths' outputs are compared (relative L2 <= 2e-2, else
// exit 1). glu1 rows time the gated first layer: the fused
// grouped_gemm_glu kernel against two GEMMs and the glu on each other path.
// Each timed configuration is an NVTX range named shape.op.config
// ("c3.fc1.batched", "c3.fc1.wgmma 128x256"), for ncu --nvtx-include.
//
//===----------------------------------------------------------------------===//

#include "Elementwise.h"
#include "GroupedGemmInternal.h"
#include "flex/Runtime/Core/Capacity.h"

#include "CudaBenchSupport.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace flex;
using flex::cuda::detail::GroupedGemmPath;

namespace {

using flex::bench::median;
#define CHECK_STATUS(expr)                                                     \
  do {                                                                         \
    Status s_ = (expr);                                                        \
    if (!s_) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__,                  \
                   s_.message().c_str());                                      \
      std::exit(2);                                                            \
    }                                                                          \
  } while (0)

enum class Op { Fc1, Fc2, Dgrad, Wgrad, Glu };
const char *opName(Op op) {
  switch (op) {
  case Op::Fc1:
    return "fc1";
  case Op::Fc2:
    return "fc2";
  case Op::Dgrad:
    return "dgrad1";
  case Op::Glu:
    return "glu1";
  default:
    return "wgrad1";
  }
}

/// How tokens pick experts: exactly even counts (a capacity layout's
/// blocks), every expert equally likely (sampled: a dropless layer's uneven
/// counts at balanced routing), or Zipf-like popularity ~ 1 / (e + 1).
enum class Routing { Even, Random, Skewed };

struct Shape {
  std::string name;
  int64_t tokens, d, h, experts, k;
  Routing routing;
  std::vector<Op> ops;
};

/// Rows per expert for T * k choices (few tokens are always sampled).
std::vector<int32_t> rowCounts(const Shape &s, std::mt19937_64 &rng) {
  std::vector<int32_t> rows(s.experts, 0);
  int64_t total = s.tokens * s.k;
  if (s.routing == Routing::Even && s.tokens >= 4096) {
    for (int64_t e = 0; e < s.experts; ++e)
      rows[e] = static_cast<int32_t>(total / s.experts +
                                     (e < total % s.experts ? 1 : 0));
    return rows;
  }
  std::vector<double> weights(s.experts);
  for (int64_t e = 0; e < s.experts; ++e)
    weights[e] = s.routing == Routing::Skewed ? 1.0 / (e + 1) : 1.0;
  std::discrete_distribution<int64_t> pick(weights.begin(), weights.end());
  for (int64_t t = 0; t < s.tokens; ++t) {
    // k distinct experts per token, as a top-k routing gives.
    std::vector<int64_t> chosen;
    while (static_cast<int64_t>(chosen.size()) < s.k) {
      int64_t e = pick(rng);
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end())
        chosen.push_back(e);
    }
    for (int64_t e : chosen)
      ++rows[e];
  }
  return rows;
}

struct DeviceArray {
  void *data = nullptr;
  explicit DeviceArray(int64_t bytes) {
    FLEX_BENCH_CHECK(cudaMalloc(&data, std::max<int64_t>(bytes, 16)));
  }
  ~DeviceArray() { cudaFree(data); }
};

/// bf16 normals: a pool of 1M values drawn on the host, repeated over the
/// array (generating hundreds of millions would take longer than the
/// timings; repetition changes no GEMM's cost).
void fillRandom(void *data, int64_t count, std::mt19937_64 &rng, double scale) {
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  const int64_t pool = std::min<int64_t>(count, int64_t{1} << 20);
  std::vector<uint16_t> host(pool);
  for (auto &v : host) {
    float f = dist(rng);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    v = static_cast<uint16_t>(bits >> 16); // bf16 by truncation
  }
  for (int64_t done = 0; done < count; done += pool)
    FLEX_BENCH_CHECK(cudaMemcpy(static_cast<uint16_t *>(data) + done,
                                host.data(), 2 * std::min(pool, count - done),
                                cudaMemcpyHostToDevice));
}

/// Whether two device arrays hold the same `bytes` bytes (copied back).
bool sameBytes(const void *x, const void *y, int64_t bytes) {
  std::vector<uint8_t> hx(bytes), hy(bytes);
  FLEX_BENCH_CHECK(cudaMemcpy(hx.data(), x, bytes, cudaMemcpyDeviceToHost));
  FLEX_BENCH_CHECK(cudaMemcpy(hy.data(), y, bytes, cudaMemcpyDeviceToHost));
  return hx == hy;
}

/// Relative L2 of x against y over at most 4M evenly spaced elements.
double relativeError(const void *x, const void *y, int64_t count) {
  const int64_t stride = std::max<int64_t>(1, count >> 22);
  const int64_t samples = (count + stride - 1) / stride;
  std::vector<uint16_t> a(samples), b(samples);
  FLEX_BENCH_CHECK(cudaMemcpy2D(a.data(), 2, x, 2 * stride, 2, samples,
                                cudaMemcpyDeviceToHost));
  FLEX_BENCH_CHECK(cudaMemcpy2D(b.data(), 2, y, 2 * stride, 2, samples,
                                cudaMemcpyDeviceToHost));
  auto value = [](uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return static_cast<double>(f);
  };
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < samples; ++i) {
    double p = value(a[i]), q = value(b[i]);
    if (!std::isfinite(p) || !std::isfinite(q))
      return INFINITY;
    diff += (p - q) * (p - q);
    norm += q * q;
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

/// Device-to-device copy bandwidth (bytes read + written per second).
double copyBandwidth() {
  const int64_t bytes = int64_t{1} << 30;
  DeviceArray src(bytes), dst(bytes);
  std::vector<double> times;
  for (int i = 0; i < 12; ++i) {
    auto start = std::chrono::steady_clock::now();
    FLEX_BENCH_CHECK(
        cudaMemcpy(dst.data, src.data, bytes, cudaMemcpyDeviceToDevice));
    FLEX_BENCH_CHECK(cudaDeviceSynchronize());
    if (i >= 2)
      times.push_back(std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - start)
                          .count());
  }
  return 2.0 * bytes / median(times);
}

/// What is being timed: the shape and op ("c3.fc1"), set per op; each timed
/// configuration's NVTX range is this, a dot and its own name.
std::string profileScope;

/// Median host microseconds of `body` (queued on the context's stream) from
/// the call to the end of the stream, after 3 warm-up calls, inside the NVTX
/// range profileScope.`what` (ncu: --nvtx --nvtx-include "c3.fc1.batched/").
template <typename Body>
double hostMicros(cuda::KernelContext &ctx, int iters, const std::string &what,
                  Body &&body) {
  const flex::bench::ProfileRange range(profileScope + "." + what);
  std::vector<double> t;
  for (int i = 0; i < iters + 3; ++i) {
    FLEX_BENCH_CHECK(cudaStreamSynchronize(ctx.stream()));
    auto start = std::chrono::steady_clock::now();
    CHECK_STATUS(body());
    FLEX_BENCH_CHECK(cudaStreamSynchronize(ctx.stream()));
    if (i >= 3)
      t.push_back(std::chrono::duration<double, std::micro>(
                      std::chrono::steady_clock::now() - start)
                      .count());
  }
  return median(t);
}

/// A path's name in the NVTX ranges: device, cublas, grouped, batched.
std::string pathName(GroupedGemmPath path, bool batched) {
  if (batched)
    return path == GroupedGemmPath::Device ? "device_static" : "batched";
  return path == GroupedGemmPath::Device          ? "device"
         : path == GroupedGemmPath::CublasGrouped ? "grouped"
                                                  : "cublas";
}

/// One shape's routing: its row counts on the host and the device.
struct Routed {
  std::vector<int32_t> rows;
  int64_t experts = 0, totalRows = 0;
  int touched = 0;     ///< experts with rows
  bool uniform = true; ///< every expert has the same rows
  DeviceArray offsets, rowsOnDevice;
  cuda::ExpertRowSpace space;

  Routed(const Shape &s, std::mt19937_64 &rng)
      : rows(rowCounts(s, rng)), experts(s.experts),
        offsets(4 * (s.experts + 1)), rowsOnDevice(4 * s.experts) {
    std::vector<int32_t> host(experts + 1, 0);
    for (int64_t e = 0; e < experts; ++e) {
      host[e + 1] = host[e] + rows[e];
      touched += rows[e] > 0;
      uniform = uniform && rows[e] == rows[0];
    }
    totalRows = host[experts];
    FLEX_BENCH_CHECK(cudaMemcpy(offsets.data, host.data(), 4 * (experts + 1),
                                cudaMemcpyHostToDevice));
    FLEX_BENCH_CHECK(cudaMemcpy(rowsOnDevice.data, rows.data(), 4 * experts,
                                cudaMemcpyHostToDevice));
    space.offsets = static_cast<const int32_t *>(offsets.data);
    space.rows = static_cast<const int32_t *>(rowsOnDevice.data);
    space.experts = experts;
    space.rowBound = totalRows;
  }
};

using TileNames =
    std::initializer_list<std::pair<cuda::detail::DeviceTiles, const char *>>;

/// One "tiles:" row: the time of `run(tiles)` for each tile this device
/// runs (wgmma tiles on Hopper only), each output against `reference`
/// (count elements of `out`); false when one differs.
template <typename Run>
bool tileRow(cuda::KernelContext &ctx, int iters, double flops, const void *out,
             const void *reference, int64_t count, TileNames tiles, Run run,
             const char *label = "tiles:") {
  bool ok = true;
  std::printf("%-16s %-6s %s", "", "", label);
  for (auto [tile, name] : tiles) {
    if (tile >= cuda::detail::DeviceTiles::Hopper &&
        !cuda::detail::hopperGroupedGemmRuns(ctx))
      continue;
    const double us = hostMicros(ctx, iters, name, [&] { return run(tile); });
    const double e = relativeError(out, reference, count);
    std::printf("  %s %.1f us (%.0f TF/s)%s", name, us, flops / us / 1e6,
                e <= 2e-2 ? "" : " MISMATCH");
    ok = ok && e <= 2e-2;
  }
  std::printf("\n");
  return ok;
}

/// fc1's bias + ReLU on the device kernel's Auto tile, where it fuses them:
/// in its store against the bare product (into `product`) and the epilogue
/// pass (into `passed`); the bits compared.
bool benchFusedEpilogue(cuda::KernelContext &ctx, const Routed &r,
                        const void *a, const void *b, void *fused,
                        void *product, void *passed, int64_t k, int64_t n,
                        int iters, std::mt19937_64 &rng) {
  const DType dt = DType::BF16;
  if (!cuda::detail::deviceGroupedGemmFusesEpilogue(ctx, dt, k, n, r.space,
                                                    false, {}, {a, b, fused}))
    return true;
  DeviceArray bias(2 * r.experts * n);
  fillRandom(bias.data, r.experts * n, rng, 0.5);
  const double fusedUs = hostMicros(ctx, iters, "bias_relu_fused", [&] {
    cuda::detail::DeviceGemmEpilogue epilogue{true, bias.data, nullptr,
                                              Epilogue::Relu, 1.0f};
    return cuda::detail::deviceGroupedGemm(
        ctx, a, b, fused, dt, k, n, r.space, false, false,
        cuda::detail::DeviceTiles::Auto, {}, epilogue);
  });
  const double passUs = hostMicros(ctx, iters, "bias_relu_pass", [&] {
    if (Status st = cuda::detail::deviceGroupedGemm(ctx, a, b, product, dt, k,
                                                    n, r.space, false, false);
        !st)
      return st;
    return cuda::applyGemmEpilogue(ctx, product, {bias.data, dt}, {},
                                   {passed, dt}, n, r.space, Epilogue::Relu);
  });
  const double e = relativeError(fused, passed, r.totalRows * n);
  std::printf("%-16s %-6s bias+relu: fused in the store %.1f us, GEMM + "
              "epilogue pass %.1f us%s\n",
              "", "", fusedUs, passUs, e == 0.0 ? "" : " MISMATCH");
  return e == 0.0;
}

/// The ReLU backward's GEMM (grad_h = grad_y w2^T: [R, d] x [h, d]^T, k = d,
/// n = h): fused in the wgmma kernel's store (grouped_gemm_activation_backward
/// on the device path) against the same GEMM and the activation-backward
/// pass; the bits compared. Nothing printed where the store does not run.
bool benchFusedActivationBackward(cuda::KernelContext &ctx, const Shape &s,
                                  const Routed &r, int iters,
                                  std::mt19937_64 &rng) {
  const DType dt = DType::BF16;
  const int64_t k = s.d, n = s.h, R = r.totalRows;
  DeviceArray a(2 * R * k), b(2 * r.experts * n * k), pre(2 * R * n),
      fused(2 * R * n), product(2 * R * n), passed(2 * R * n);
  if (!cuda::detail::deviceGroupedGemmFusesEpilogue(
          ctx, dt, k, n, r.space, true, {}, {a.data, b.data, fused.data}))
    return true;
  fillRandom(a.data, R * k, rng, 1.0);
  fillRandom(b.data, r.experts * n * k, rng, 1.0 / std::sqrt(double(k)));
  fillRandom(pre.data, R * n, rng, 1.0);
  const double fusedUs = hostMicros(ctx, iters, "relu_backward_fused", [&] {
    return cuda::detail::groupedGemmActivationBackwardWith(
        ctx, {a.data, dt}, {b.data, dt}, {pre.data, dt}, {fused.data, dt}, k, n,
        r.space, true, Activation::Relu, GroupedGemmPath::Device);
  });
  const double passUs = hostMicros(ctx, iters, "relu_backward_pass", [&] {
    if (Status st = cuda::detail::deviceGroupedGemm(
            ctx, a.data, b.data, product.data, dt, k, n, r.space, true, false);
        !st)
      return st;
    return cuda::activationBackward(ctx, {pre.data, dt}, {product.data, dt},
                                    {passed.data, dt}, n, r.space,
                                    Activation::Relu);
  });
  const double e = relativeError(fused.data, passed.data, R * n);
  std::printf("%-16s %-6s relu backward (k %lld, n %lld): fused in the store "
              "%.1f us, GEMM + pass %.1f us%s\n",
              "", "", static_cast<long long>(k), static_cast<long long>(n),
              fusedUs, passUs, e == 0.0 ? "" : " MISMATCH");
  return e == 0.0;
}

/// fc1 with a gathered A at decode sizes (the `+gather` variants): the
/// tokens' rows read through a row map by each device-kernel tile against
/// the dispatched copy on the Auto tile (what the plain variant runs after
/// its dispatch); auto takes the mma.sync few-rows tile for a gathered A
/// there, the wgmma kernel's cp.async producer not having been timed at
/// these sizes. Each output against the copy's.
bool benchGatheredFc1(cuda::KernelContext &ctx, const Shape &s, const Routed &r,
                      int iters, std::mt19937_64 &rng) {
  const DType dt = DType::BF16;
  const int64_t k = s.d, n = s.h, T = s.tokens, R = r.totalRows;
  if (R == 0 || R > 512 * r.experts)
    return true;
  DeviceArray x(2 * T * k), rows(2 * R * k), b(2 * r.experts * k * n),
      tokens(4 * R), fromCopy(2 * R * n), gathered(2 * R * n);
  fillRandom(x.data, T * k, rng, 1.0);
  fillRandom(b.data, r.experts * k * n, rng, 1.0 / std::sqrt(double(k)));
  // Each row a random token (a routing's dispatched order has no pattern
  // the reads could use), and the copy the dispatch would make.
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(T - 1));
  std::vector<int32_t> map(R);
  for (int32_t &t : map)
    t = token(rng);
  FLEX_BENCH_CHECK(
      cudaMemcpy(tokens.data, map.data(), 4 * R, cudaMemcpyHostToDevice));
  std::vector<uint16_t> hostX(T * k), hostRows(R * k);
  FLEX_BENCH_CHECK(
      cudaMemcpy(hostX.data(), x.data, 2 * T * k, cudaMemcpyDeviceToHost));
  for (int64_t row = 0; row < R; ++row)
    std::copy_n(hostX.begin() + map[row] * k, k, hostRows.begin() + row * k);
  FLEX_BENCH_CHECK(cudaMemcpy(rows.data, hostRows.data(), 2 * R * k,
                              cudaMemcpyHostToDevice));
  const RowGather gather{static_cast<const int32_t *>(tokens.data), T};
  using cuda::detail::DeviceTiles;
  const double copyUs = hostMicros(ctx, iters, "gather.dispatched", [&] {
    return cuda::detail::deviceGroupedGemm(
        ctx, rows.data, b.data, fromCopy.data, dt, k, n, r.space, false, false);
  });
  std::printf("%-16s %-6s gathered A: dispatched rows %.1f us; gathered", "",
              "", copyUs);
  bool ok = true;
  for (auto [tiles, name] :
       TileNames{{DeviceTiles::Auto, "auto"},
                 {DeviceTiles::Small, "small 32x128"},
                 {DeviceTiles::HopperCooperative, "wgmma 128x128"}}) {
    if (tiles >= DeviceTiles::Hopper &&
        !cuda::detail::hopperGroupedGemmRuns(ctx))
      continue;
    const double us =
        hostMicros(ctx, iters, std::string("gather.") + name, [&] {
          return cuda::detail::deviceGroupedGemm(
              ctx, x.data, b.data, gathered.data, dt, k, n, r.space, false,
              false, tiles, gather);
        });
    const double e = relativeError(gathered.data, fromCopy.data, R * n);
    std::printf("  %s %.1f us%s", name, us, e <= 2e-2 ? "" : " MISMATCH");
    ok = ok && e <= 2e-2;
  }
  std::printf("\n");
  return ok;
}

/// Uneven rows at prefill size: one strided-batched call with every expert
/// padded to the largest's rows (a capacity layout whose C is the largest
/// count, so nothing is dropped), over B = `b`; prints its row.
void paddedToLargestRow(cuda::KernelContext &ctx, const Routed &r,
                        const void *b, int64_t k, int64_t n,
                        const GroupedGemmOptions &options, int iters,
                        std::mt19937_64 &rng) {
  const DType dt = DType::BF16;
  const int64_t E = r.experts;
  const int64_t largest = *std::max_element(r.rows.begin(), r.rows.end());
  DeviceArray a(2 * E * largest * k), out(2 * E * largest * n),
      offsets(4 * (E + 1)), rows(4 * E);
  fillRandom(a.data, E * largest * k, rng, 1.0);
  std::vector<int32_t> at(E + 1), full(E, static_cast<int32_t>(largest));
  for (int64_t e = 0; e <= E; ++e)
    at[e] = static_cast<int32_t>(e * largest);
  FLEX_BENCH_CHECK(
      cudaMemcpy(offsets.data, at.data(), 4 * (E + 1), cudaMemcpyHostToDevice));
  FLEX_BENCH_CHECK(
      cudaMemcpy(rows.data, full.data(), 4 * E, cudaMemcpyHostToDevice));
  cuda::ExpertRowSpace space = r.space;
  space.offsets = static_cast<const int32_t *>(offsets.data);
  space.rows = static_cast<const int32_t *>(rows.data);
  space.rowBound = E * largest;
  space.staticCapacity = largest;
  const double us = hostMicros(ctx, iters, "padded", [&] {
    return cuda::detail::groupedGemmWith(ctx, {a.data, dt}, {b, dt}, {},
                                         {out.data, dt}, k, n, space, options,
                                         {}, GroupedGemmPath::Cublas);
  });
  std::printf("%-16s %-6s padded to the largest expert (%lld rows each, "
              "%.3fx the rows): cuBLAS batched %.1f us\n",
              "", "", static_cast<long long>(largest),
              double(E * largest) / double(r.totalRows), us);
}

/// The aligned layout's blocks through cuBLASLt's pointer-array matmul
/// without an epilogue (what alignedBlocksGemm could call instead of
/// cublasGemmBatchedEx): the heuristic's first algorithms (up to 8) for
/// column-major C^T[n, 128] = B^T[n, k] A^T[k, 128] per block, each timed
/// into `out`; the fastest's valid rows (packed through `at`) against
/// `reference`. Prints one line; false on a mismatch.
bool ltPointerArrayBlocks(cuda::KernelContext &ctx,
                          const std::vector<int32_t> &at, const Routed &r,
                          int64_t R, const void *aligned, const void *b,
                          void *out, const void *reference, int64_t k,
                          int64_t n, int iters) {
  const int64_t E = r.experts, block = kAlignedLayoutRows, blocks = R / block;
  std::vector<const void *> pointers(3 * blocks);
  for (int64_t j = 0, e = 0; j < blocks; ++j) {
    while (e + 1 < E && at[e + 1] <= j * block)
      ++e;
    pointers[j] = static_cast<const char *>(b) + 2 * e * k * n;
    pointers[blocks + j] =
        static_cast<const char *>(aligned) + 2 * j * block * k;
    pointers[2 * blocks + j] = static_cast<char *>(out) + 2 * j * block * n;
  }
  DeviceArray array(sizeof(void *) * 3 * blocks);
  FLEX_BENCH_CHECK(cudaMemcpy(array.data, pointers.data(),
                              sizeof(void *) * 3 * blocks,
                              cudaMemcpyHostToDevice));
  auto **dev = static_cast<const void **>(array.data);
  auto lt = static_cast<cublasLtHandle_t>(ctx.cublasLtHandle());
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t layouts[3] = {};
  const int64_t shapes[3][3] = {{n, k, n}, {k, block, k}, {n, block, n}};
  const int32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
  const int32_t count = static_cast<int32_t>(blocks);
  bool ready = cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ==
               CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < 3 && ready; ++i)
    ready = cublasLtMatrixLayoutCreate(&layouts[i], CUDA_R_16BF, shapes[i][0],
                                       shapes[i][1],
                                       shapes[i][2]) == CUBLAS_STATUS_SUCCESS &&
            cublasLtMatrixLayoutSetAttribute(
                layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                sizeof(count)) == CUBLAS_STATUS_SUCCESS &&
            cublasLtMatrixLayoutSetAttribute(
                layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode,
                sizeof(mode)) == CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulPreference_t preference = nullptr;
  const uint64_t workspace = static_cast<uint64_t>(ctx.cublasWorkspaceBytes());
  cublasLtMatmulHeuristicResult_t results[8] = {};
  int found = 0;
  ready =
      ready &&
      cublasLtMatmulPreferenceCreate(&preference) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
          sizeof(workspace)) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoGetHeuristic(lt, op, layouts[0], layouts[1], layouts[2],
                                     layouts[2], preference, 8, results,
                                     &found) == CUBLAS_STATUS_SUCCESS;
  const float alpha = 1.0f, beta = 0.0f;
  // The blocks' product with heuristic result i.
  auto matmul = [&](int i) {
    return cublasLtMatmul(lt, op, &alpha, dev, layouts[0], dev + blocks,
                          layouts[1], &beta, dev + 2 * blocks, layouts[2],
                          dev + 2 * blocks, layouts[2], &results[i].algo,
                          ctx.cublasWorkspace(),
                          static_cast<size_t>(ctx.cublasWorkspaceBytes()),
                          ctx.stream()) == CUBLAS_STATUS_SUCCESS
               ? Status::ok()
               : Status(StatusCode::Internal, "cublasLtMatmul");
  };
  double best = NAN, first = NAN;
  int bestIndex = -1;
  for (int i = 0; ready && i < found; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS)
      continue;
    const double us = hostMicros(ctx, iters, "lt_algo" + std::to_string(i),
                                 [&] { return matmul(i); });
    if (i == 0)
      first = us;
    if (bestIndex < 0 || us < best) {
      best = us;
      bestIndex = i;
    }
  }
  bool ok = true;
  double err = NAN;
  if (bestIndex >= 0) {
    FLEX_BENCH_CHECK(cudaMemset(out, 0xff, 2 * R * n));
    ok = matmul(bestIndex).isOk();
    FLEX_BENCH_CHECK(cudaStreamSynchronize(ctx.stream()));
    DeviceArray packed(2 * r.totalRows * n);
    int64_t from = 0;
    for (int64_t e = 0; e < E; ++e) {
      FLEX_BENCH_CHECK(
          cudaMemcpy(static_cast<char *>(packed.data) + 2 * from * n,
                     static_cast<const char *>(out) + 2 * int64_t{at[e]} * n,
                     2 * r.rows[e] * n, cudaMemcpyDeviceToDevice));
      from += r.rows[e];
    }
    err = relativeError(packed.data, reference, r.totalRows * n);
    ok = ok && err <= 2e-2;
  }
  if (preference)
    cublasLtMatmulPreferenceDestroy(preference);
  for (cublasLtMatrixLayout_t layout : layouts)
    if (layout)
      cublasLtMatrixLayoutDestroy(layout);
  if (op)
    cublasLtMatmulDescDestroy(op);
  std::printf("%-16s %-6s aligned blocks on cuBLASLt pointer arrays: %d "
              "algorithms, the heuristic's first %.1f us, fastest (#%d) "
              "%.1f us%s\n",
              "", "", ready ? found : -1, first, bestIndex, best,
              bestIndex < 0 || ok ? "" : "  MISMATCH");
  return bestIndex < 0 || ok;
}

/// The same rows in the aligned layout (each expert's first row a multiple
/// of 128): one cublasGemmBatchedEx over the 128-row blocks its buffers
/// declare (alignedLayoutRows; no host read), bare and with a ReLU (the
/// epilogue pass), over B = `b`; the bare product's valid rows against
/// `reference` (the packed rows' product). Prints its row; false on a
/// mismatch.
bool alignedBlocksRow(cuda::KernelContext &ctx, const Routed &r, const void *a,
                      const void *b, const void *reference, int64_t k,
                      int64_t n, const GroupedGemmOptions &options, int iters) {
  const DType dt = DType::BF16;
  const int64_t E = r.experts, align = kAlignedLayoutRows;
  const int64_t R = alignedLayoutRows(r.totalRows, E, r.totalRows, align);
  std::vector<int32_t> at(E + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    at[e + 1] =
        static_cast<int32_t>(at[e] + (r.rows[e] + align - 1) / align * align);
  DeviceArray aligned(2 * R * k), out(2 * R * n), packed(2 * r.totalRows * n),
      offsets(4 * (E + 1));
  FLEX_BENCH_CHECK(cudaMemset(aligned.data, 0, 2 * R * k));
  int64_t from = 0;
  for (int64_t e = 0; e < E; ++e) { // the packed rows into their blocks
    FLEX_BENCH_CHECK(
        cudaMemcpy(static_cast<char *>(aligned.data) + 2 * int64_t{at[e]} * k,
                   static_cast<const char *>(a) + 2 * from * k,
                   2 * r.rows[e] * k, cudaMemcpyDeviceToDevice));
    from += r.rows[e];
  }
  FLEX_BENCH_CHECK(
      cudaMemcpy(offsets.data, at.data(), 4 * (E + 1), cudaMemcpyHostToDevice));
  cuda::ExpertRowSpace space = r.space;
  space.offsets = static_cast<const int32_t *>(offsets.data);
  space.rowBound = R;
  space.alignedRows = align;
  GroupedGemmOptions relu = options;
  relu.epilogue = Epilogue::Relu;
  auto time = [&](const GroupedGemmOptions &with) {
    return hostMicros(
        ctx, iters,
        with.epilogue == Epilogue::Relu ? "aligned_relu" : "aligned", [&] {
          return cuda::detail::groupedGemmWith(ctx, {aligned.data, dt}, {b, dt},
                                               {}, {out.data, dt}, k, n, space,
                                               with, {}, GroupedGemmPath::Auto);
        });
  };
  const double withRelu = options.transB ? NAN : time(relu);
  const double bare = time(options);
  from = 0;
  for (int64_t e = 0; e < E; ++e) { // the blocks' valid rows, packed again
    FLEX_BENCH_CHECK(
        cudaMemcpy(static_cast<char *>(packed.data) + 2 * from * n,
                   static_cast<const char *>(out.data) + 2 * int64_t{at[e]} * n,
                   2 * r.rows[e] * n, cudaMemcpyDeviceToDevice));
    from += r.rows[e];
  }
  const double err = relativeError(packed.data, reference, r.totalRows * n);
  std::printf("%-16s %-6s aligned layout (%lld rows declared, %.3fx): one "
              "batched call over 128-row blocks %.1f us, with relu %.1f us%s\n",
              "", "", static_cast<long long>(R), double(R) / r.totalRows, bare,
              withRelu, err <= 2e-2 ? "" : "  MISMATCH");
  const bool lt =
      options.transB || ltPointerArrayBlocks(ctx, at, r, R, aligned.data, b,
                                             out.data, reference, k, n, iters);
  return err <= 2e-2 && lt;
}

/// The per-expert GEMMs spread over 2 and 4 side streams (gemm_streams):
/// `time()` times the cuBLAS path into `out`, whose `bytes` must equal
/// `reference`'s (one stream's: the same calls). Prints its row; false on
/// a mismatch.
template <typename Time>
bool streamsRow(cuda::KernelContext &ctx, Time time, const void *out,
                const void *reference, int64_t bytes) {
  bool ok = true;
  std::printf("%-16s %-6s cuBLAS per expert on streams:", "", "");
  for (int streams : {2, 4}) {
    ctx.gemmStreams = streams;
    const double us = time();
    const bool same = sameBytes(out, reference, bytes);
    std::printf(" %d: %.1f us%s", streams, us, same ? "" : " MISMATCH");
    ok = ok && same;
  }
  ctx.gemmStreams = 1;
  std::printf("\n");
  return ok;
}

/// Times `op` of shape `s` on the device kernel, cuBLAS per expert and (for
/// uniform rows) cuBLAS strided-batched, then each tile of the kernel;
/// prints its rows. False when the kernel refused or the outputs differ.
bool benchOp(cuda::KernelContext &ctx, const Shape &s, const Routed &r, Op op,
             int iters, double copyBytesPerS, std::mt19937_64 &rng) {
  // fc1: [R, d] x [d, h]; fc2: [R, h] x [h, d]; dgrad1: [R, h] x w1^T
  // ([d, h] used transposed); wgrad1: [d, R] x [R, h].
  const bool wgrad = op == Op::Wgrad;
  const int64_t k = op == Op::Fc2 || op == Op::Dgrad ? s.h : s.d;
  const int64_t n = op == Op::Fc2 || op == Op::Dgrad ? s.d : s.h;
  const int64_t E = r.experts, R = r.totalRows;
  const DType dt = DType::BF16;
  // a, then b (forward) or grad_c (weight gradient), then one output each
  // for the device kernel, cuBLAS per expert and cuBLAS batched.
  const int64_t outCount = wgrad ? E * k * n : R * n;
  const int64_t secondCount = wgrad ? R * n : E * k * n;
  DeviceArray a(2 * R * k), second(2 * secondCount), outDevice(2 * outCount),
      outCublas(2 * outCount), outBatched(2 * outCount);
  fillRandom(a.data, R * k, rng, 1.0);
  fillRandom(second.data, secondCount, rng,
             wgrad ? 1.0 : 1.0 / std::sqrt(double(k)));
  GroupedGemmOptions options;
  options.transB = op == Op::Dgrad;
  auto call = [&](GroupedGemmPath path, bool batched, void *out) {
    cuda::ExpertRowSpace sp = r.space;
    if (batched)
      sp.staticCapacity = r.rows[0];
    // A new routing each call: the cuBLAS path reads its counts again.
    ++ctx.generation;
    if (wgrad)
      return cuda::detail::groupedGemmWgradWith(ctx, {a.data, dt},
                                                {second.data, dt}, k, n, sp,
                                                {out, dt}, {}, false, path);
    return cuda::detail::groupedGemmWith(ctx, {a.data, dt}, {second.data, dt},
                                         {}, {out, dt}, k, n, sp, options, {},
                                         path);
  };
  auto time = [&](GroupedGemmPath path, bool batched, void *out) {
    return hostMicros(ctx, iters, pathName(path, batched),
                      [&] { return call(path, batched, out); });
  };
  std::string reason;
  if (!cuda::detail::deviceGroupedGemmApplies(
          ctx, dt, k, n, r.space, {a.data, second.data, outDevice.data},
          &reason)) {
    std::printf("%-16s %-6s device kernel refused: %s\n", s.name.c_str(),
                opName(op), reason.c_str());
    return false;
  }
  const double dev = time(GroupedGemmPath::Device, false, outDevice.data);
  const double cub = time(GroupedGemmPath::Cublas, false, outCublas.data);
  const double err = relativeError(outDevice.data, outCublas.data, outCount);
  // One cublasGemmGroupedBatchedEx over the experts (forward and input
  // gradient; the weight gradient has no grouped call yet).
  const double grouped =
      wgrad ? NAN
            : time(GroupedGemmPath::CublasGrouped, false, outBatched.data);
  const double groupedErr =
      wgrad ? 0.0 : relativeError(outBatched.data, outCublas.data, outCount);
  const double batched =
      r.uniform ? time(GroupedGemmPath::Cublas, true, outBatched.data) : NAN;
  const double flops = 2.0 * R * k * n;
  const double floorUs =
      wgrad ? NAN : 2.0 * r.touched * k * n / copyBytesPerS * 1e6;
  const double best = std::isnan(batched) ? cub : std::min(cub, batched);
  std::printf("%-16s %-6s %7lld %7.1f %6lld | %10.1f %10.1f %10.1f %10.1f | "
              "%8.1f %8.1f | %.2fx%s\n",
              s.name.c_str(), opName(op), static_cast<long long>(R),
              double(R) / E, static_cast<long long>(E), dev, cub, grouped,
              batched, flops / dev / 1e6, floorUs, dev / best,
              err <= 2e-2 && groupedErr <= 2e-2 ? "" : "  MISMATCH");
  bool ok = err <= 2e-2 && groupedErr <= 2e-2;
  // Uneven rows at prefill size (a dropless layer's): the padded batch and
  // the per-expert GEMMs on side streams beside them.
  if (!r.uniform && R >= 4096 * s.k) {
    if (!wgrad) {
      paddedToLargestRow(ctx, r, second.data, k, n, options, iters, rng);
      ok = alignedBlocksRow(ctx, r, a.data, second.data, outCublas.data, k, n,
                            options, iters) &&
           ok;
    }
    ok = streamsRow(
             ctx,
             [&] {
               return time(GroupedGemmPath::Cublas, false, outBatched.data);
             },
             outBatched.data, outCublas.data, 2 * outCount) &&
         ok;
  }
  if (!ok)
    std::printf("  relative L2 against cuBLAS per expert: device %.3g, "
                "grouped %.3g\n",
                err, groupedErr);
  using cuda::detail::DeviceTiles;
  if (wgrad) // the wgmma weight gradient's tiles
    return tileRow(
               ctx, iters, flops, outDevice.data, outCublas.data, outCount,
               {{DeviceTiles::HopperPingPong, "wgmma ping-pong 128x128"},
                {DeviceTiles::HopperCooperative, "wgmma 128x128"},
                {DeviceTiles::HopperWide, "wgmma 128x256"},
                {DeviceTiles::HopperWidePair, "wgmma 2x(128x256) multicast"}},
               [&](DeviceTiles tiles) {
                 return cuda::detail::deviceGroupedGemmWgrad(
                     ctx, a.data, second.data, outDevice.data, dt, k, n,
                     r.space, false, {}, tiles);
               }) &&
           ok;
  // Each CTA tile of the kernel on the same problem.
  ok = tileRow(ctx, iters, flops, outDevice.data, outCublas.data, outCount,
               {{DeviceTiles::Small, "small 32x128"},
                {DeviceTiles::Large, "large 128x128"},
                {DeviceTiles::Wide, "wide 128x256"},
                {DeviceTiles::HopperCooperative, "wgmma 128x128"},
                {DeviceTiles::HopperWide, "wgmma 128x256"},
                {DeviceTiles::HopperPingPong, "wgmma ping-pong 128x128"},
                {DeviceTiles::HopperWidePair, "wgmma 2x(128x256) multicast"}},
               [&](DeviceTiles tiles) {
                 return cuda::detail::deviceGroupedGemm(
                     ctx, a.data, second.data, outDevice.data, dt, k, n,
                     r.space, options.transB, false, tiles);
               }) &&
       ok;
  if (op == Op::Fc1)
    ok =
        benchFusedEpilogue(ctx, r, a.data, second.data, outDevice.data,
                           outBatched.data, outCublas.data, k, n, iters, rng) &&
        ok;
  if (op == Op::Dgrad)
    ok = benchFusedActivationBackward(ctx, s, r, iters, rng) && ok;
  if (op == Op::Fc1)
    ok = benchGatheredFc1(ctx, s, r, iters, rng) && ok;
  return ok;
}

/// A gated layer's first layer (grouped_gemm_glu): the fused kernel (both
/// products and the GLU in one launch) against the unfused steps (two
/// GEMMs, then the glu kernel) on cuBLAS per expert, cuBLAS grouped and,
/// for uniform rows, cuBLAS strided-batched - and the fused kernel on that
/// static space. The floor reads both weights once.
bool benchGlu(cuda::KernelContext &ctx, const Shape &s, const Routed &r,
              int iters, double copyBytesPerS, std::mt19937_64 &rng) {
  const int64_t k = s.d, n = s.h, E = r.experts, R = r.totalRows;
  const DType dt = DType::BF16;
  DeviceArray a(2 * R * k), bGate(2 * E * k * n), bUp(2 * E * k * n),
      fused(2 * R * n), unfused(2 * R * n);
  fillRandom(a.data, R * k, rng, 1.0);
  fillRandom(bGate.data, E * k * n, rng, 1.0 / std::sqrt(double(k)));
  fillRandom(bUp.data, E * k * n, rng, 1.0 / std::sqrt(double(k)));
  auto time = [&](GroupedGemmPath path, bool batched, void *out) {
    cuda::ExpertRowSpace sp = r.space;
    if (batched)
      sp.staticCapacity = r.rows[0];
    return hostMicros(ctx, iters, pathName(path, batched), [&] {
      ++ctx.generation; // a new routing: the cuBLAS paths read it again
      return cuda::detail::groupedGemmGluWith(
          ctx, {a.data, dt}, {bGate.data, dt}, {bUp.data, dt}, {out, dt}, k, n,
          sp, {}, {}, path);
    });
  };
  const double dev = time(GroupedGemmPath::Device, false, fused.data);
  const double cub = time(GroupedGemmPath::Cublas, false, unfused.data);
  double err = relativeError(fused.data, unfused.data, R * n);
  const double grouped =
      time(GroupedGemmPath::CublasGrouped, false, unfused.data);
  err = std::max(err, relativeError(fused.data, unfused.data, R * n));
  double batched = NAN, fusedStatic = NAN;
  if (r.uniform) {
    batched = time(GroupedGemmPath::Cublas, true, unfused.data);
    err = std::max(err, relativeError(fused.data, unfused.data, R * n));
    fusedStatic = time(GroupedGemmPath::Device, true, unfused.data);
    err = std::max(err, relativeError(fused.data, unfused.data, R * n));
  }
  const double flops = 4.0 * R * k * n;
  const double floorUs = 4.0 * r.touched * k * n / copyBytesPerS * 1e6;
  const double best =
      std::min({cub, grouped, std::isnan(batched) ? cub : batched});
  std::printf("%-16s %-6s %7lld %7.1f %6lld | %10.1f %10.1f %10.1f %10.1f | "
              "%8.1f %8.1f | %.2fx%s\n",
              s.name.c_str(), opName(Op::Glu), static_cast<long long>(R),
              double(R) / E, static_cast<long long>(E), dev, cub, grouped,
              batched, flops / dev / 1e6, floorUs, dev / best,
              err <= 2e-2 ? "" : "  MISMATCH");
  if (!std::isnan(fusedStatic))
    std::printf("%-16s %-6s fused on the static space: %.1f us\n", "", "",
                fusedStatic);
  // Each wgmma GLU tile on the ragged space.
  using cuda::detail::DeviceTiles;
  const bool tilesOk =
      !cuda::detail::hopperGroupedGemmRuns(ctx) ||
      tileRow(
          ctx, iters, flops, fused.data, unfused.data, R * n,
          {{DeviceTiles::HopperPingPong, "ping-pong 64+64"},
           {DeviceTiles::HopperWide, "128+128"},
           {DeviceTiles::HopperWidePair, "2x(128+128) multicast"}},
          [&](DeviceTiles tiles) {
            return cuda::detail::deviceGroupedGemmGlu(
                ctx, a.data, bGate.data, bUp.data, fused.data, nullptr, nullptr,
                dt, k, n, r.space, {}, tiles);
          },
          "fused tiles:");
  if (err > 2e-2)
    std::printf("  relative L2 of the unfused paths against the fused: %.3g\n",
                err);
  return err <= 2e-2 && tilesOk;
}

int run(int iters, const std::string &only) {
  std::unique_ptr<cuda::KernelContext> ctx;
  CHECK_STATUS(cuda::KernelContext::create(ctx));
  cudaDeviceProp prop{};
  FLEX_BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copyBytesPerS = copyBandwidth();
  std::printf("device: %s; copy bandwidth %.2f TB/s (read + write)\n",
              prop.name, copyBytesPerS / 1e12);
  // The 2-CTA pair form's grid: clusters that fit at once against the SMs.
  std::string why;
  const int64_t clusters = cuda::detail::hopperPairClustersThatFit(*ctx, &why);
  if (clusters >= 0)
    std::printf("wgmma 2-CTA clusters that fit at once: %lld of %d SMs\n",
                static_cast<long long>(clusters), prop.multiProcessorCount);
  else
    std::printf("wgmma 2-CTA clusters: %s\n", why.c_str());
  const std::vector<Op> train = {Op::Fc1, Op::Fc2, Op::Dgrad, Op::Wgrad};
  const std::vector<Op> infer = {Op::Fc1, Op::Fc2};
  // Gated shapes: glu1 is the fused first layer against the unfused steps.
  const std::vector<Op> inferGated = {Op::Fc1, Op::Fc2, Op::Glu};
  const std::vector<Shape> shapes = {
      {"c1", 16384, 4096, 4096, 8, 2, Routing::Even, train},
      {"c3", 16384, 2048, 1408, 64, 6, Routing::Even, train},
      {"c3_skewed", 16384, 2048, 1408, 64, 6, Routing::Skewed, train},
      {"c3_t2048", 2048, 2048, 1408, 64, 6, Routing::Even, inferGated},
      {"decode_t512", 512, 2048, 1408, 64, 6, Routing::Even, inferGated},
      {"decode_t256", 256, 2048, 1408, 64, 6, Routing::Even, inferGated},
      {"decode_t128_big", 128, 4096, 1536, 64, 8, Routing::Even, inferGated},
      {"decode_t32", 32, 2048, 1408, 64, 6, Routing::Even, inferGated},
      // The gated benchmark layers' first layer (G3 is C3's shape).
      {"g3_glu", 16384, 2048, 1408, 64, 6, Routing::Even, {Op::Glu}},
      {"g1_glu", 16384, 4096, 14336, 8, 2, Routing::Even, {Op::Glu}},
      // Training with few rows per expert (cost-model layers l32, l17):
      // the weight gradient's tiles have one or two reduction steps.
      {"train_e64_r32", 1024, 1024, 1024, 64, 2, Routing::Even, train},
      {"train_e16_r64", 1024, 1024, 2048, 16, 1, Routing::Even, train},
      // C3 dropless at balanced routing: sampled counts (mean 1536, spread
      // about 40; last, so the shapes above draw the counts they drew
      // before it).
      {"c3_random", 16384, 2048, 1408, 64, 6, Routing::Random, infer},
  };
  std::printf("\n%-16s %-6s %7s %7s %6s | %10s %10s %10s %10s | %8s %8s | "
              "%s\n",
              "shape", "op", "rows", "M/E", "E", "device us", "cublas us",
              "grouped us", "batched us", "dev TF/s", "floor us",
              "device/best-other");
  std::mt19937_64 rng(2026);
  bool ok = true;
  for (const Shape &s : shapes) {
    if (!only.empty() &&
        ("," + only + ",").find("," + s.name + ",") == std::string::npos)
      continue;
    const Routed routed(s, rng);
    for (Op op : s.ops) {
      profileScope = s.name + "." + opName(op);
      ok = (op == Op::Glu
                ? benchGlu(*ctx, s, routed, iters, copyBytesPerS, rng)
                : benchOp(*ctx, s, routed, op, iters, copyBytesPerS, rng)) &&
           ok;
    }
  }
  std::printf("\nfloor: the touched experts' weight bytes read once at the "
              "copy's memory throughput (bytes read + written per second).\n");
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char **argv) {
  int iters = 20;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--iters" && i + 1 < argc)
      iters = std::max(1, std::atoi(argv[++i]));
    else if (arg == "--only" && i + 1 < argc)
      only = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: flex-gemm-bench [--iters N] [--only NAME,...]\n");
      return 2;
    }
  }
  // Line by line even into a file: a run cut short keeps its rows.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "flex-gemm-bench: no CUDA device\n");
    return 2;
  }
  return run(iters, only);
}
