//===- CpuKernelsTest.cpp - Unit tests of the CPU kernels -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the CPU kernels one at a time: the 16-bit conversions, the
// gate noise, [cap-1], LayerConfig's checks, the gate's ties, clamping and
// NaN behaviour, that grouped GEMMs touch only valid rows, and that
// grouped_gemm_glu is two grouped GEMMs and a glu bit for bit.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Core/Half.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace flex;
using namespace flex::cpu;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

//===----------------------------------------------------------------------===//
// bf16 / f16
//===----------------------------------------------------------------------===//

float bits(uint32_t b) { return std::bit_cast<float>(b); }

TEST(Half, Bf16RoundsToNearestEven) {
  EXPECT_EQ(floatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(floatToBf16(bits(0x3f808000)), 0x3f80); // tie, even stays
  EXPECT_EQ(floatToBf16(bits(0x3f818000)), 0x3f82); // tie, odd rounds up
  EXPECT_EQ(floatToBf16(bits(0x3f808001)), 0x3f81); // above the tie
  EXPECT_EQ(floatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(floatToBf16(kInf), 0x7f80);
  EXPECT_EQ(floatToBf16(bits(0x7f7fffff)), 0x7f80); // max float -> inf
  EXPECT_TRUE(std::isnan(bf16ToFloat(floatToBf16(kNaN))));
  EXPECT_TRUE(std::isnan(bf16ToFloat(floatToBf16(bits(0x7f800001)))));
  for (uint32_t b = 0; b < 0x10000; ++b) {
    float v = bf16ToFloat(static_cast<uint16_t>(b));
    if (!std::isnan(v)) {
      ASSERT_EQ(floatToBf16(v), b) << "bf16 round trip of " << b;
    }
  }
}

TEST(Half, F16RoundsToNearestEven) {
  EXPECT_EQ(floatToF16(1.0f), 0x3c00);
  EXPECT_EQ(floatToF16(65504.0f), 0x7bff);
  EXPECT_EQ(floatToF16(65519.0f), 0x7bff);
  EXPECT_EQ(floatToF16(65520.0f), 0x7c00); // tie at max rounds to inf
  EXPECT_EQ(floatToF16(-kInf), 0xfc00);
  EXPECT_EQ(floatToF16(0x1p-24f), 0x0001);         // smallest subnormal
  EXPECT_EQ(floatToF16(0x1p-25f), 0x0000);         // tie to even: 0
  EXPECT_EQ(floatToF16(0x3p-25f), 0x0002);         // tie to even: 2
  EXPECT_EQ(floatToF16(bits(0x3f801000)), 0x3c00); // tie, even stays
  EXPECT_EQ(floatToF16(bits(0x3f803000)), 0x3c02); // tie, odd rounds up
  EXPECT_EQ(floatToF16(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(f16ToFloat(floatToF16(kNaN))));
  EXPECT_EQ(f16ToFloat(0x0001), 0x1p-24f);
  for (uint32_t b = 0; b < 0x10000; ++b) {
    float v = f16ToFloat(static_cast<uint16_t>(b));
    if (!std::isnan(v)) {
      ASSERT_EQ(floatToF16(v), b) << "f16 round trip of " << b;
    }
  }
}

//===----------------------------------------------------------------------===//
// Gate noise, capacity, LayerConfig
//===----------------------------------------------------------------------===//

TEST(GateNoise, IsAPureStandardNormalFunctionOfSeedTokenExpert) {
  EXPECT_EQ(gateNoiseSample(7, 3, 5), gateNoiseSample(7, 3, 5));
  EXPECT_NE(gateNoiseSample(7, 3, 5), gateNoiseSample(8, 3, 5));
  EXPECT_NE(gateNoiseSample(7, 3, 5), gateNoiseSample(7, 5, 3));
  double sum = 0.0, squares = 0.0;
  const int64_t n = 200000;
  for (int64_t i = 0; i < n; ++i) {
    double v = gateNoiseSample(11, i / 64, i % 64);
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
    squares += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(squares / n, 1.0, 0.02);
}

TEST(Capacity, FollowsCap1) {
  // spe = ceil(10 / 4) = 3.
  EXPECT_EQ(computeCapacity(CapacityMode::Fixed, 1.0, 10, 4, 2, 9), 6);
  EXPECT_EQ(computeCapacity(CapacityMode::Fixed, 1.5, 10, 4, 2, 9), 8);
  EXPECT_EQ(computeCapacity(CapacityMode::Dropless, 1.0, 10, 4, 2, 9), 9);
  EXPECT_EQ(computeCapacity(CapacityMode::Bounded, 1.0, 10, 4, 2, 9), 6);
  EXPECT_EQ(computeCapacity(CapacityMode::Bounded, 4.0, 10, 4, 2, 9), 9);
  // The contract's f < 0 spelling of bounded means |f|.
  EXPECT_EQ(computeCapacity(CapacityMode::Bounded, -1.0, 10, 4, 2, 9), 6);
  // int(f * spe) == 0: every slot is dropped.
  EXPECT_EQ(computeCapacity(CapacityMode::Fixed, 0.2, 10, 4, 2, 9), 0);
  // Alignment rounds up.
  EXPECT_EQ(computeCapacity(CapacityMode::Fixed, 1.0, 10, 4, 2, 9, 4), 8);
  EXPECT_EQ(computeCapacity(CapacityMode::Dropless, 1.0, 10, 4, 2, 9, 4), 12);
  EXPECT_EQ(computeCapacity(CapacityMode::Fixed, 0.2, 10, 4, 2, 9, 4), 0);
}

// The one [cap-1] arithmetic is constexpr (the CUDA gate kernel runs it on
// the device) and saturates instead of overflowing.
static_assert(computeCapacity(CapacityMode::Fixed, 1.0, 10, 4, 2, 9) == 6);
static_assert(computeCapacity(CapacityMode::Bounded, 1.0, 10, 4, 2, 5, 4) ==
              8);
static_assert(alignCapacity(7, 1) == 7 && alignCapacity(7, 4) == 8);

TEST(Capacity, SaturatesAndClampsK) {
  // k is clamped to [1, E] as the gate clamps it.
  EXPECT_EQ(fixedCapacity(1.0, 10, 4, 9), 12);
  EXPECT_EQ(fixedCapacity(1.0, 10, 4, 0), 3);
  EXPECT_EQ(fixedCapacity(1.0, 0, 4, 2), 0);
  EXPECT_EQ(fixedCapacity(1e300, 10, 4, 2), kCapacitySaturated);
  EXPECT_EQ(fixedCapacity(std::nan(""), 10, 4, 2), kCapacitySaturated);
  EXPECT_EQ(alignCapacity(kCapacitySaturated - 1, 8), kCapacitySaturated);
  // The loader's bound is the gate's C for the largest possible count, T.
  LayerConfig c;
  c.tokens = 10;
  c.experts = 4;
  c.topK = 2;
  c.capacityMode = CapacityMode::Dropless;
  EXPECT_EQ(alignedCapacityBound(c, 4), 12);
  EXPECT_EQ(alignedCapacityBound(c, 4),
            computeCapacity(c.capacityMode, c.capacityFactor, c.tokens,
                            c.experts, c.topK, c.tokens, 4));
}

LayerConfig validConfig() {
  LayerConfig c;
  c.tokens = 10;
  c.modelDim = 8;
  c.hiddenDim = 16;
  c.experts = 4;
  c.topK = 2;
  return c;
}

TEST(LayerConfigTest, StaticCapacityBound) {
  LayerConfig c = validConfig();
  c.capacityFactor = 1.5;
  EXPECT_EQ(staticCapacityBound(c), 8);
  c.capacityMode = CapacityMode::Dropless;
  EXPECT_EQ(staticCapacityBound(c), 10);
  c.capacityMode = CapacityMode::Bounded;
  EXPECT_EQ(staticCapacityBound(c), 8);
  c.capacityFactor = 4.0; // k * int(4 * 3) = 24 > T
  EXPECT_EQ(staticCapacityBound(c), 10);
}

TEST(LayerConfigTest, VerifyNamesRuleAndValues) {
  EXPECT_EQ(verifyLayerConfig(validConfig()), std::nullopt);
  auto message = [](auto mutate) {
    LayerConfig c = validConfig();
    mutate(c);
    return verifyLayerConfig(c).value_or("<valid>");
  };
  std::string m = message([](LayerConfig &c) { c.topK = 5; });
  EXPECT_NE(m.find("[gate-2]"), std::string::npos) << m;
  EXPECT_NE(m.find("5"), std::string::npos) << m;
  m = message([](LayerConfig &c) { c.capacityFactor = -1.0; });
  EXPECT_NE(m.find("[cap-1]"), std::string::npos) << m;
  EXPECT_NE(m.find("-1"), std::string::npos) << m;
  m = message([](LayerConfig &c) {
    c.capacityMode = CapacityMode::Dropless;
    c.capacityFactor = 0.0;
  });
  EXPECT_EQ(m, "<valid>");
  m = message([](LayerConfig &c) {
    c.expertKind = ExpertKind::Gated;
    c.bias = true;
  });
  EXPECT_NE(m.find("[expert-1]"), std::string::npos) << m;
  m = message([](LayerConfig &c) { c.tokens = 0; });
  EXPECT_NE(m.find("tokens"), std::string::npos) << m;
  m = message([](LayerConfig &c) { c.dtype = DType::I32; });
  EXPECT_NE(m.find("i32"), std::string::npos) << m;
  m = message([](LayerConfig &c) { c.gateNoise = -1.0; });
  EXPECT_NE(m.find("[gate-1]"), std::string::npos) << m;
  m = message([](LayerConfig &c) { c.capacityFactor = 0.3; }); // int(0.9)
  EXPECT_NE(m.find("[cap-1]"), std::string::npos) << m;
  EXPECT_NE(m.find("capacity 0"), std::string::npos) << m;
  m = message([](LayerConfig &c) {
    c.capacityFactor = 1e9;
    c.tokens = 1 << 20;
  });
  EXPECT_NE(m.find("[cap-1]"), std::string::npos) << m;
}

TEST(LayerConfigTest, SpellingsRoundTrip) {
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I32})
    EXPECT_EQ(parseDType(toString(t)), t);
  for (CapacityMode m :
       {CapacityMode::Fixed, CapacityMode::Dropless, CapacityMode::Bounded})
    EXPECT_EQ(parseCapacityMode(toString(m)), m);
  for (ExpertKind k : {ExpertKind::FFN, ExpertKind::Gated})
    EXPECT_EQ(parseExpertKind(toString(k)), k);
  for (Activation a : {Activation::Relu, Activation::Gelu, Activation::Silu})
    EXPECT_EQ(parseActivation(toString(a)), a);
  EXPECT_EQ(parseDType("fp32"), std::nullopt);
  EXPECT_EQ(parseCapacityMode("Fixed"), std::nullopt);
  EXPECT_EQ(dtypeSize(DType::BF16), 2u);
  EXPECT_EQ(dtypeSize(DType::I32), 4u);
}

//===----------------------------------------------------------------------===//
// Gate
//===----------------------------------------------------------------------===//

/// Gate outputs for T tokens, E experts, k choices, poisoned first.
struct GateRun {
  GateRun(int64_t T, int64_t E, int64_t k)
      : scores(T * E, kNaN), indices(T * k, -7), locations(T * k, -7),
        gates(T * k, kNaN), offsets(E + 1, -7), rows(E, -7) {}
  GateOutputs outputs() {
    return {scores.data(), indices.data(), locations.data(), gates.data(),
            &capacity,     offsets.data(), rows.data(),      &lAux};
  }
  std::vector<float> scores;
  std::vector<int32_t> indices, locations;
  std::vector<float> gates;
  int32_t capacity = -7;
  std::vector<int32_t> offsets, rows;
  float lAux = kNaN;
};

// [gate-2] ties go to the lower expert index; k is clamped to E.
TEST(Gate, TiesGoToLowerExpertAndKIsClamped) {
  const int64_t T = 2, E = 3;
  std::vector<float> logits = {1, 1, 1, 0, 2, 2};
  GateAttrs attrs;
  attrs.topK = 5; // clamped to 3
  attrs.capacityMode = CapacityMode::Dropless;
  GateRun run(T, E, 3);
  gate(logits.data(), T, E, attrs, run.outputs());
  EXPECT_EQ(run.indices, (std::vector<int32_t>{0, 1, 2, 1, 2, 0}));
  // Normalized over all E: gates are the scores.
  for (int64_t j = 0; j < 3; ++j)
    EXPECT_NEAR(run.gates[j], 1.0 / 3.0, 1e-7);
  EXPECT_EQ(run.capacity, 2);
  EXPECT_EQ(run.rows, (std::vector<int32_t>{2, 2, 2}));
  EXPECT_EQ(run.offsets, (std::vector<int32_t>{0, 2, 4, 6}));
}

// [loss-1] l_aux = E * sum_e mean_t(scores) * frac_e; balanced routing of
// uniform scores gives 1.
TEST(Gate, AuxLossOfUniformScoresIsOne) {
  const int64_t T = 4, E = 4;
  std::vector<float> logits(T * E, 0.0f);
  GateAttrs attrs;
  GateRun run(T, E, 1);
  gate(logits.data(), T, E, attrs, run.outputs());
  // All first choices go to expert 0 (ties): frac_0 = 1, mean scores 1/4.
  EXPECT_NEAR(run.lAux, 4 * 0.25 * 1.0, 1e-6);
  // spe = 1, C = 1: one slot of expert 0 kept.
  EXPECT_EQ(run.capacity, 1);
  EXPECT_EQ(run.locations, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(run.rows, (std::vector<int32_t>{1, 0, 0, 0}));
  EXPECT_EQ(run.offsets, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  attrs.layout = DispatchLayout::Ragged;
  gate(logits.data(), T, E, attrs, run.outputs());
  EXPECT_EQ(run.offsets, (std::vector<int32_t>{0, 1, 1, 1, 1}));
  // Aligned: each expert's rows rounded up to a 128-row block.
  attrs.layout = DispatchLayout::Aligned;
  gate(logits.data(), T, E, attrs, run.outputs());
  EXPECT_EQ(run.offsets, (std::vector<int32_t>{0, 128, 128, 128, 128}));
  EXPECT_EQ(run.rows, (std::vector<int32_t>{1, 0, 0, 0}));
}

// NaN behaviour (documented in CpuKernels.h): indices stay in range, the
// token's scores and gates are NaN, other tokens are unaffected.
TEST(Gate, NaNLogitsKeepIndicesInRangeAndPropagate) {
  const int64_t T = 3, E = 4, k = 2;
  std::vector<float> logits = {0.5f, 2.0f, kNaN, 1.0f,  // token 0: one NaN
                               kNaN, kNaN, kNaN, kNaN,  // token 1: all NaN
                               3.0f, 0.0f, 1.0f, 2.0f}; // token 2: fine
  for (bool prioritized : {false, true}) {
    GateAttrs attrs;
    attrs.topK = k;
    attrs.capacityMode = CapacityMode::Dropless;
    attrs.batchPrioritized = prioritized;
    GateRun run(T, E, k);
    gate(logits.data(), T, E, attrs, run.outputs());
    for (int32_t index : run.indices) {
      EXPECT_GE(index, 0);
      EXPECT_LT(index, E);
    }
    EXPECT_EQ(run.indices[2], 0); // all-NaN row picks experts 0..k-1
    EXPECT_EQ(run.indices[3], 1);
    EXPECT_EQ(run.indices[4], 0);
    EXPECT_EQ(run.indices[5], 3);
    for (int64_t j = 0; j < 2 * k; ++j)
      EXPECT_TRUE(std::isnan(run.gates[j])) << j;
    EXPECT_FALSE(std::isnan(run.gates[4]));
    EXPECT_FALSE(std::isnan(run.gates[5]));
    EXPECT_TRUE(std::isnan(run.lAux));
    int32_t used = 0;
    for (int64_t e = 0; e < E; ++e)
      used += run.rows[e];
    EXPECT_EQ(used, T * k);
    if (prioritized) {
      // Token 2 has the only real max score: it comes first.
      EXPECT_EQ(run.locations[4], 0);
    }
  }
}

TEST(Gate, NoiseIsDeterministicAndChangesScores) {
  const int64_t T = 5, E = 6;
  std::vector<float> logits(T * E);
  for (int64_t i = 0; i < T * E; ++i)
    logits[i] = 0.1f * static_cast<float>(i % 7);
  GateAttrs attrs;
  attrs.topK = 2;
  attrs.noise = 1.0;
  attrs.seed = 99;
  GateRun a(T, E, 2), b(T, E, 2), c(T, E, 2);
  gate(logits.data(), T, E, attrs, a.outputs());
  gate(logits.data(), T, E, attrs, b.outputs());
  EXPECT_EQ(a.scores, b.scores);
  attrs.noise = 0.0;
  gate(logits.data(), T, E, attrs, c.outputs());
  EXPECT_NE(a.scores, c.scores);
  // The noisy score of (0, 0) is the softmax of logits + N(0,1) / E.
  double z[E], total = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    z[e] = std::exp(logits[e] + gateNoiseSample(99, 0, e) / E);
    total += z[e];
  }
  EXPECT_NEAR(a.scores[0], z[0] / total, 1e-6);
}

//===----------------------------------------------------------------------===//
// Grouped GEMM and data movement
//===----------------------------------------------------------------------===//

// Only valid rows are read or written: padding rows keep their poison and
// a NaN in an unread row never reaches a result.
TEST(GroupedGemm, TouchesOnlyValidRows) {
  const int64_t E = 3, C = 4, K = 5, N = 3;
  std::vector<int32_t> offsets = {0, 4, 8, 12}, rows = {2, 0, 3};
  ExpertSegments seg{offsets.data(), rows.data(), E};
  std::vector<float> a(E * C * K, kNaN), b(E * K * N), bias(E * N);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows[e]; ++r)
      for (int64_t i = 0; i < K; ++i)
        a[(offsets[e] + r) * K + i] = static_cast<float>(e + r - i);
  for (size_t i = 0; i < b.size(); ++i)
    b[i] = 0.25f * static_cast<float>(i % 5) - 0.5f;
  for (size_t i = 0; i < bias.size(); ++i)
    bias[i] = static_cast<float>(i);
  std::vector<float> c(E * C * N, kNaN), pre(E * C * N, kNaN);
  GroupedGemmOptions options;
  options.epilogue = Epilogue::Relu;
  groupedGemm({a.data()}, {b.data()}, {bias.data()}, {c.data()}, K, N, seg,
              options, {pre.data()});
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < C; ++r)
      for (int64_t n = 0; n < N; ++n) {
        int64_t at = (offsets[e] + r) * N + n;
        if (r >= rows[e]) {
          EXPECT_TRUE(std::isnan(c[at]) && std::isnan(pre[at]));
          continue;
        }
        double want = bias[e * N + n];
        for (int64_t i = 0; i < K; ++i)
          want += double(a[(offsets[e] + r) * K + i]) * b[(e * K + i) * N + n];
        EXPECT_NEAR(pre[at], want, 1e-5);
        EXPECT_NEAR(c[at], std::max(want, 0.0), 1e-5);
      }

  // Wgrad writes every expert, zeros for one without rows.
  std::vector<float> gradB(E * K * N, kNaN), gradBias(E * N, kNaN);
  groupedGemmWgrad({a.data()}, {c.data()}, K, N, seg, {gradB.data()},
                   {gradBias.data()});
  for (int64_t i = 0; i < K * N; ++i)
    EXPECT_EQ(gradB[1 * K * N + i], 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    EXPECT_EQ(gradBias[1 * N + n], 0.0f);
    EXPECT_NEAR(gradBias[2 * N + n],
                c[8 * N + n] + c[9 * N + n] + c[10 * N + n], 1e-5);
  }
  for (float v : gradB)
    EXPECT_FALSE(std::isnan(v));
}

// accumulate adds to c, in bf16 storage too; transB reads b as [E, N, K].
TEST(GroupedGemm, AccumulateAndTransposeInBf16) {
  const int64_t E = 2, K = 3, N = 2;
  std::vector<int32_t> offsets = {0, 1, 3}, rows = {1, 2};
  ExpertSegments seg{offsets.data(), rows.data(), E};
  std::vector<uint16_t> a(3 * K), bT(E * N * K), c(3 * N);
  for (size_t i = 0; i < a.size(); ++i)
    a[i] = floatToBf16(static_cast<float>(i) - 4.0f);
  for (size_t i = 0; i < bT.size(); ++i)
    bT[i] = floatToBf16(0.5f * static_cast<float>(i % 4));
  for (size_t i = 0; i < c.size(); ++i)
    c[i] = floatToBf16(1.0f);
  GroupedGemmOptions options;
  options.transB = true;
  options.accumulate = true;
  groupedGemm({a.data(), DType::BF16}, {bT.data(), DType::BF16}, {},
              {c.data(), DType::BF16}, K, N, seg, options);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e] + rows[e]; ++r)
      for (int64_t n = 0; n < N; ++n) {
        float want = 1.0f;
        for (int64_t i = 0; i < K; ++i)
          want +=
              bf16ToFloat(a[r * K + i]) * bf16ToFloat(bT[(e * N + n) * K + i]);
        EXPECT_EQ(c[r * N + n], floatToBf16(want));
      }
}

