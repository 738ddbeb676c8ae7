//===- CudaGemmCombineTest.cpp - fc2 and the combine as one step ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// grouped_gemm_combine (cuda::groupedGemmCombine) on every GEMM path: random
// routings, ragged (dropless) and padded with tokens that lost every choice,
// decode-sized (the few-rows tile sums in its store) and larger (the wgmma
// kernel on Hopper), with and without a bias and an activation. Each call's
// product c and out are bit for bit grouped_gemm and combine run apart on
// the same path, out is near fp64's sum of the gated products, and a second
// call gives the same bits (the arrival counters are zero again after every
// launch). Outputs are poisoned first.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"

#include "GroupedGemmInternal.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <gtest/gtest.h>

#include <iostream>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>

using namespace flex;
using cuda::detail::GroupedGemmPath;
using flex::cudatest::Buffer;
using flex::cudatest::normals;

namespace {

/// A random top-k routing of T tokens over E experts, on the host and the
/// device: ragged (every choice kept, experts' rows back to back) or padded
/// with a capacity C small enough that the last token loses every choice.
struct TestRouting {
  int64_t T, E, k, rowBound = 0;
  bool padded;
  std::vector<int32_t> indices, locations, offsets, rows, rowTokens;
  std::vector<float> gates;
  int32_t capacity = 0;
  Buffer dIndices, dLocations, dGates, dCapacity, dOffsets, dRows, dRowTokens;

  TestRouting(std::mt19937_64 &rng, int64_t T, int64_t E, int64_t k,
              bool padded)
      : T(T), E(E), k(k), padded(padded) {
    std::vector<int32_t> experts(E), counts(E, 0);
    std::iota(experts.begin(), experts.end(), 0);
    std::uniform_real_distribution<float> unit(0.05f, 1.0f);
    for (int64_t t = 0; t < T; ++t) {
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int64_t j = 0; j < k; ++j) {
        indices.push_back(experts[j]);
        locations.push_back(counts[experts[j]]++);
        gates.push_back(unit(rng));
      }
    }
    offsets.assign(E + 1, 0);
    rows.assign(E, 0);
    if (padded) {
      // The last token's choices are each its expert's last row: a
      // capacity below all of them drops the token entirely.
      capacity = *std::max_element(counts.begin(), counts.end());
      for (int64_t j = 0; j < k; ++j)
        capacity = std::min(capacity, locations[(T - 1) * k + j]);
      for (int64_t e = 0; e < E; ++e) {
        offsets[e + 1] = static_cast<int32_t>((e + 1) * capacity);
        rows[e] = std::min(counts[e], capacity);
      }
      rowBound = E * capacity;
    } else {
      capacity = static_cast<int32_t>(T * k);
      for (int64_t e = 0; e < E; ++e) {
        offsets[e + 1] = offsets[e] + counts[e];
        rows[e] = counts[e];
      }
      rowBound = T * k + 5; // the buffer is declared larger than its rows
    }
    rowTokens.assign(rowBound, -1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (locations[t * k + j] < capacity)
          rowTokens[offsets[indices[t * k + j]] + locations[t * k + j]] =
              static_cast<int32_t>(t);
    auto toDevice = [](Buffer &buffer, DType type, const void *data,
                       size_t count) {
      buffer = Buffer(type, count);
      std::memcpy(buffer.host.data(), data, 4 * count);
      buffer.upload();
    };
    toDevice(dIndices, DType::I32, indices.data(), indices.size());
    toDevice(dLocations, DType::I32, locations.data(), locations.size());
    toDevice(dGates, DType::F32, gates.data(), gates.size());
    toDevice(dCapacity, DType::I32, &capacity, 1);
    toDevice(dOffsets, DType::I32, offsets.data(), offsets.size());
    toDevice(dRows, DType::I32, rows.data(), rows.size());
    toDevice(dRowTokens, DType::I32, rowTokens.data(), rowTokens.size());
  }

