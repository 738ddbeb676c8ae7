//===- CudaGateTest.cpp - The CUDA gate against the CPU gate, by shape ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs cuda::gate next to cpu::gate on the shapes its fused path
// takes (E in {8, 32, 64, 256}, k in {1, 2, 6, 8}) and on those around it
// that take the legacy path (E = 1, E > 256, k > 8), with ties, NaN, -inf
// and signed-zero rows, noise on and off, batch-prioritized routing on and
// off and every capacity mode: indices, locations, capacity, offsets and rows
// exactly, scores and gates bit for bit, l_aux to rounding. CudaGatePaths
// runs each pipeline (GateInternal.h: the tile and lane-group token kernels,
// the one-block gate, Auto) on the same shapes at token counts from 1 to
// past the one-block limit, also with every token preferring one expert.
// Part of FlexCudaKernelsTests.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"
#include "GateInternal.h"

#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>

using namespace flex;
using flex::cuda::detail::GatePath;
using flex::cudatest::Buffer;
using flex::cudatest::CpuGateResult;

namespace {

std::vector<double> normals(std::mt19937_64 &rng, size_t count, double std) {
  std::normal_distribution<double> normal(0.0, std);
  std::vector<double> values(count);
  for (double &v : values)
    v = normal(rng);
  return values;
}

/// The gate's shapes of the fused path (2 <= E <= 256, k <= 8) and around
/// it (E = 1, odd E, E > 256 take the legacy path): ties, NaN, -inf and
/// signed-zero rows, noise, batch-prioritized routing, every capacity mode,
/// a token count that leaves a partial block and several location chunks.
struct GateShape {
  int64_t experts, k;
  bool noise, batchPrioritized;
  CapacityMode mode;

  /// Every layout's offsets: padded, ragged and (with noise) aligned.
  DispatchLayout layout() const {
    if (!batchPrioritized)
      return DispatchLayout::Padded;
    return noise ? DispatchLayout::Aligned : DispatchLayout::Ragged;
  }