//===----------------------------------------------------------------------===//
// grouped_gemm_glu
//===----------------------------------------------------------------------===//

/// FLEX_TEST_SEED when set (to replay a failure), else a fresh random seed.
uint64_t runSeed() {
  if (const char *fixed = std::getenv("FLEX_TEST_SEED"))
    return std::strtoull(fixed, nullptr, 10);
  return std::random_device{}();
}

/// A bf16 or f16 buffer: its bits and their values.
struct HalfBuffer {
  DType type;
  std::vector<uint16_t> bits;

  HalfBuffer(DType type, size_t count, float fill = kNaN)
      : type(type), bits(count, encode(type, fill)) {}
  static uint16_t encode(DType type, float v) {
    return type == DType::BF16 ? floatToBf16(v) : floatToF16(v);
  }
  double at(size_t i) const {
    return type == DType::BF16 ? bf16ToFloat(bits[i]) : f16ToFloat(bits[i]);
  }
  void set(size_t i, float v) { bits[i] = encode(type, v); }
  ReadBuffer read() const { return {bits.data(), type}; }
  WriteBuffer write() { return {bits.data(), type}; }
  bool sameBits(const HalfBuffer &other) const { return bits == other.bits; }
};

/// One grouped_gemm_glu problem: the row space (ragged, or padded blocks of
/// C rows), and a's rows (its own, or gathered from x [T, K]).
struct GluCase {
  DType type;
  bool padded, gathered, keep;
  int64_t E, K, N, T, R;
  std::vector<int32_t> offsets, rows, rowTokens;

