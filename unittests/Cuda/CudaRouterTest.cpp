//===- CudaRouterTest.cpp - The CUDA router's paths against fp64 ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs both router paths (RouterInternal.h: the few-token kernel
// and the GEMM path) for every storage type of x and wg against an fp64
// product of the stored values, on shapes with T from 1 to past the
// few-token limit, K not a multiple of the vector width and a misaligned x
// (scalar loads). The few-token kernel is held to the rounding bound of its
// summation (fp32 FMA chains of about d / 8 steps, then 8 adds) and must
// give the same bits on every run. Part of FlexCudaKernelsTests.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"
#include "RouterInternal.h"

#include "flex/Runtime/Cuda/CudaKernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>

using namespace flex;
using flex::cuda::detail::RouterPath;
using flex::cudatest::Buffer;

namespace {

struct RouterTypes {
  DType x, wg;
  std::string name() const {
    return std::string(toString(x)) + "_x_" + std::string(toString(wg)) + "_wg";
  }
};

std::vector<RouterTypes> routerTypes() {
  std::vector<RouterTypes> types;
  for (DType x : {DType::BF16, DType::F16, DType::F32})
    for (DType wg : {DType::BF16, DType::F16, DType::F32})
      types.push_back({x, wg});
  return types;
}

struct RouterShape {
  int64_t tokens, width, experts;
  bool misaligned; ///< x starts 2 bytes past a 16-byte boundary
};

class CudaRouterPaths : public ::testing::TestWithParam<RouterTypes> {};

/// Fresh normal tokens, and weights scaled by 1 / sqrt(d) (logits of order
/// one).
void fillRouterInputs(std::mt19937_64 &rng, Buffer &x, Buffer &wg, int64_t d) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> values(x.count), weights(wg.count);
  for (double &v : values)
    v = normal(rng);
  for (double &v : weights)
    v = normal(rng) / std::sqrt(static_cast<double>(d));
  x.set(values);
  wg.set(weights);
}

TEST_P(CudaRouterPaths, MatchFp64) {
  FLEX_SKIP_WITHOUT_CUDA();
  const RouterTypes types = GetParam();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  const RouterShape shapes[] = {
      {1, 2048, 64, false},
      {5, 7, 8, false},
      {33, 1001, 37, false},
      {64, 512, 64, true},
      {129, 3, 300, false},
      {256, 2048, 64, false},
      {512, 264, 100, false},
      {513, 520, 64, false},
      {700, 1000, 8, false},
      // K split over blocks (few token and expert tiles): whole and partial
      // last chunks, a misaligned x.
      {128, 4096, 64, false},
      {3, 1800, 16, true},
      {40, 777, 300, false}};
  std::mt19937_64 rng(17);
  for (const RouterShape &s : shapes) {
    const int64_t T = s.tokens, d = s.width, E = s.experts;
    SCOPED_TRACE("T " + std::to_string(T) + ", d " + std::to_string(d) +
                 ", E " + std::to_string(E) +
                 (s.misaligned ? ", misaligned x" : ""));
    const int64_t skip = s.misaligned ? 1 : 0;
    Buffer x(types.x, T * d + skip), wg(types.wg, d * E);
    fillRouterInputs(rng, x, wg, d);
    // fp64 products of the stored values and the bound of their sums.
    std::vector<double> ref(T * E, 0.0), magnitude(T * E, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) {
        const double xv = x.at(skip + t * d + i);
        for (int64_t e = 0; e < E; ++e) {
          const double product = xv * wg.at(i * E + e);
          ref[t * E + e] += product;
          magnitude[t * E + e] += std::abs(product);
        }
      }
    const size_t xBytes = dtypeSize(types.x);
    ReadBuffer xIn{static_cast<char *>(x.device) + skip * xBytes, types.x};
    ReadBuffer wIn{wg.device, types.wg};
    std::vector<char> fewBits; // the few-token kernel's, split-sum kernel
    for (RouterPath path :
         {RouterPath::FewTokens, RouterPath::FewTokensLastSplit,
          RouterPath::Gemm, RouterPath::Auto}) {
      SCOPED_TRACE(path == RouterPath::FewTokens ? "few-token kernel"
                   : path == RouterPath::FewTokensLastSplit
                       ? "few-token kernel, splits added in the last"
                   : path == RouterPath::Gemm ? "GEMM path"
                                              : "auto");
      Buffer logits(DType::F32, T * E), again(DType::F32, T * E);
      logits.poison();
      again.poison();
      ASSERT_TRUE(cuda::detail::routerWith(*ctx, xIn, wIn, logits.as<float>(),
                                           T, d, E, path)
                      .isOk());
      ASSERT_TRUE(cuda::detail::routerWith(*ctx, xIn, wIn, again.as<float>(), T,
                                           d, E, path)
                      .isOk());
      logits.download();
      again.download();
      // Each warp's FMA chain has at most min(d, 32 * ceil(d / 256)) steps
      // with a product, then 8 adds, then (K split over blocks) at most one
      // add per 256-column chunk: n roundings of at most 2^-24 relative
      // each bound the error by ~n * 2^-24 * sum |x w|. The GEMM path
      // (tensor cores on bf16 parts, or one fp32 chain) is held to 1e-5.
      const int64_t chain =
          std::min<int64_t>(d, 32 * ((d + 255) / 256)) + 8 + (d + 255) / 256;
      const bool few =
          path == RouterPath::FewTokens ||
          path == RouterPath::FewTokensLastSplit ||
          (path == RouterPath::Auto && cuda::detail::routerFewTokensApplies(T));
      const double bound =
          few ? static_cast<double>(chain + 1) * 0x1p-24 : 1e-5;
      double worst = 0.0;
      for (int64_t i = 0; i < T * E; ++i) {
        const double got = logits.hostAs<float>()[i];
        const double error = std::abs(got - ref[i]);
        ASSERT_LE(error, bound * magnitude[i] + 1e-30)
            << "logit " << i << ": " << got << " vs " << ref[i];
        worst = std::max(worst, error / (magnitude[i] + 1e-30));
      }
      if (few) {
        EXPECT_EQ(std::memcmp(logits.host.data(), again.host.data(),
                              logits.host.size()),
                  0)
            << "the few-token kernel is deterministic";
        // Adding the splits in the last block keeps their order and bits
        // (the second call also finds its tickets zero again).
        if (fewBits.empty())
          fewBits.assign(logits.host.begin(), logits.host.end());
        else
          EXPECT_EQ(
              std::memcmp(fewBits.data(), logits.host.data(), fewBits.size()),
              0)
              << "the same bits as the split-sum kernel";
      }
      std::printf("  %s, T %lld d %lld E %lld: worst |error| / sum|xw| %.3g\n",
                  few ? "few-token" : "GEMM", static_cast<long long>(T),
                  static_cast<long long>(d), static_cast<long long>(E), worst);
    }
  }
}