  std::string name() const {
    std::ostringstream text;
    text << "E" << experts << "_k" << k << (noise ? "_noise" : "")
         << (batchPrioritized ? "_bp" : "") << "_" << toString(mode);
    return text.str();
  }
};

std::vector<GateShape> gateShapes() {
  std::vector<GateShape> shapes;
  const CapacityMode modes[] = {CapacityMode::Fixed, CapacityMode::Dropless,
                                CapacityMode::Bounded};
  int index = 0;
  for (int64_t E : {8, 32, 64, 256})
    for (int64_t k : {1, 2, 6, 8})
      for (bool noise : {false, true})
        for (bool bp : {false, true})
          shapes.push_back({E, k, noise, bp, modes[index++ % 3]});
  for (bool bp : {false, true}) {
    shapes.push_back({37, 3, false, bp, CapacityMode::Dropless});
    shapes.push_back({1, 1, false, bp, CapacityMode::Fixed});
    shapes.push_back({300, 2, true, bp, CapacityMode::Bounded});
    shapes.push_back({16, 12, false, bp, CapacityMode::Fixed});
  }
  return shapes;
}

class CudaGateShapes : public ::testing::TestWithParam<GateShape> {};

TEST_P(CudaGateShapes, MatchTheCpuGate) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GateShape c = GetParam();
  const int64_t T = 1500, E = c.experts, k = std::min(c.k, E);
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(77 + static_cast<uint64_t>(E * 13 + c.k));
  std::vector<double> values = normals(rng, T * E, 1.0);
  // Coarse values: many exact ties within and across rows.
  for (int64_t i = 0; i < T * E; i += 3)
    values[i] = std::round(values[i] * 4.0) / 4.0;
  for (int64_t t = 0; t < T; t += 11) // equal rows: equal priorities
    for (int64_t e = 0; e < E; ++e)
      values[(t + 1) * E + e] = values[t * E + e];
  values[5 * E + E / 2] = NAN;
  for (int64_t e = 0; e < E; ++e) {
    values[17 * E + e] = NAN;
    values[23 * E + e] = -INFINITY;
    values[29 * E + e] = e % 2 ? 0.0 : -0.0;
  }
  Buffer logits(DType::F32, T * E);
  logits.set(values);
  GateAttrs attrs;
  attrs.topK = c.k;
  attrs.capacityMode = c.mode;
  attrs.capacityFactor = 1.25;
  attrs.normalize = true;
  attrs.batchPrioritized = c.batchPrioritized;
  attrs.noise = c.noise ? 1.0 : 0.0;
  attrs.seed = 5;
  attrs.layout = c.layout();
  CpuGateResult ref(logits.hostAs<float>(), T, E, k, attrs);
  Buffer scores(DType::F32, T * E), indices(DType::I32, T * k),
      locations(DType::I32, T * k), gates(DType::F32, T * k),
      capacity(DType::I32, 1), offsets(DType::I32, E + 1), rows(DType::I32, E),
      lAux(DType::F32, 1);
  std::initializer_list<Buffer *> all = {
      &scores, &indices, &locations, &gates, &capacity, &offsets, &rows, &lAux};
  for (Buffer *b : all)
    b->poison();
  // Twice: the second run reuses the scratch the first one grew.
  for (int run = 0; run < 2; ++run) {
    Status status = cuda::gate(*ctx, logits.as<float>(), T, E, attrs,
                               {scores.as<float>(), indices.as<int32_t>(),
                                locations.as<int32_t>(), gates.as<float>(),
                                capacity.as<int32_t>(), offsets.as<int32_t>(),
                                rows.as<int32_t>(), lAux.as<float>()});
    ASSERT_TRUE(status.isOk()) << status.message();
  }
  for (Buffer *b : all)
    b->download();
  auto sameFloat = [](float a, float b) {
    return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b));
  };
  for (int64_t i = 0; i < T * k; ++i) {
    ASSERT_EQ(indices.hostAs<int32_t>()[i], ref.indices[i]) << "slot " << i;
    ASSERT_EQ(locations.hostAs<int32_t>()[i], ref.locations[i]) << "slot " << i;
    ASSERT_TRUE(sameFloat(gates.hostAs<float>()[i], ref.gates[i]))
        << "slot " << i << ": " << gates.hostAs<float>()[i] << " vs "
        << ref.gates[i];
  }
  for (int64_t i = 0; i < T * E; ++i)
    ASSERT_TRUE(sameFloat(scores.hostAs<float>()[i], ref.scores[i]))
        << "score " << i << ": " << scores.hostAs<float>()[i] << " vs "
        << ref.scores[i];
  ASSERT_EQ(capacity.hostAs<int32_t>()[0], ref.capacity);
  for (int64_t e = 0; e <= E; ++e)
    ASSERT_EQ(offsets.hostAs<int32_t>()[e], ref.offsets[e]) << "offset " << e;
  for (int64_t e = 0; e < E; ++e)
    ASSERT_EQ(rows.hostAs<int32_t>()[e], ref.rows[e]) << "rows " << e;
  // The NaN rows make l_aux NaN on both.
  EXPECT_TRUE(std::isnan(lAux.hostAs<float>()[0]) && std::isnan(ref.lAux));
}

/// Without NaN rows l_aux agrees to rounding (fp64 partial sums in another
/// order), on the fused path and the legacy one.
TEST_P(CudaGateShapes, AuxLossMatchesTheCpu) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GateShape c = GetParam();
  const int64_t T = 777, E = c.experts, k = std::min(c.k, E);
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(91 + static_cast<uint64_t>(E));
  Buffer logits(DType::F32, T * E);
  logits.set(normals(rng, T * E, 2.0));
  GateAttrs attrs;
  attrs.topK = c.k;
  attrs.capacityMode = c.mode;
  attrs.batchPrioritized = c.batchPrioritized;
  attrs.noise = c.noise ? 1.0 : 0.0;
  CpuGateResult ref(logits.hostAs<float>(), T, E, k, attrs);
  Buffer scores(DType::F32, T * E), indices(DType::I32, T * k),
      locations(DType::I32, T * k), gates(DType::F32, T * k),
      capacity(DType::I32, 1), offsets(DType::I32, E + 1), rows(DType::I32, E),
      lAux(DType::F32, 1);
  ASSERT_TRUE(cuda::gate(*ctx, logits.as<float>(), T, E, attrs,
                         {scores.as<float>(), indices.as<int32_t>(),
                          locations.as<int32_t>(), gates.as<float>(),
                          capacity.as<int32_t>(), offsets.as<int32_t>(),
                          rows.as<int32_t>(), lAux.as<float>()})
                  .isOk());
  lAux.download();
  locations.download();
  EXPECT_NEAR(lAux.hostAs<float>()[0], ref.lAux, 1e-6 * std::abs(ref.lAux));
  for (int64_t i = 0; i < T * k; ++i)
    ASSERT_EQ(locations.hostAs<int32_t>()[i], ref.locations[i]) << "slot " << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaGateShapes,
                         ::testing::ValuesIn(gateShapes()),
                         [](const ::testing::TestParamInfo<GateShape> &info) {
                           return info.param.name();
                         });