  ExpertSegments segments() const { return {offsets.data(), rows.data(), E}; }
  RowGather gather() const {
    return gathered ? RowGather{rowTokens.data(), T} : RowGather{};
  }
  bool valid(int64_t row) const {
    for (int64_t e = 0; e < E; ++e)
      if (row >= offsets[e] && row < offsets[e] + rows[e])
        return true;
    return false;
  }
};

GluCase makeGluCase(std::mt19937_64 &rng, DType type, bool padded,
                    bool gathered, bool keep, bool large) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  GluCase g{type, padded, gathered, keep};
  g.E = pick(1, 6);
  g.K = large ? 64 : pick(1, 24);
  g.N = large ? 256 : pick(1, 24);
  g.T = pick(1, 30);
  const int64_t most = large ? 120 : 8;
  g.offsets.assign(g.E + 1, 0);
  g.rows.assign(g.E, 0);
  const int64_t C = pick(1, most);
  for (int64_t e = 0; e < g.E; ++e) {
    // Some experts get no rows, a padded block some of its C.
    g.rows[e] = static_cast<int32_t>(pick(0, 2) == 0 ? 0 : pick(0, C));
    g.offsets[e + 1] =
        static_cast<int32_t>(padded ? (e + 1) * C : g.offsets[e] + g.rows[e]);
  }
  // A ragged buffer's rows past the kept ones (its T * k bound).
  g.R = g.offsets[g.E] + (padded ? 0 : pick(0, 3));
  g.rowTokens.assign(g.R, -1);
  for (int64_t r = 0; r < g.R; ++r)
    if (g.valid(r))
      g.rowTokens[r] = static_cast<int32_t>(pick(0, g.T - 1));
  return g;
}