  Routing routing() {
    Routing r;
    r.indices = dIndices.as<int32_t>();
    r.locations = dLocations.as<int32_t>();
    r.gates = dGates.as<float>();
    r.capacity = dCapacity.as<int32_t>();
    r.expertOffsets = dOffsets.as<int32_t>();
    r.expertRows = dRows.as<int32_t>();
    r.tokens = T;
    r.topK = k;
    r.experts = E;
    return r;
  }
  cuda::ExpertRowSpace space() {
    cuda::ExpertRowSpace s;
    s.offsets = dOffsets.as<int32_t>();
    s.rows = dRows.as<int32_t>();
    s.experts = E;
    s.rowBound = rowBound;
    s.padded = padded;
    return s;
  }
  /// The dispatch row of choice j of token t, or -1.
  int64_t rowOf(int64_t t, int64_t j) const {
    const int32_t location = locations[t * k + j];
    return location < capacity ? offsets[indices[t * k + j]] + location : -1;
  }
};

struct CombineCase {
  const char *name;
  int64_t T, E, k, K, n;
  bool padded;
};

const char *pathName(GroupedGemmPath path) {
  switch (path) {
  case GroupedGemmPath::Auto:
    return "auto";
  case GroupedGemmPath::Device:
    return "device";
  case GroupedGemmPath::Cublas:
    return "cublas";
  default:
    return "other";
  }
}

TEST(CudaGemmCombine, MatchesTheTwoStepsAndFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  // Decode: a few rows per expert (the few-rows tile); prefill: ~128 per
  // expert (the wgmma kernel on Hopper, else the large mma.sync tile or
  // cuBLAS: the two steps); N tails past a 128-column tile.
  const CombineCase cases[] = {
      {"decode ragged", 40, 16, 4, 256, 192, false},
      {"decode padded", 40, 16, 4, 128, 320, true},
      {"prefill ragged", 512, 8, 2, 256, 384, false},
      {"prefill padded", 512, 8, 2, 192, 256, true},
  };
  std::mt19937_64 rng(41);
  for (const CombineCase &tc : cases) {
    TestRouting routing(rng, tc.T, tc.E, tc.k, tc.padded);
    // A new routing, as a gate makes: the host's cached counts (keyed by
    // the offsets' address, which a new buffer may reuse) are stale.
    ++ctx->generation;
    const int64_t R = routing.rowBound, K = tc.K, n = tc.n, E = tc.E;
    for (DType dt : {DType::BF16, DType::F16})
      for (bool withBias : {false, true}) {
        const Epilogue epilogue = withBias ? Epilogue::Gelu : Epilogue::None;
        SCOPED_TRACE(std::string(tc.name) + " " + std::string(toString(dt)) +
                     (withBias ? " bias+gelu" : ""));
        Buffer a(dt, R * K), b(dt, E * K * n), bias(dt, E * n);
        a.set(normals(rng, R * K, 1.0));
        b.set(normals(rng, E * K * n, 1.0 / std::sqrt(double(K))));
        bias.set(normals(rng, E * n, 0.5));
        GroupedGemmOptions options;
        options.epilogue = epilogue;
        const ReadBuffer biasIn =
            withBias ? ReadBuffer{bias.device, dt} : ReadBuffer{};
        // fp64: out[t] = sum of kept gates x act(a[row] @ b[e] + bias[e]).
        std::vector<double> want(tc.T * n, 0.0);
        for (int64_t t = 0; t < tc.T; ++t)
          for (int64_t j = 0; j < tc.k; ++j) {
            const int64_t row = routing.rowOf(t, j);
            if (row < 0)
              continue;
            const int64_t e = routing.indices[t * tc.k + j];
            for (int64_t col = 0; col < n; ++col) {
              double sum = withBias ? bias.at(e * n + col) : 0.0;
              for (int64_t i = 0; i < K; ++i)
                sum += a.at(row * K + i) * b.at(e * K * n + i * n + col);
              if (withBias) // gelu, tanh-free: x * Phi(x)
                sum = sum * 0.5 * (1.0 + std::erf(sum / std::sqrt(2.0)));
              want[t * n + col] += routing.gates[t * tc.k + j] * sum;
            }
          }
        for (GroupedGemmPath path :
             {GroupedGemmPath::Auto, GroupedGemmPath::Device,
              GroupedGemmPath::Cublas}) {
          SCOPED_TRACE(pathName(path));
          Buffer c(dt, R * n), out(dt, tc.T * n), c2(dt, R * n),
              out2(dt, tc.T * n);
          for (Buffer *x : {&c, &out, &c2, &out2})
            x->poison();
          // The device path at decode sums in the few-rows tile's store
          // wherever the device kernel runs: the test covers it, not only
          // the two steps.
          const bool inStore = cuda::detail::combinesInStore(
              *ctx, path, dt, K, n, routing.space(), false,
              {a.device, b.device, c.device, out.device, bias.device});
          if (path == GroupedGemmPath::Device && tc.T < 100 &&
              cuda::detail::deviceGroupedGemmRuns(*ctx)) {
            EXPECT_TRUE(inStore);
          }
          if (path == GroupedGemmPath::Cublas) {
            EXPECT_FALSE(inStore);
          }
          std::cout << "[ path     ] " << tc.name << " " << toString(dt) << " "
                    << pathName(path)
                    << (inStore ? ": in the store\n" : ": two steps\n");
          for (int call = 0; call < 2; ++call) {
            SCOPED_TRACE("call " + std::to_string(call));
            Status s = cuda::detail::groupedGemmCombineWith(
                *ctx, {a.device, dt}, {b.device, dt}, biasIn, {c.device, dt}, K,
                n, routing.space(), options, routing.routing(),
                routing.dRowTokens.as<int32_t>(), {out.device, dt}, path);
            ASSERT_TRUE(s.isOk()) << s.message();
            out.download();
            c.download();
            // Near fp64, every token (those that lost every choice: 0).
            double diff = 0, norm = 0;
            for (int64_t i = 0; i < tc.T * n; ++i) {
              const double v = out.at(i);
              ASSERT_TRUE(std::isfinite(v)) << "token " << i / n;
              diff += (v - want[i]) * (v - want[i]);
              norm += want[i] * want[i];
            }
            EXPECT_LE(std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30), 3e-2);
            if (tc.padded) {
              for (int64_t col = 0; col < n; ++col)
                ASSERT_EQ(out.at((tc.T - 1) * n + col), 0.0)
                    << "the dropped token's column " << col;
            }
            // The two steps apart on the same path: the same bits in out
            // and in every kept row of c.
            ASSERT_TRUE(cuda::detail::groupedGemmWith(
                            *ctx, {a.device, dt}, {b.device, dt}, biasIn,
                            {c2.device, dt}, K, n, routing.space(), options,
                            WriteBuffer{}, path)
                            .isOk());
            ASSERT_TRUE(cuda::combine(*ctx, {c2.device, dt}, n,
                                      routing.routing(), {out2.device, dt})
                            .isOk());
            out2.download();
            c2.download();
            EXPECT_EQ(out.host, out2.host)
                << "out differs from grouped_gemm and combine";
            const size_t element = dt == DType::F32 ? 4 : 2;
            for (int64_t r = 0; r < R; ++r) {
              if (routing.rowTokens[r] >= 0) {
                ASSERT_EQ(std::memcmp(c.host.data() + r * n * element,
                                      c2.host.data() + r * n * element,
                                      n * element),
                          0)
                    << "row " << r << " of c";
              }
            }
          }
        }
      }
  }
  // An output over an input is refused, not computed into garbage.
  TestRouting routing(rng, 8, 4, 2, false);
  ++ctx->generation;
  Buffer a(DType::BF16, routing.rowBound * 64), b(DType::BF16, 4 * 64 * 64);
  Status s = cuda::groupedGemmCombine(
      *ctx, {a.device, DType::BF16}, {b.device, DType::BF16}, ReadBuffer{},
      {a.device, DType::BF16}, 64, 64, routing.space(), GroupedGemmOptions{},
      routing.routing(), routing.dRowTokens.as<int32_t>(),
      {b.device, DType::BF16});
  EXPECT_EQ(s.code(), StatusCode::InvalidArgument);
}

} // namespace