//===----------------------------------------------------------------------===//
// Each pipeline at many token counts
//===----------------------------------------------------------------------===//

struct PathCase {
  GateShape shape;
  GatePath path;

  std::string name() const {
    const char *paths[] = {"Auto",  "Legacy",    "Tile",
                           "Lanes", "LanesScan", "OneBlock"};
    return shape.name() + "_" + paths[static_cast<int>(path)];
  }
};

std::vector<PathCase> pathCases() {
  std::vector<PathCase> cases;
  for (const GateShape &shape : gateShapes())
    for (GatePath path : {GatePath::Auto, GatePath::Tile, GatePath::Lanes,
                          GatePath::LanesScan, GatePath::OneBlock})
      cases.push_back({shape, path});
  return cases;
}

/// Logits [T, E]. Pattern 0: as MatchTheCpuGate (coarse values with ties,
/// equal rows, one NaN, NaN, -inf and signed-zero rows where T reaches
/// them). Pattern 1: every token's first choice is expert E / 3.
std::vector<double> pathLogits(int64_t T, int64_t E, int pattern,
                               uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> values = normals(rng, T * E, pattern == 0 ? 1.0 : 0.5);
  if (pattern == 1) {
    for (int64_t t = 0; t < T; ++t)
      values[t * E + E / 3] += 8.0;
    return values;
  }
  for (int64_t i = 0; i < T * E; i += 3)
    values[i] = std::round(values[i] * 4.0) / 4.0;
  for (int64_t t = 0; t + 1 < T; t += 11)
    for (int64_t e = 0; e < E; ++e)
      values[(t + 1) * E + e] = values[t * E + e];
  if (T > 5)
    values[5 * E + E / 2] = NAN;
  for (int64_t e = 0; e < E; ++e) {
    if (T > 17)
      values[17 * E + e] = NAN;
    if (T > 23)
      values[23 * E + e] = -INFINITY;
    if (T > 29)
      values[29 * E + e] = e % 2 ? 0.0 : -0.0;
  }
  return values;
}

/// The largest T the one-block gate takes for this shape (0: none).
int64_t oneBlockLimit(int64_t E, int64_t k, bool bp) {
  for (int64_t T = 8192; T > 0; --T)
    if (cuda::detail::gateOneBlockApplies(T, E, k, bp))
      return T;
  return 0;
}

/// The largest T whose slots the lane kernel's last block routes (0: none).
int64_t laneRouteLimit(int64_t E, int64_t k, bool bp) {
  for (int64_t T = 8192; T > 0; --T)
    if (cuda::detail::gateLanesRouteApplies(T, E, k, bp))
      return T;
  return 0;
}

class CudaGatePaths : public ::testing::TestWithParam<PathCase> {};