/// An element's squared scale in a relative L2 error: its magnitude, but
/// at least the dtype's smallest normal - below it (f16: 2^-14) a value is
/// rounded to an absolute step (2^-24), not a relative one, so a product of
/// small f16 values is not within 2^-11 of its own size (a K = 1 case of
/// GroupedGemmGlu whose outputs were about 1e-6 measured 4e-3 against f16's
/// 2e-3 with every bit equal to the unfused path's).
double squaredScale(DType type, double want) {
  const double smallestNormal = type == DType::F16 ? 0x1p-14 : 0x1p-126;
  const double scale = std::max(std::abs(want), smallestNormal);
  return scale * scale;
}

std::string describe(const GluCase &g) {
  return std::string(toString(g.type)) + (g.padded ? " padded" : " ragged") +
         (g.gathered ? " gathered" : "") + (g.keep ? " gate_in/up_in" : "") +
         " E=" + std::to_string(g.E) + " K=" + std::to_string(g.K) +
         " N=" + std::to_string(g.N) + " R=" + std::to_string(g.R);
}

// grouped_gemm_glu is bit for bit two grouped_gemm and a glu (what the
// unfused plan computes), on every row space, gathered or not, keeping its
// products or not; it writes the valid rows alone, and is within the
// dtype's rounding of an fp64 reference.
TEST(GroupedGemmGlu, EqualsTwoGemmsAndAGluAndTheReference) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  int cases = 0;
  for (DType type : {DType::BF16, DType::F16})
    for (bool padded : {false, true})
      for (bool gathered : {false, true})
        for (bool keep : {false, true})
          for (int repeat = 0; repeat < 4; ++repeat) {
            const GluCase g = makeGluCase(rng, type, padded, gathered, keep,
                                          /*large=*/repeat == 0);
            SCOPED_TRACE(describe(g));
            const int64_t E = g.E, K = g.K, N = g.N;
            // a: x [T, K] when gathered, else [R, K] with NaN in the rows
            // no expert owns (never read).
            const int64_t aRows = g.gathered ? g.T : g.R;
            HalfBuffer a(type, aRows * K), b(type, E * K * N),
                bUp(type, E * K * N);
            for (int64_t r = 0; r < aRows; ++r)
              if (g.gathered || g.valid(r))
                for (int64_t i = 0; i < K; ++i)
                  a.set(r * K + i, uniform(rng));
            for (size_t i = 0; i < b.bits.size(); ++i) {
              b.set(i, uniform(rng));
              bUp.set(i, uniform(rng));
            }
            HalfBuffer c(type, g.R * N), gate(type, g.R * N), up(type, g.R * N);
            groupedGemmGlu(a.read(), b.read(), bUp.read(), c.write(), K, N,
                           g.segments(), g.keep ? gate.write() : WriteBuffer{},
                           g.keep ? up.write() : WriteBuffer{}, g.gather());
            HalfBuffer c2(type, g.R * N), gate2(type, g.R * N),
                up2(type, g.R * N);
            groupedGemm(a.read(), b.read(), {}, gate2.write(), K, N,
                        g.segments(), {}, {}, g.gather());
            groupedGemm(a.read(), bUp.read(), {}, up2.write(), K, N,
                        g.segments(), {}, {}, g.gather());
            glu(gate2.read(), up2.read(), c2.write(), N, g.segments());
            EXPECT_TRUE(c.sameBits(c2))
                << "c differs from grouped_gemm x2 + glu";
            if (g.keep) {
              EXPECT_TRUE(gate.sameBits(gate2)) << "gate_in";
              EXPECT_TRUE(up.sameBits(up2)) << "up_in";
            }
            // The fp64 reference over the valid rows; the other rows keep
            // their NaN.
            double error = 0, norm = 0;
            for (int64_t e = 0; e < E; ++e)
              for (int64_t r = g.offsets[e]; r < g.offsets[e] + g.rows[e];
                   ++r) {
                const int64_t aRow = g.gathered ? g.rowTokens[r] : r;
                for (int64_t j = 0; j < N; ++j) {
                  double gv = 0, uv = 0;
                  for (int64_t i = 0; i < K; ++i) {
                    gv += a.at(aRow * K + i) * b.at((e * K + i) * N + j);
                    uv += a.at(aRow * K + i) * bUp.at((e * K + i) * N + j);
                  }
                  const double want = gv / (1.0 + std::exp(-gv)) * uv;
                  const double got = c.at(r * N + j);
                  ASSERT_TRUE(std::isfinite(got)) << "row " << r;
                  error += (got - want) * (got - want);
                  norm += squaredScale(type, want);
                }
              }
            for (int64_t r = 0; r < g.R; ++r)
              if (!g.valid(r))
                for (int64_t j = 0; j < N; ++j) {
                  EXPECT_TRUE(std::isnan(c.at(r * N + j))) << "row " << r;
                  if (g.keep) {
                    EXPECT_TRUE(std::isnan(gate.at(r * N + j)) &&
                                std::isnan(up.at(r * N + j)))
                        << "row " << r;
                  }
                }
            // Each product and c rounded once to the dtype (2^-9 for bf16,
            // 2^-12 for f16, relative).
            const double tolerance = type == DType::BF16 ? 1e-2 : 2e-3;
            if (norm > 0) {
              EXPECT_LE(std::sqrt(error / norm), tolerance);
            }
            ++cases;
          }
  EXPECT_EQ(cases, 64);
}