// The few-token kernel's sums (K split over blocks included) follow d alone:
// a token's logits have the same bits in a batch of 8 tokens and of 200.
TEST(CudaRouterFewTokens, LogitsDoNotDependOnTheBatch) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(23);
  for (int64_t d : {264, 2048, 4096}) {
    SCOPED_TRACE("d " + std::to_string(d));
    const int64_t E = 64, big = 200, few = 8;
    Buffer x(DType::BF16, big * d), wg(DType::F32, d * E);
    fillRouterInputs(rng, x, wg, d);
    Buffer all(DType::F32, big * E), part(DType::F32, few * E);
    all.poison();
    part.poison();
    for (auto [tokens, out] : {std::pair{big, &all}, std::pair{few, &part}})
      ASSERT_TRUE(cuda::detail::routerWith(
                      *ctx, {x.device, DType::BF16}, {wg.device, DType::F32},
                      out->as<float>(), tokens, d, E, RouterPath::FewTokens)
                      .isOk());
    all.download();
    part.download();
    EXPECT_EQ(std::memcmp(all.host.data(), part.host.data(), part.host.size()),
              0);
  }
}

// Every tile of the few-token kernel (4, 8, 16 tokens a block) gives the
// rule's bits, with the splits added by the sum kernel or in the last block;
// an unknown tile is refused.
TEST(CudaRouterFewTokens, EveryTileGivesTheSameBits) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(29);
  const int64_t d = 2048, E = 64;
  for (int64_t T : {1, 37, 256}) {
    SCOPED_TRACE("T " + std::to_string(T));
    Buffer x(DType::BF16, T * d), wg(DType::F32, d * E);
    fillRouterInputs(rng, x, wg, d);
    Buffer rule(DType::F32, T * E), tiled(DType::F32, T * E);
    rule.poison();
    ASSERT_TRUE(cuda::detail::routerWith(
                    *ctx, {x.device, DType::BF16}, {wg.device, DType::F32},
                    rule.as<float>(), T, d, E, RouterPath::FewTokens)
                    .isOk());
    rule.download();
    for (int tile : {4, 8, 16})
      for (RouterPath path :
           {RouterPath::FewTokens, RouterPath::FewTokensLastSplit}) {
        SCOPED_TRACE("tile " + std::to_string(tile));
        tiled.poison();
        ASSERT_TRUE(cuda::detail::routerWith(
                        *ctx, {x.device, DType::BF16}, {wg.device, DType::F32},
                        tiled.as<float>(), T, d, E, path, tile)
                        .isOk());
        tiled.download();
        EXPECT_EQ(
            std::memcmp(rule.host.data(), tiled.host.data(), rule.host.size()),
            0);
      }
    Status refused = cuda::detail::routerWith(
        *ctx, {x.device, DType::BF16}, {wg.device, DType::F32},
        tiled.as<float>(), T, d, E, RouterPath::FewTokens, 12);
    EXPECT_EQ(refused.code(), StatusCode::InvalidArgument);
  }
}

INSTANTIATE_TEST_SUITE_P(Types, CudaRouterPaths,
                         ::testing::ValuesIn(routerTypes()),
                         [](const ::testing::TestParamInfo<RouterTypes> &info) {
                           return info.param.name();
                         });

} // namespace