/// Every output against the CPU gate: integers exactly, scores and gates bit
/// for bit (any NaN equals any NaN), l_aux to rounding (NaN where the CPU's
/// is). A path that does not take the shape says Unavailable.
TEST_P(CudaGatePaths, MatchTheCpuGate) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GateShape c = GetParam().shape;
  const GatePath path = GetParam().path;
  const int64_t E = c.experts, k = std::min(c.k, E);
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  GateAttrs attrs;
  attrs.topK = c.k;
  attrs.capacityMode = c.mode;
  attrs.capacityFactor = 1.25;
  attrs.normalize = true;
  attrs.batchPrioritized = c.batchPrioritized;
  attrs.noise = c.noise ? 1.0 : 0.0;
  attrs.seed = 9;
  attrs.layout = c.layout();
  // Around the one-block limit, warps and blocks left partial, several
  // location chunks.
  const int64_t limit = oneBlockLimit(E, c.k, c.batchPrioritized);
  std::vector<int64_t> counts = {1, 7, 33, 256, 257, 600, 1500};
  if (limit > 0) {
    counts.push_back(limit);
    counts.push_back(limit + 1);
  }
  // And around the lane kernel's last-block routing (its ticket is cleared
  // for each call: the calls share the scratch).
  if (const int64_t routed = laneRouteLimit(E, c.k, c.batchPrioritized)) {
    counts.push_back(routed);
    counts.push_back(routed + 1);
  }
  for (int64_t T : counts)
    for (int pattern : {0, 1}) {
      SCOPED_TRACE("T " + std::to_string(T) + ", pattern " +
                   std::to_string(pattern));
      Buffer logits(DType::F32, T * E);
      logits.set(pathLogits(T, E, pattern, 31 + T + 7 * E + pattern));
      Buffer scores(DType::F32, T * E), indices(DType::I32, T * k),
          locations(DType::I32, T * k), gates(DType::F32, T * k),
          capacity(DType::I32, 1), offsets(DType::I32, E + 1),
          rows(DType::I32, E), lAux(DType::F32, 1);
      std::initializer_list<Buffer *> all = {&scores, &indices,  &locations,
                                             &gates,  &capacity, &offsets,
                                             &rows,   &lAux};
      for (Buffer *b : all)
        b->poison();
      Status status = cuda::detail::gateWith(
          *ctx, logits.as<float>(), T, E, attrs,
          {scores.as<float>(), indices.as<int32_t>(), locations.as<int32_t>(),
           gates.as<float>(), capacity.as<int32_t>(), offsets.as<int32_t>(),
           rows.as<int32_t>(), lAux.as<float>()},
          path);
      if (path == GatePath::OneBlock &&
          !cuda::detail::gateOneBlockApplies(T, E, c.k, c.batchPrioritized)) {
        EXPECT_EQ(status.code(), StatusCode::Unavailable);
        continue;
      }
      ASSERT_TRUE(status.isOk()) << status.message();
      CpuGateResult ref(logits.hostAs<float>(), T, E, k, attrs);
      for (Buffer *b : all)
        b->download();
      auto sameFloat = [](float a, float b) {
        return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b));
      };
      for (int64_t i = 0; i < T * k; ++i) {
        ASSERT_EQ(indices.hostAs<int32_t>()[i], ref.indices[i]) << "slot " << i;
        ASSERT_EQ(locations.hostAs<int32_t>()[i], ref.locations[i])
            << "slot " << i;
        ASSERT_TRUE(sameFloat(gates.hostAs<float>()[i], ref.gates[i]))
            << "slot " << i << ": " << gates.hostAs<float>()[i] << " vs "
            << ref.gates[i];
      }
      for (int64_t i = 0; i < T * E; ++i)
        ASSERT_TRUE(sameFloat(scores.hostAs<float>()[i], ref.scores[i]))
            << "score " << i << ": " << scores.hostAs<float>()[i] << " vs "
            << ref.scores[i];
      ASSERT_EQ(capacity.hostAs<int32_t>()[0], ref.capacity);
      for (int64_t e = 0; e <= E; ++e)
        ASSERT_EQ(offsets.hostAs<int32_t>()[e], ref.offsets[e])
            << "offset " << e;
      for (int64_t e = 0; e < E; ++e)
        ASSERT_EQ(rows.hostAs<int32_t>()[e], ref.rows[e]) << "rows " << e;
      const float got = lAux.hostAs<float>()[0];
      if (std::isnan(ref.lAux))
        EXPECT_TRUE(std::isnan(got)) << got;
      else
        EXPECT_NEAR(got, ref.lAux, 1e-6 * std::abs(ref.lAux)) << "l_aux";
    }
}

/// No tokens: capacity, offsets, rows and l_aux (0) as the CPU's.
TEST_P(CudaGatePaths, NoTokens) {
  FLEX_SKIP_WITHOUT_CUDA();
  const GateShape c = GetParam().shape;
  const int64_t E = c.experts;
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  GateAttrs attrs;
  attrs.topK = c.k;
  attrs.capacityMode = c.mode;
  attrs.capacityFactor = 1.25;
  attrs.capacityAlignment = 4;
  attrs.batchPrioritized = c.batchPrioritized;
  Buffer logits(DType::F32, 1), scores(DType::F32, 1), indices(DType::I32, 1),
      locations(DType::I32, 1), gates(DType::F32, 1), capacity(DType::I32, 1),
      offsets(DType::I32, E + 1), rows(DType::I32, E), lAux(DType::F32, 1);
  for (Buffer *b : {&capacity, &offsets, &rows, &lAux})
    b->poison();
  Status status = cuda::detail::gateWith(
      *ctx, logits.as<float>(), 0, E, attrs,
      {scores.as<float>(), indices.as<int32_t>(), locations.as<int32_t>(),
       gates.as<float>(), capacity.as<int32_t>(), offsets.as<int32_t>(),
       rows.as<int32_t>(), lAux.as<float>()},
      GetParam().path);
  if (GetParam().path == GatePath::OneBlock &&
      !cuda::detail::gateOneBlockApplies(0, E, c.k, c.batchPrioritized)) {
    EXPECT_EQ(status.code(), StatusCode::Unavailable);
    return;
  }
  ASSERT_TRUE(status.isOk()) << status.message();
  CpuGateResult ref(logits.hostAs<float>(), 0, E, std::min(c.k, E), attrs);
  for (Buffer *b : {&capacity, &offsets, &rows, &lAux})
    b->download();
  EXPECT_EQ(capacity.hostAs<int32_t>()[0], ref.capacity);
  for (int64_t e = 0; e <= E; ++e)
    ASSERT_EQ(offsets.hostAs<int32_t>()[e], ref.offsets[e]) << "offset " << e;
  for (int64_t e = 0; e < E; ++e)
    ASSERT_EQ(rows.hostAs<int32_t>()[e], ref.rows[e]) << "rows " << e;
  EXPECT_EQ(lAux.hostAs<float>()[0], 0.0f);
}