/// fp64 derivatives of the activations (GELU's exact erf form).
double derivativeOf(Activation act, double x) {
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

// grouped_gemm_activation_backward is bit for bit grouped_gemm (no
// epilogue) followed by activation_backward, for each activation, b read
// transposed or not, on padded and ragged row spaces; it writes the valid
// rows alone, and is within the dtype's rounding of an fp64 reference.
TEST(GroupedGemmActivationBackward, EqualsGemmAndActivationBackward) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  int cases = 0;
  for (DType type : {DType::BF16, DType::F16})
    for (bool padded : {false, true})
      for (bool transB : {false, true})
        for (Activation act :
             {Activation::Relu, Activation::Gelu, Activation::Silu})
          for (int repeat = 0; repeat < 2; ++repeat) {
            const GluCase g = makeGluCase(rng, type, padded, false, false,
                                          /*large=*/repeat == 0);
            SCOPED_TRACE(describe(g) + (transB ? " trans_b" : "") +
                         " activation " +
                         std::to_string(static_cast<int>(act)));
            const int64_t E = g.E, K = g.K, N = g.N;
            HalfBuffer a(type, g.R * K), b(type, E * K * N), pre(type, g.R * N);
            for (int64_t r = 0; r < g.R; ++r)
              if (g.valid(r)) {
                for (int64_t i = 0; i < K; ++i)
                  a.set(r * K + i, uniform(rng));
                for (int64_t j = 0; j < N; ++j)
                  pre.set(r * N + j, 2.0f * uniform(rng));
              }
            for (size_t i = 0; i < b.bits.size(); ++i)
              b.set(i, uniform(rng));
            HalfBuffer c(type, g.R * N), product(type, g.R * N),
                c2(type, g.R * N);
            groupedGemmActivationBackward(a.read(), b.read(), pre.read(),
                                          c.write(), K, N, g.segments(), transB,
                                          act);
            GroupedGemmOptions options;
            options.transB = transB;
            groupedGemm(a.read(), b.read(), {}, product.write(), K, N,
                        g.segments(), options);
            activationBackward(pre.read(), product.read(), c2.write(), N,
                               g.segments(), act);
            EXPECT_TRUE(c.sameBits(c2))
                << "differs from grouped_gemm + activation_backward";
            double error = 0, norm = 0;
            for (int64_t e = 0; e < E; ++e)
              for (int64_t r = g.offsets[e]; r < g.offsets[e] + g.rows[e]; ++r)
                for (int64_t j = 0; j < N; ++j) {
                  double p = 0;
                  for (int64_t i = 0; i < K; ++i)
                    p += a.at(r * K + i) * b.at(transB ? (e * N + j) * K + i
                                                       : (e * K + i) * N + j);
                  const double want = p * derivativeOf(act, pre.at(r * N + j));
                  const double got = c.at(r * N + j);
                  ASSERT_TRUE(std::isfinite(got)) << "row " << r;
                  error += (got - want) * (got - want);
                  norm += squaredScale(type, want);
                }
            for (int64_t r = 0; r < g.R; ++r)
              if (!g.valid(r))
                for (int64_t j = 0; j < N; ++j) {
                  EXPECT_TRUE(std::isnan(c.at(r * N + j))) << "row " << r;
                }
            const double tolerance = type == DType::BF16 ? 1e-2 : 2e-3;
            if (norm > 0) {
              EXPECT_LE(std::sqrt(error / norm), tolerance);
            }
            ++cases;
          }
  EXPECT_EQ(cases, 48);
}

// grouped_gemm_glu_backward is bit for bit grouped_gemm (no epilogue)
// followed by glu_backward, b read transposed or not, on padded and ragged
// row spaces; it writes the valid rows alone, and is within the dtype's
// rounding of an fp64 reference.
TEST(GroupedGemmGluBackward, EqualsGemmAndGluBackward) {
  const uint64_t seed = runSeed();
  std::cout << "[ seed     ] FLEX_TEST_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  int cases = 0;
  for (DType type : {DType::BF16, DType::F16})
    for (bool padded : {false, true})
      for (bool transB : {false, true})
        for (int repeat = 0; repeat < 3; ++repeat) {
          const GluCase g = makeGluCase(rng, type, padded, false, false,
                                        /*large=*/repeat == 0);
          SCOPED_TRACE(describe(g) + (transB ? " trans_b" : ""));
          const int64_t E = g.E, K = g.K, N = g.N;
          HalfBuffer a(type, g.R * K), b(type, E * K * N), gate(type, g.R * N),
              up(type, g.R * N);
          for (int64_t r = 0; r < g.R; ++r)
            if (g.valid(r)) {
              for (int64_t i = 0; i < K; ++i)
                a.set(r * K + i, uniform(rng));
              for (int64_t j = 0; j < N; ++j) {
                gate.set(r * N + j, 2.0f * uniform(rng));
                up.set(r * N + j, uniform(rng));
              }
            }
          for (size_t i = 0; i < b.bits.size(); ++i)
            b.set(i, uniform(rng));
          HalfBuffer gradGate(type, g.R * N), gradUp(type, g.R * N),
              product(type, g.R * N), gradGate2(type, g.R * N),
              gradUp2(type, g.R * N);
          groupedGemmGluBackward(a.read(), b.read(), gate.read(), up.read(),
                                 gradGate.write(), gradUp.write(), K, N,
                                 g.segments(), transB);
          GroupedGemmOptions options;
          options.transB = transB;
          groupedGemm(a.read(), b.read(), {}, product.write(), K, N,
                      g.segments(), options);
          gluBackward(gate.read(), up.read(), product.read(), gradGate2.write(),
                      gradUp2.write(), N, g.segments());
          EXPECT_TRUE(gradGate.sameBits(gradGate2)) << "grad_gate_in";
          EXPECT_TRUE(gradUp.sameBits(gradUp2)) << "grad_up_in";
          double error = 0, norm = 0;
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = g.offsets[e]; r < g.offsets[e] + g.rows[e]; ++r)
              for (int64_t j = 0; j < N; ++j) {
                double d = 0;
                for (int64_t i = 0; i < K; ++i)
                  d += a.at(r * K + i) *
                       b.at(transB ? (e * N + j) * K + i : (e * K + i) * N + j);
                const double x = gate.at(r * N + j), u = up.at(r * N + j);
                const double s = 1.0 / (1.0 + std::exp(-x));
                const double wantGate = d * u * s * (1.0 + x * (1.0 - s));
                const double wantUp = d * x * s;
                for (auto [got, want] :
                     {std::pair{gradGate.at(r * N + j), wantGate},
                      std::pair{gradUp.at(r * N + j), wantUp}}) {
                  ASSERT_TRUE(std::isfinite(got)) << "row " << r;
                  error += (got - want) * (got - want);
                  norm += squaredScale(type, want);
                }
              }
          for (int64_t r = 0; r < g.R; ++r)
            if (!g.valid(r))
              for (int64_t j = 0; j < N; ++j) {
                EXPECT_TRUE(std::isnan(gradGate.at(r * N + j)) &&
                            std::isnan(gradUp.at(r * N + j)))
                    << "row " << r;
              }
          const double tolerance = type == DType::BF16 ? 1e-2 : 2e-3;
          if (norm > 0) {
            EXPECT_LE(std::sqrt(error / norm), tolerance);
          }
          ++cases;
        }
  EXPECT_EQ(cases, 24);
}