/// The one-block gate's limits take the decode shapes (T 256, E 64, k 6);
/// Auto prefers it with one token per lane group or prioritized routing.
TEST(CudaGatePathLimits, OneBlockTakesTheDecodeShapes) {
  using cuda::detail::gateOneBlockPreferred;
  EXPECT_TRUE(gateOneBlockPreferred(128, 64, 8, false)); // 128 x 8 lanes
  EXPECT_FALSE(gateOneBlockPreferred(129, 64, 8, false));
  EXPECT_FALSE(gateOneBlockPreferred(256, 64, 6, false));
  EXPECT_TRUE(gateOneBlockPreferred(256, 64, 6, true));
  EXPECT_FALSE(gateOneBlockPreferred(257, 64, 6, true)); // does not apply
  EXPECT_TRUE(gateOneBlockPreferred(1024, 8, 2, false)); // 1 lane a token
  using cuda::detail::gateOneBlockApplies;
  EXPECT_TRUE(gateOneBlockApplies(256, 64, 6, false));
  EXPECT_TRUE(gateOneBlockApplies(256, 64, 6, true));
  EXPECT_TRUE(gateOneBlockApplies(512, 64, 8, false));
  EXPECT_FALSE(gateOneBlockApplies(513, 64, 8, false));
  EXPECT_FALSE(gateOneBlockApplies(257, 64, 6, true));
  EXPECT_TRUE(gateOneBlockApplies(128, 256, 8, false));
  EXPECT_FALSE(gateOneBlockApplies(129, 256, 8, false));
  EXPECT_TRUE(gateOneBlockApplies(4096, 8, 2, false));
  EXPECT_FALSE(gateOneBlockApplies(4096, 8, 4, false)); // T * k > 8192
  EXPECT_FALSE(gateOneBlockApplies(16, 300, 2, false)); // E > 256
  EXPECT_FALSE(gateOneBlockApplies(16, 16, 12, false)); // k > 8
  EXPECT_FALSE(gateOneBlockApplies(16, 1, 1, false));   // E < 2
}

/// The lane kernel's last block routes D1's gate (T 256, E 64, k 6: 1536
/// pairs) up to 2048 pairs, never a prioritized order (it needs the sort).
TEST(CudaGatePathLimits, LaneKernelRoutesDecodeShapes) {
  using cuda::detail::gateLanesRouteApplies;
  EXPECT_TRUE(gateLanesRouteApplies(256, 64, 6, false));
  EXPECT_TRUE(gateLanesRouteApplies(256, 64, 8, false)); // 2048 pairs
  EXPECT_FALSE(gateLanesRouteApplies(257, 64, 8, false));
  EXPECT_TRUE(gateLanesRouteApplies(1, 256, 8, false));
  EXPECT_FALSE(gateLanesRouteApplies(256, 64, 6, true));  // prioritized
  EXPECT_FALSE(gateLanesRouteApplies(0, 64, 6, false));   // no tokens
  EXPECT_FALSE(gateLanesRouteApplies(16, 300, 2, false)); // E > 256
  EXPECT_FALSE(gateLanesRouteApplies(16, 16, 12, false)); // k > 8
}

INSTANTIATE_TEST_SUITE_P(Paths, CudaGatePaths, ::testing::ValuesIn(pathCases()),
                         [](const ::testing::TestParamInfo<PathCase> &info) {
                           return info.param.name();
                         });

} // namespace