// Combine writes every row; a token whose slots are all dropped gets zeros,
// and combine_backward gives dropped slots a zero gate gradient.
TEST(Combine, DroppedTokensGetZerosAndZeroGateGradients) {
  const int64_t T = 3, k = 2, E = 2, d = 2;
  std::vector<int32_t> indices = {0, 1, 1, 0, 0, 1};
  std::vector<int32_t> locations = {0, 0, 1, 1, 2, 2};
  std::vector<float> gates = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  int32_t capacity = 2;
  std::vector<int32_t> offsets = {0, 2, 4}, rows = {2, 2};
  Routing routing{indices.data(),
                  locations.data(),
                  gates.data(),
                  &capacity,
                  offsets.data(),
                  rows.data(),
                  T,
                  k,
                  E};
  std::vector<float> y = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> out(T * d, kNaN);
  combine({y.data()}, d, routing, {out.data()});
  EXPECT_EQ(out, (std::vector<float>{0.6f * 1 + 0.4f * 5, 0.6f * 2 + 0.4f * 6,
                                     0.7f * 7 + 0.3f * 3, 0.7f * 8 + 0.3f * 4,
                                     0, 0}));
  std::vector<float> gradOut = {1, 1, 1, 1, 1, 1}, gradY(4 * d, kNaN),
                     gradGates(T * k, kNaN);
  combineBackward({gradOut.data()}, {y.data()}, d, routing, {gradY.data()},
                  gradGates.data());
  EXPECT_EQ(gradGates, (std::vector<float>{3, 11, 15, 7, 0, 0}));
  for (float v : gradY)
    EXPECT_FALSE(std::isnan(v)); // every valid row is some kept slot's
  std::vector<float> x = {1, 2, 3, 4, 5, 6}, disp(4 * d, kNaN),
                     gradX(T * d, kNaN);
  dispatch({x.data()}, d, routing, {disp.data()});
  EXPECT_EQ(disp, (std::vector<float>{1, 2, 3, 4, 1, 2, 3, 4}));
  dispatchBackward({disp.data()}, d, routing, {gradX.data()});
  EXPECT_EQ(gradX, (std::vector<float>{2, 4, 6, 8, 0, 0}));
}

#ifdef _OPENMP
// Results do not depend on the number of threads (outside BLAS).
TEST(Threads, GateCombineAndGateBackwardAreThreadCountInvariant) {
  const int64_t T = 2000, E = 16, k = 3, d = 24;
  std::vector<float> logits(T * E), x(T * d), gradOut(T * d);
  for (int64_t i = 0; i < T * E; ++i)
    logits[i] = std::sin(0.37f * static_cast<float>(i));
  for (int64_t i = 0; i < T * d; ++i) {
    x[i] = std::cos(0.11f * static_cast<float>(i));
    gradOut[i] = std::sin(0.05f * static_cast<float>(i));
  }
  auto runAll = [&](int threads) {
    omp_set_num_threads(threads);
    GateAttrs attrs;
    attrs.topK = k;
    attrs.capacityMode = CapacityMode::Fixed;
    attrs.batchPrioritized = true;
    attrs.noise = 0.5;
    GateRun run(T, E, k);
    gate(logits.data(), T, E, attrs, run.outputs());
    Routing routing{run.indices.data(),
                    run.locations.data(),
                    run.gates.data(),
                    &run.capacity,
                    run.offsets.data(),
                    run.rows.data(),
                    T,
                    k,
                    E};
    int64_t R = int64_t{run.offsets[E]};
    std::vector<float> disp(R * d, kNaN), out(T * d, kNaN),
        gradGates(T * k, kNaN), gradY(R * d, kNaN), gradLogits(T * E, kNaN);
    dispatch({x.data()}, d, routing, {disp.data()});
    combine({disp.data()}, d, routing, {out.data()});
    combineBackward({gradOut.data()}, {disp.data()}, d, routing, {gradY.data()},
                    gradGates.data());
    float gradLAux = 0.3f;
    gateBackward(gradGates.data(), &gradLAux, run.scores.data(), routing,
                 {k, true}, gradLogits.data());
    std::vector<float> all = run.scores;
    all.insert(all.end(), out.begin(), out.end());
    all.insert(all.end(), gradLogits.begin(), gradLogits.end());
    all.push_back(run.lAux);
    return std::make_pair(all, run.locations);
  };
  int saved = omp_get_max_threads();
  auto one = runAll(1);
  auto four = runAll(4);
  omp_set_num_threads(saved);
  EXPECT_EQ(one.second, four.second);
  ASSERT_EQ(one.first.size(), four.first.size());
  EXPECT_EQ(std::memcmp(one.first.data(), four.first.data(),
                        one.first.size() * sizeof(float)),
            0);
}
#endif

} // namespace
