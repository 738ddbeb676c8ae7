//===- CudaKernelsTest.cpp - CUDA kernels against the CPU kernels ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs every CUDA step kernel, forward and backward, next to the
// CPU kernel of the same op on the same fresh random inputs (GPU outputs
// poisoned with NaN first): integer routing must match exactly, float
// results within [num-1]-style tolerances. Cases sweep the dtypes (f32,
// bf16, f16), layouts (padded, ragged), capacity modes, batch-prioritized
// routing, k, alignment, noise and row widths that do and do not allow
// 16-byte vectors. With a static routing (padded, fixed) the padding rows
// must come out zero or finite. The sharded-expert pieces (shard_routing,
// its backward, E * s virtual experts, bias_scale) are tested the same way.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"

#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <sstream>

using namespace flex;
using flex::cudatest::Buffer;
using flex::cudatest::CpuGateResult;

namespace {

struct Case {
  DType dtype;
  DispatchLayout layout;
  CapacityMode mode;
  bool batchPrioritized;
  int64_t k;
  int64_t d;
  int64_t alignment;
  double noise;
  Activation act;

  std::string name() const {
    std::ostringstream text;
    text << toString(dtype) << "_"
         << (layout == DispatchLayout::Padded   ? "padded"
             : layout == DispatchLayout::Ragged ? "ragged"
                                                : "aligned")
         << "_" << toString(mode) << (batchPrioritized ? "_bp" : "") << "_k"
         << k << "_d" << d << "_a" << alignment << (noise != 0 ? "_noise" : "")
         << "_" << toString(act);
    return text.str();
  }
};

std::vector<Case> allCases() {
  std::vector<Case> cases;
  int index = 0;
  for (DType dtype : {DType::F32, DType::BF16, DType::F16})
    for (DispatchLayout layout :
         {DispatchLayout::Padded, DispatchLayout::Ragged,
          DispatchLayout::Aligned})
      for (CapacityMode mode :
           {CapacityMode::Fixed, CapacityMode::Dropless, CapacityMode::Bounded})
        for (bool bp : {false, true}) {
          Case c{dtype,
                 layout,
                 mode,
                 bp,
                 1 + index % 3,
                 index % 2 ? 36 : 64,
                 index % 4 == 0 ? 4 : 1,
                 index % 5 == 0 ? 1.0 : 0.0,
                 static_cast<Activation>(index % 3)};
          cases.push_back(c);
          ++index;
        }
  return cases;
}

constexpr int64_t kTokens = 300, kExperts = 8, kHidden = 96;

std::vector<double> normals(std::mt19937_64 &rng, size_t count, double std) {
  std::normal_distribution<double> normal(0.0, std);
  std::vector<double> values(count);
  for (double &v : values)
    v = normal(rng);
  return values;
}

double tolerance(DType type) { return type == DType::F32 ? 1e-5 : 1e-2; }

/// Relative L2 of the rows in `rowList` (each `width` wide); NaN fails.
double rowError(const Buffer &got, const Buffer &want,
                const std::vector<int64_t> &rowList, int64_t width) {
  double diff = 0, norm = 0;
  for (int64_t row : rowList)
    for (int64_t i = 0; i < width; ++i) {
      double g = got.at(row * width + i), w = want.at(row * width + i);
      if (!std::isfinite(g))
        return INFINITY;
      diff += (g - w) * (g - w);
      norm += w * w;
    }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

std::vector<int64_t> allRows(int64_t count) {
  std::vector<int64_t> rows(count);
  for (int64_t i = 0; i < count; ++i)
    rows[i] = i;
  return rows;
}

class CudaKernels : public ::testing::TestWithParam<Case> {};

TEST_P(CudaKernels, MatchTheCpuKernels) {
  FLEX_SKIP_WITHOUT_CUDA();
  const Case c = GetParam();
  const int64_t T = kTokens, E = kExperts, d = c.d, h = kHidden;
  const int64_t k = std::min(c.k, E);
  const DType dt = c.dtype;
  std::unique_ptr<cuda::KernelContext> ctx;
  Status status = cuda::KernelContext::create(ctx);
  ASSERT_TRUE(status.isOk()) << status.message();
  std::mt19937_64 rng(1234 + static_cast<uint64_t>(c.k * 31 + c.d));

  // Logits with exact ties (every 7th token repeats expert 0's logit), so
  // tie-breaking is exercised; rounded to fp32.
  std::vector<double> logitValues = normals(rng, T * E, 1.0);
  for (int64_t t = 0; t < T; t += 7)
    logitValues[t * E + 3] = logitValues[t * E + 1] = logitValues[t * E];
  Buffer logits(DType::F32, T * E);
  logits.set(logitValues);

  GateAttrs attrs;
  attrs.topK = c.k;
  attrs.capacityMode = c.mode;
  attrs.capacityFactor = 1.0;
  attrs.normalize = true;
  attrs.batchPrioritized = c.batchPrioritized;
  attrs.noise = c.noise;
  attrs.seed = 99;
  attrs.layout = c.layout;
  attrs.capacityAlignment = c.alignment;

  // Row bound of the dispatch buffers, as a plan sizes them.
  int64_t fixedC =
      computeCapacity(CapacityMode::Fixed, 1.0, T, E, k, 0, c.alignment);
  int64_t boundC = c.mode == CapacityMode::Dropless
                       ? (T + c.alignment - 1) / c.alignment * c.alignment
                       : fixedC;
  const int64_t kept = std::min(T * k, E * boundC);
  const int64_t R = c.layout == DispatchLayout::Padded ? E * boundC
                    : c.layout == DispatchLayout::Aligned
                        ? alignedLayoutRows(kept, E, boundC, kAlignedLayoutRows)
                        : kept;
  const bool isStatic =
      c.layout == DispatchLayout::Padded && c.mode == CapacityMode::Fixed;

  // --- gate ---
  CpuGateResult ref(logits.hostAs<float>(), T, E, k, attrs);
  Buffer scores(DType::F32, T * E), indices(DType::I32, T * k),
      locations(DType::I32, T * k), gates(DType::F32, T * k),
      capacity(DType::I32, 1), offsets(DType::I32, E + 1),
      rowsBuf(DType::I32, E), lAux(DType::F32, 1);
  for (Buffer *b : {&scores, &indices, &locations, &gates, &capacity, &offsets,
                    &rowsBuf, &lAux})
    b->poison();
  status = cuda::gate(*ctx, logits.as<float>(), T, E, attrs,
                      {scores.as<float>(), indices.as<int32_t>(),
                       locations.as<int32_t>(), gates.as<float>(),
                       capacity.as<int32_t>(), offsets.as<int32_t>(),
                       rowsBuf.as<int32_t>(), lAux.as<float>()});
  ASSERT_TRUE(status.isOk()) << status.message();
  for (Buffer *b : {&scores, &indices, &locations, &gates, &capacity, &offsets,
                    &rowsBuf, &lAux})
    b->download();
  for (int64_t i = 0; i < T * k; ++i) {
    ASSERT_EQ(indices.hostAs<int32_t>()[i], ref.indices[i]) << "slot " << i;
    ASSERT_EQ(locations.hostAs<int32_t>()[i], ref.locations[i]) << "slot " << i;
    EXPECT_EQ(gates.hostAs<float>()[i], ref.gates[i]) << "slot " << i;
  }
  for (int64_t i = 0; i < T * E; ++i)
    ASSERT_EQ(scores.hostAs<float>()[i], ref.scores[i]) << "score " << i;
  ASSERT_EQ(capacity.hostAs<int32_t>()[0], ref.capacity);
  for (int64_t e = 0; e <= E; ++e)
    ASSERT_EQ(offsets.hostAs<int32_t>()[e], ref.offsets[e]) << "offset " << e;
  for (int64_t e = 0; e < E; ++e)
    ASSERT_EQ(rowsBuf.hostAs<int32_t>()[e], ref.rows[e]) << "rows " << e;
  EXPECT_NEAR(lAux.hostAs<float>()[0], ref.lAux, 1e-6 * std::abs(ref.lAux));
  if (isStatic) {
    ASSERT_EQ(ref.capacity, fixedC);
  }

  Routing cpuRouting{ref.indices.data(),
                     ref.locations.data(),
                     ref.gates.data(),
                     &ref.capacity,
                     ref.offsets.data(),
                     ref.rows.data(),
                     T,
                     k,
                     E};
  Routing gpuRouting{indices.as<int32_t>(),
                     locations.as<int32_t>(),
                     gates.as<float>(),
                     capacity.as<int32_t>(),
                     offsets.as<int32_t>(),
                     rowsBuf.as<int32_t>(),
                     T,
                     k,
                     E};
  ExpertSegments segments = cpuRouting.segments();
  cuda::ExpertRowSpace space;
  space.offsets = offsets.as<int32_t>();
  space.rows = rowsBuf.as<int32_t>();
  space.experts = E;
  space.rowBound = R;
  space.staticCapacity = isStatic ? fixedC : -1;
  // As the backend sets it: a padded layout zeroes its padding rows even
  // when C is known only on the device (all_to_all sends whole blocks).
  space.padded = c.layout == DispatchLayout::Padded;
  space.alignedRows =
      c.layout == DispatchLayout::Aligned ? kAlignedLayoutRows : 0;
  std::vector<int64_t> validRows;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < ref.rows[e]; ++r)
      validRows.push_back(ref.offsets[e] + r);
  std::vector<int64_t> paddingRows;
  if (isStatic)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = ref.rows[e]; r < fixedC; ++r)
        paddingRows.push_back(e * fixedC + r);
  // Dispatch and combine_backward zero the padding rows of each expert's
  // block, [offsets[e] + rows[e], offsets[e + 1]), in any padded layout (up
  // to E * C with this call's C; rows past it are never read). The GEMMs of
  // a dynamic routing leave them alone.
  std::vector<int64_t> blockPaddingRows;
  if (space.padded)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = ref.offsets[e] + ref.rows[e]; r < ref.offsets[e + 1];
           ++r)
        blockPaddingRows.push_back(r);

  // A typed pair: `cpu` for the CPU kernel (host memory), `gpu` poisoned.
  struct Pair {
    Buffer cpu, gpu;
    Pair(DType type, size_t count) : cpu(type, count), gpu(type, count) {
      gpu.poison();
    }
    ReadBuffer cr() { return {cpu.host.data(), cpu.type}; }
    WriteBuffer cw() { return {cpu.host.data(), cpu.type}; }
    ReadBuffer gr() { return {gpu.device, gpu.type}; }
    WriteBuffer gw() { return {gpu.device, gpu.type}; }
  };
  auto input = [&](DType type, size_t count, double std) {
    Pair pair(type, count);
    std::vector<double> values = normals(rng, count, std);
    pair.cpu.set(values);
    pair.gpu.set(values);
    return pair;
  };
  auto expectRows = [&](Pair &pair, const std::vector<int64_t> &rowList,
                        int64_t width, double tol, const char *what) {
    pair.gpu.download();
    EXPECT_LE(rowError(pair.gpu, pair.cpu, rowList, width), tol) << what;
  };
  auto expectZeroRows = [&](Pair &pair, int64_t width, const char *what,
                            const std::vector<int64_t> *rowList = nullptr) {
    for (int64_t row : rowList ? *rowList : paddingRows)
      for (int64_t i = 0; i < width; ++i)
        ASSERT_EQ(pair.gpu.at(row * width + i), 0.0)
            << what << " padding row " << row;
  };
  auto expectFiniteRows = [&](Pair &pair, int64_t width, const char *what) {
    for (int64_t row : paddingRows)
      for (int64_t i = 0; i < width; ++i)
        ASSERT_TRUE(std::isfinite(pair.gpu.at(row * width + i)))
            << what << " padding row " << row;
  };
  const double tol = tolerance(dt);

  // --- dispatch ---
  Pair x = input(dt, T * d, 1.0);
  Pair disp(dt, R * d);
  cpu::dispatch(x.cr(), d, cpuRouting, disp.cw());
  ASSERT_TRUE(
      cuda::dispatch(*ctx, x.gr(), d, gpuRouting, space, disp.gw()).isOk());
  expectRows(disp, validRows, d, 0.0, "dispatch");
  expectZeroRows(disp, d, "dispatch", &blockPaddingRows);

  // --- grouped_gemm with bias, activation and pre ---
  Pair w1 = input(dt, E * d * h, 1.0 / std::sqrt(d));
  Pair b1 = input(dt, E * h, 0.1);
  Pair hid(dt, R * h), hidPre(dt, R * h);
  GroupedGemmOptions fc1;
  fc1.epilogue = toEpilogue(c.act);
  cpu::groupedGemm(disp.cr(), w1.cr(), b1.cr(), hid.cw(), d, h, segments, fc1,
                   hidPre.cw());
  status = cuda::groupedGemm(*ctx, disp.gr(), w1.gr(), b1.gr(), hid.gw(), d, h,
                             space, fc1, hidPre.gw());
  ASSERT_TRUE(status.isOk()) << status.message();
  expectRows(hid, validRows, h, tol, "grouped_gemm c");
  expectRows(hidPre, validRows, h, tol, "grouped_gemm pre");
  expectFiniteRows(hid, h, "grouped_gemm c");

  // --- glu (pre as the gate, c as the up projection) ---
  Pair glued(dt, R * h);
  cpu::glu(hidPre.cr(), hid.cr(), glued.cw(), h, segments);
  ASSERT_TRUE(
      cuda::glu(*ctx, hidPre.gr(), hid.gr(), glued.gw(), h, space).isOk());
  // The GPU's inputs differ from the CPU's by the GEMM's rounding.
  expectRows(glued, validRows, h, tol * 2, "glu");

  // --- grouped_gemm without epilogue, then combine ---
  Pair w2 = input(dt, E * h * d, 1.0 / std::sqrt(h));
  Pair b2 = input(dt, E * d, 0.1);
  Pair y(dt, R * d);
  GroupedGemmOptions fc2;
  cpu::groupedGemm(hid.cr(), w2.cr(), b2.cr(), y.cw(), h, d, segments, fc2);
  ASSERT_TRUE(cuda::groupedGemm(*ctx, hid.gr(), w2.gr(), b2.gr(), y.gw(), h, d,
                                space, fc2)
                  .isOk());
  expectRows(y, validRows, d, tol, "grouped_gemm fc2");
  Pair out(dt, T * d);
  cpu::combine(y.cr(), d, cpuRouting, out.cw());
  ASSERT_TRUE(cuda::combine(*ctx, y.gr(), d, gpuRouting, out.gw()).isOk());
  expectRows(out, allRows(T), d, tol, "combine");

  // --- combine_backward ---
  Pair gradOut = input(dt, T * d, 1.0);
  Pair gradY(dt, R * d);
  Pair gradGates(DType::F32, T * k);
  cpu::combineBackward(gradOut.cr(), y.cr(), d, cpuRouting, gradY.cw(),
                       gradGates.cpu.hostAs<float>());
  ASSERT_TRUE(cuda::combineBackward(*ctx, gradOut.gr(), y.gr(), d, gpuRouting,
                                    space, gradY.gw(),
                                    gradGates.gpu.as<float>())
                  .isOk());
  expectRows(gradY, validRows, d, tol, "combine_backward grad");
  expectZeroRows(gradY, d, "combine_backward grad", &blockPaddingRows);
  expectRows(gradGates, allRows(T * k), 1, tol, "combine_backward gates");

  // --- grouped_gemm_wgrad with grad_bias ---
  Pair gradW2(dt, E * h * d), gradB2(dt, E * d);
  cpu::groupedGemmWgrad(hid.cr(), gradY.cr(), h, d, segments, gradW2.cw(),
                        gradB2.cw());
  ASSERT_TRUE(cuda::groupedGemmWgrad(*ctx, hid.gr(), gradY.gr(), h, d, space,
                                     gradW2.gw(), gradB2.gw())
                  .isOk());
  expectRows(gradW2, allRows(E * h), d, tol, "wgrad");
  expectRows(gradB2, allRows(E), d, tol, "wgrad bias");

  // --- grouped_gemm_wgrad accumulate: a second product adds to the first
  // (the chunks of a pipelined backward). ---
  GroupedGemmWgradOptions sum;
  sum.accumulate = true;
  cpu::groupedGemmWgrad(hid.cr(), gradY.cr(), h, d, segments, gradW2.cw(),
                        gradB2.cw(), sum);
  ASSERT_TRUE(cuda::groupedGemmWgrad(*ctx, hid.gr(), gradY.gr(), h, d, space,
                                     gradW2.gw(), gradB2.gw(),
                                     /*accumulate=*/true)
                  .isOk());
  expectRows(gradW2, allRows(E * h), d, tol, "wgrad accumulate");
  expectRows(gradB2, allRows(E), d, tol, "wgrad bias accumulate");

  // --- grouped_gemm transB (data gradient), activation_backward ---
  Pair gradHid(dt, R * h);
  GroupedGemmOptions dgrad;
  dgrad.transB = true;
  cpu::groupedGemm(gradY.cr(), w2.cr(), {}, gradHid.cw(), d, h, segments,
                   dgrad);
  ASSERT_TRUE(cuda::groupedGemm(*ctx, gradY.gr(), w2.gr(), {}, gradHid.gw(), d,
                                h, space, dgrad)
                  .isOk());
  expectRows(gradHid, validRows, h, tol, "grouped_gemm transB");
  Pair gradPre(dt, R * h);
  cpu::activationBackward(hidPre.cr(), gradHid.cr(), gradPre.cw(), h, segments,
                          c.act);
  ASSERT_TRUE(cuda::activationBackward(*ctx, hidPre.gr(), gradHid.gr(),
                                       gradPre.gw(), h, space, c.act)
                  .isOk());
  expectRows(gradPre, validRows, h, tol * 2, "activation_backward");
  expectZeroRows(gradPre, h, "activation_backward");

  // --- glu_backward ---
  Pair gradGateIn(dt, R * h), gradUpIn(dt, R * h);
  cpu::gluBackward(hidPre.cr(), hid.cr(), gradHid.cr(), gradGateIn.cw(),
                   gradUpIn.cw(), h, segments);
  ASSERT_TRUE(cuda::gluBackward(*ctx, hidPre.gr(), hid.gr(), gradHid.gr(),
                                gradGateIn.gw(), gradUpIn.gw(), h, space)
                  .isOk());
  expectRows(gradGateIn, validRows, h, tol * 2, "glu_backward gate");
  expectRows(gradUpIn, validRows, h, tol * 2, "glu_backward up");

  // --- grouped_gemm accumulate (c += a @ b^T), dispatch_backward ---
  Pair gradDisp(dt, R * d);
  GroupedGemmOptions dgrad1 = dgrad;
  cpu::groupedGemm(gradPre.cr(), w1.cr(), {}, gradDisp.cw(), h, d, segments,
                   dgrad1);
  ASSERT_TRUE(cuda::groupedGemm(*ctx, gradPre.gr(), w1.gr(), {}, gradDisp.gw(),
                                h, d, space, dgrad1)
                  .isOk());
  dgrad1.accumulate = true;
  cpu::groupedGemm(gradGateIn.cr(), w1.cr(), {}, gradDisp.cw(), h, d, segments,
                   dgrad1);
  ASSERT_TRUE(cuda::groupedGemm(*ctx, gradGateIn.gr(), w1.gr(), {},
                                gradDisp.gw(), h, d, space, dgrad1)
                  .isOk());
  expectRows(gradDisp, validRows, d, tol * 2, "grouped_gemm accumulate");
  Pair gradX(dt, T * d);
  cpu::dispatchBackward(gradDisp.cr(), d, cpuRouting, gradX.cw());
  ASSERT_TRUE(
      cuda::dispatchBackward(*ctx, gradDisp.gr(), d, gpuRouting, gradX.gw())
          .isOk());
  expectRows(gradX, allRows(T), d, tol * 2, "dispatch_backward");

  // --- gate_backward (on the CPU's grad_gates, so only the op differs) ---
  Buffer gradGatesIn(DType::F32, T * k);
  gradGatesIn.host = gradGates.cpu.host;
  gradGatesIn.upload();
  Buffer gradLAux(DType::F32, 1);
  gradLAux.set({0.5});
  Pair gradLogits(DType::F32, T * E);
  GateBackwardAttrs backAttrs{c.k, true};
  cpu::gateBackward(gradGates.cpu.hostAs<float>(), gradLAux.hostAs<float>(),
                    ref.scores.data(), cpuRouting, backAttrs,
                    gradLogits.cpu.hostAs<float>());
  ASSERT_TRUE(cuda::gateBackward(*ctx, gradGatesIn.as<float>(),
                                 gradLAux.as<float>(), scores.as<float>(),
                                 gpuRouting, backAttrs,
                                 gradLogits.gpu.as<float>())
                  .isOk());
  expectRows(gradLogits, allRows(T * E), 1, 1e-6, "gate_backward");

  // --- router and router_backward (fp32 router and dtype router) ---
  for (bool routerFp32 : {true, false}) {
    DType wt = routerFp32 ? DType::F32 : dt;
    Pair wg = input(wt, d * E, 1.0 / std::sqrt(d));
    Pair logitsOut(DType::F32, T * E);
    cpu::router(x.cr(), wg.cr(), logitsOut.cpu.hostAs<float>(), T, d, E);
    ASSERT_TRUE(
        cuda::router(*ctx, x.gr(), wg.gr(), logitsOut.gpu.as<float>(), T, d, E)
            .isOk());
    expectRows(logitsOut, allRows(T * E), 1, 1e-5, "router");
    Pair gradXRouter = input(dt, T * d, 1.0); // accumulated into
    Pair gradWg(wt, d * E);
    cpu::routerBackward(x.cr(), wg.cr(), gradLogits.cpu.hostAs<float>(), T, d,
                        E, gradXRouter.cw(), gradWg.cw());
    Buffer gradLogitsIn(DType::F32, T * E);
    gradLogitsIn.host = gradLogits.cpu.host;
    gradLogitsIn.upload();
    ASSERT_TRUE(cuda::routerBackward(*ctx, x.gr(), wg.gr(),
                                     gradLogitsIn.as<float>(), T, d, E,
                                     gradXRouter.gw(), gradWg.gw())
                    .isOk());
    expectRows(gradXRouter, allRows(T), d, tol, "router_backward grad_x");
    expectRows(gradWg, allRows(d), E, tolerance(wt), "router_backward grad_wg");
  }
}

INSTANTIATE_TEST_SUITE_P(AllCases, CudaKernels, ::testing::ValuesIn(allCases()),
                         [](const ::testing::TestParamInfo<Case> &info) {
                           return info.param.name();
                         });

/// NaN logits: indices stay in range and equal the CPU's; the gate of the
/// NaN token is NaN on both.
TEST(CudaGate, NaNLogitsRouteLikeTheCpu) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  const int64_t T = 64, E = 8, k = 2;
  std::mt19937_64 rng(5);
  std::vector<double> values = normals(rng, T * E, 1.0);
  values[3 * E + 2] = NAN;
  for (int64_t e = 0; e < E; ++e)
    values[9 * E + e] = NAN;
  Buffer logits(DType::F32, T * E);
  logits.set(values);
  GateAttrs attrs;
  attrs.topK = k;
  attrs.batchPrioritized = true;
  attrs.capacityMode = CapacityMode::Dropless;
  std::vector<float> cScores(T * E), cGates(T * k);
  std::vector<int32_t> cIndices(T * k), cLocations(T * k), cOffsets(E + 1),
      cRows(E);
  int32_t cCapacity;
  float cLAux;
  cpu::gate(logits.hostAs<float>(), T, E, attrs,
            {cScores.data(), cIndices.data(), cLocations.data(), cGates.data(),
             &cCapacity, cOffsets.data(), cRows.data(), &cLAux});
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
  indices.download();
  locations.download();
  gates.download();
  lAux.download();
  for (int64_t i = 0; i < T * k; ++i) {
    EXPECT_EQ(indices.hostAs<int32_t>()[i], cIndices[i]) << i;
    EXPECT_EQ(locations.hostAs<int32_t>()[i], cLocations[i]) << i;
    EXPECT_EQ(std::isnan(gates.hostAs<float>()[i]), std::isnan(cGates[i]));
  }
  EXPECT_TRUE(std::isnan(lAux.hostAs<float>()[0]));
}

//===----------------------------------------------------------------------===//
// Experts sharded over ranks: shard_routing, virtual experts, bias_scale
//===----------------------------------------------------------------------===//

/// A padded routing of T tokens over E = 3 experts, k = 2, capacity C, as a
/// gate writes it: locations count each expert's slots in order, so experts
/// 0 and 1 (chosen by every token) drop slots past C while expert 2 (every
/// fifth token) leaves padding rows.
struct HandRouting {
  static constexpr int64_t experts = 3, topK = 2;
  int64_t tokens;
  int32_t capacity;
  std::vector<float> gates;
  std::vector<int32_t> indices, locations, offsets, rows;

  HandRouting(std::mt19937_64 &rng, int64_t T, int32_t C)
      : tokens(T), capacity(C), gates(T * topK), indices(T * topK),
        locations(T * topK), offsets(experts + 1), rows(experts) {
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    std::vector<int32_t> count(experts, 0);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t first = static_cast<int32_t>(t % 2);
      const int32_t second = t % 5 == 0 ? 2 : 1 - first;
      for (int64_t j = 0; j < topK; ++j) {
        const int32_t e = j == 0 ? first : second;
        indices[t * topK + j] = e;
        locations[t * topK + j] = count[e]++;
        gates[t * topK + j] = uniform(rng);
      }
    }
    for (int64_t e = 0; e <= experts; ++e)
      offsets[e] = static_cast<int32_t>(e * C);
    for (int64_t e = 0; e < experts; ++e)
      rows[e] = std::min(count[e], C);
  }
  int64_t dropped() const {
    int64_t n = 0;
    for (int32_t location : locations)
      n += location >= capacity;
    return n;
  }
  int64_t paddingRows() const {
    int64_t n = 0;
    for (int32_t r : rows)
      n += capacity - r;
    return n;
  }
  Routing routing() const {
    return {indices.data(), locations.data(), gates.data(), &capacity,
            offsets.data(), rows.data(),      tokens,       topK,
            experts};
  }
};

bool sameBits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// Both directions equal the CPU kernels exactly, on a routing with dropped
// slots (their location kept, >= C), out-of-range locations and a NaN gate,
// for s = 1, 2, 4; every output element is written.
TEST(CudaShardRouting, MatchesTheCpuKernels) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(21);
  HandRouting g(rng, 45, 14);
  const int64_t T = g.tokens, E = g.experts, k = g.topK;
  ASSERT_GT(g.dropped(), 0) << "the routing should drop slots";
  // Locations no gate writes (negative, far past C) are copied as they are,
  // and a NaN gate keeps its bits.
  g.locations[1] = -1;
  g.locations[4] = 1 << 20;
  g.gates[7] = std::numeric_limits<float>::quiet_NaN();
  Buffer indices(DType::I32, T * k), locations(DType::I32, T * k),
      gates(DType::F32, T * k), capacity(DType::I32, 1), rows(DType::I32, E);
  std::memcpy(indices.host.data(), g.indices.data(), 4 * T * k);
  std::memcpy(locations.host.data(), g.locations.data(), 4 * T * k);
  std::memcpy(gates.host.data(), g.gates.data(), 4 * T * k);
  std::memcpy(capacity.host.data(), &g.capacity, 4);
  std::memcpy(rows.host.data(), g.rows.data(), 4 * E);
  for (Buffer *b : {&indices, &locations, &gates, &capacity, &rows})
    b->upload();
  Routing cpuRouting = g.routing();
  Routing gpuRouting{indices.as<int32_t>(),
                     locations.as<int32_t>(),
                     gates.as<float>(),
                     capacity.as<int32_t>(),
                     nullptr,
                     rows.as<int32_t>(),
                     T,
                     k,
                     E};
  for (int64_t s : {1, 2, 4}) {
    SCOPED_TRACE("shards " + std::to_string(s));
    const int64_t V = E * s, K = k * s;
    std::vector<int32_t> cIndices(T * K), cLocations(T * K), cOffsets(V + 1),
        cRows(V);
    std::vector<float> cGates(T * K);
    cpu::shardRouting(cpuRouting, s, cIndices.data(), cLocations.data(),
                      cGates.data(), cOffsets.data(), cRows.data());
    Buffer vIndices(DType::I32, T * K), vLocations(DType::I32, T * K),
        vGates(DType::F32, T * K), vOffsets(DType::I32, V + 1),
        vRows(DType::I32, V);
    for (Buffer *b : {&vIndices, &vLocations, &vGates, &vOffsets, &vRows})
      b->poison();
    Status status = cuda::shardRouting(
        *ctx, gpuRouting, s, vIndices.as<int32_t>(), vLocations.as<int32_t>(),
        vGates.as<float>(), vOffsets.as<int32_t>(), vRows.as<int32_t>());
    ASSERT_TRUE(status.isOk()) << status.message();
    for (Buffer *b : {&vIndices, &vLocations, &vGates, &vOffsets, &vRows})
      b->download();
    for (int64_t i = 0; i < T * K; ++i) {
      ASSERT_EQ(vIndices.hostAs<int32_t>()[i], cIndices[i]) << "slot " << i;
      ASSERT_EQ(vLocations.hostAs<int32_t>()[i], cLocations[i]) << "slot " << i;
      ASSERT_TRUE(sameBits(vGates.hostAs<float>()[i], cGates[i]))
          << "slot " << i;
    }
    for (int64_t v = 0; v <= V; ++v)
      ASSERT_EQ(vOffsets.hostAs<int32_t>()[v], cOffsets[v]) << "offset " << v;
    for (int64_t v = 0; v < V; ++v)
      ASSERT_EQ(vRows.hostAs<int32_t>()[v], cRows[v]) << "rows " << v;

    // Backward: sums of s values in shard order, in fp32, bit for bit.
    std::vector<double> gradValues = normals(rng, T * K, 1.0);
    Buffer shardGrad(DType::F32, T * K), grad(DType::F32, T * k);
    shardGrad.set(gradValues);
    grad.poison();
    std::vector<float> cGrad(T * k);
    cpu::shardRoutingBackward(shardGrad.hostAs<float>(), T, k, s, cGrad.data());
    status = cuda::shardRoutingBackward(*ctx, shardGrad.as<float>(), T, k, s,
                                        grad.as<float>());
    ASSERT_TRUE(status.isOk()) << status.message();
    grad.download();
    for (int64_t i = 0; i < T * k; ++i)
      ASSERT_TRUE(sameBits(grad.hostAs<float>()[i], cGrad[i]))
          << "choice " << i << ": " << grad.hostAs<float>()[i] << " vs "
          << cGrad[i];
  }

  // No shards is a Status, not a launch.
  Buffer one(DType::I32, T * k);
  Status bad = cuda::shardRouting(*ctx, gpuRouting, 0, one.as<int32_t>(),
                                  one.as<int32_t>(), gates.as<float>(),
                                  one.as<int32_t>(), one.as<int32_t>());
  EXPECT_EQ(bad.code(), StatusCode::InvalidArgument);
  EXPECT_NE(bad.message().find("shards is 0"), std::string::npos)
      << bad.message();
  bad = cuda::shardRoutingBackward(*ctx, gates.as<float>(), T, k, -1,
                                   gates.as<float>());
  EXPECT_EQ(bad.code(), StatusCode::InvalidArgument);
}

// The routing shard_routing writes drives dispatch, combine and
// combine_backward over E * s virtual experts (k * s choices) as on the
// CPU, static (C on the host) and padded with C only on the device: every
// row of [0, E * s * C) is written (padding as zeros) over NaN.
TEST(CudaShardRouting, VirtualExpertsDispatchAndCombineLikeTheCpu) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(33);
  HandRouting g(rng, 20, 12);
  ASSERT_GT(g.dropped(), 0) << "the routing should drop slots";
  ASSERT_GT(g.paddingRows(), 0) << "the routing should leave padding rows";
  const int64_t T = g.tokens, E = g.experts, k = g.topK, s = 2, d = 36;
  const int64_t V = E * s, K = k * s;
  const int64_t C = g.capacity, R = V * C;
  Routing gateRouting = g.routing();
  std::vector<int32_t> vIndices(T * K), vLocations(T * K), vOffsets(V + 1),
      vRows(V);
  std::vector<float> vGates(T * K);
  cpu::shardRouting(gateRouting, s, vIndices.data(), vLocations.data(),
                    vGates.data(), vOffsets.data(), vRows.data());
  Routing cpuRouting{vIndices.data(),
                     vLocations.data(),
                     vGates.data(),
                     &g.capacity,
                     vOffsets.data(),
                     vRows.data(),
                     T,
                     K,
                     V};
  auto device = [](DType type, const void *data, size_t count) {
    Buffer buffer(type, count);
    std::memcpy(buffer.host.data(), data, buffer.host.size());
    buffer.upload();
    return buffer;
  };
  Buffer dIndices = device(DType::I32, vIndices.data(), T * K);
  Buffer dLocations = device(DType::I32, vLocations.data(), T * K);
  Buffer dGates = device(DType::F32, vGates.data(), T * K);
  Buffer dCapacity = device(DType::I32, &g.capacity, 1);
  Buffer dOffsets = device(DType::I32, vOffsets.data(), V + 1);
  Buffer dRows = device(DType::I32, vRows.data(), V);
  Routing gpuRouting{dIndices.as<int32_t>(),
                     dLocations.as<int32_t>(),
                     dGates.as<float>(),
                     dCapacity.as<int32_t>(),
                     dOffsets.as<int32_t>(),
                     dRows.as<int32_t>(),
                     T,
                     K,
                     V};

  Buffer x(DType::F32, T * d), gradOut(DType::F32, T * d),
      expertOut(DType::F32, R * d);
  x.set(normals(rng, T * d, 1.0));
  gradOut.set(normals(rng, T * d, 1.0));
  expertOut.set(normals(rng, R * d, 1.0));
  std::vector<float> cDispatched(R * d), cOut(T * d), cGradExpertOut(R * d),
      cGradGates(T * K);
  cpu::dispatch({x.host.data(), DType::F32}, d, cpuRouting,
                {cDispatched.data(), DType::F32});
  cpu::combine({expertOut.host.data(), DType::F32}, d, cpuRouting,
               {cOut.data(), DType::F32});
  cpu::combineBackward({gradOut.host.data(), DType::F32},
                       {expertOut.host.data(), DType::F32}, d, cpuRouting,
                       {cGradExpertOut.data(), DType::F32}, cGradGates.data());

  for (bool isStatic : {true, false}) {
    SCOPED_TRACE(isStatic ? "static" : "padded, C on the device");
    cuda::ExpertRowSpace space;
    space.offsets = dOffsets.as<int32_t>();
    space.rows = dRows.as<int32_t>();
    space.experts = V;
    space.rowBound = R;
    space.staticCapacity = isStatic ? C : -1;
    space.padded = true;
    Buffer dispatched(DType::F32, R * d), out(DType::F32, T * d),
        gradExpertOut(DType::F32, R * d), gradGates(DType::F32, T * K);
    for (Buffer *b : {&dispatched, &out, &gradExpertOut, &gradGates})
      b->poison();
    ASSERT_TRUE(cuda::dispatch(*ctx, {x.device, DType::F32}, d, gpuRouting,
                               space, {dispatched.device, DType::F32})
                    .isOk());
    ASSERT_TRUE(cuda::combine(*ctx, {expertOut.device, DType::F32}, d,
                              gpuRouting, {out.device, DType::F32})
                    .isOk());
    ASSERT_TRUE(cuda::combineBackward(
                    *ctx, {gradOut.device, DType::F32},
                    {expertOut.device, DType::F32}, d, gpuRouting, space,
                    {gradExpertOut.device, DType::F32}, gradGates.as<float>())
                    .isOk());
    for (Buffer *b : {&dispatched, &out, &gradExpertOut, &gradGates})
      b->download();
    // Copies and zeros are exact.
    for (int64_t i = 0; i < R * d; ++i) {
      ASSERT_EQ(dispatched.hostAs<float>()[i], cDispatched[i])
          << "dispatch row " << i / d;
      ASSERT_EQ(gradExpertOut.hostAs<float>()[i], cGradExpertOut[i])
          << "combine_backward row " << i / d;
    }
    for (int64_t i = 0; i < T * d; ++i)
      ASSERT_NEAR(out.hostAs<float>()[i], cOut[i],
                  1e-6 * std::max(1.0f, std::abs(cOut[i])))
          << "combine element " << i;
    for (int64_t i = 0; i < T * K; ++i)
      ASSERT_NEAR(gradGates.hostAs<float>()[i], cGradGates[i],
                  1e-6 * std::max(1.0f, std::abs(cGradGates[i])))
          << "combine_backward gate " << i;
  }
}

// fc2 of a sharded expert adds bias_scale * bias (fp32, before the add), in
// c and pre, static and dynamic, as the CPU kernel; a scale of 1 would not
// pass.
TEST(CudaGroupedGemm, BiasScaleMatchesTheCpu) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(45);
  const int64_t E = 3, C = 8, R = E * C, K = 24, N = 20;
  std::vector<int32_t> offsets = {0, C, 2 * C, 3 * C}, rows = {C, 5, 0};
  Buffer dOffsets(DType::I32, E + 1), dRows(DType::I32, E);
  std::memcpy(dOffsets.host.data(), offsets.data(), 4 * (E + 1));
  std::memcpy(dRows.host.data(), rows.data(), 4 * E);
  dOffsets.upload();
  dRows.upload();
  ExpertSegments segments{offsets.data(), rows.data(), E};
  std::vector<int64_t> validRows;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows[e]; ++r)
      validRows.push_back(offsets[e] + r);
  for (DType dt : {DType::F32, DType::BF16})
    for (float scale : {0.5f, 0.25f})
      for (bool isStatic : {true, false}) {
        SCOPED_TRACE(std::string(toString(dt)) + " scale " +
                     std::to_string(scale) +
                     (isStatic ? " static" : " dynamic"));
        // Zero padding rows, as dispatch leaves them.
        std::vector<double> aValues = normals(rng, R * K, 1.0);
        for (int64_t e = 0; e < E; ++e)
          for (int64_t r = rows[e]; r < C; ++r)
            for (int64_t i = 0; i < K; ++i)
              aValues[(e * C + r) * K + i] = 0.0;
        Buffer a(dt, R * K), b(dt, E * K * N), bias(dt, E * N);
        a.set(aValues);
        b.set(normals(rng, E * K * N, 1.0 / std::sqrt(K)));
        bias.set(normals(rng, E * N, 1.0));
        Buffer cWant(dt, R * N), preWant(dt, R * N), cUnscaled(dt, R * N);
        GroupedGemmOptions options;
        options.epilogue = Epilogue::Gelu;
        options.biasScale = scale;
        cpu::groupedGemm({a.host.data(), dt}, {b.host.data(), dt},
                         {bias.host.data(), dt}, {cWant.host.data(), dt}, K, N,
                         segments, options, {preWant.host.data(), dt});
        GroupedGemmOptions unscaled = options;
        unscaled.biasScale = 1.0f;
        cpu::groupedGemm({a.host.data(), dt}, {b.host.data(), dt},
                         {bias.host.data(), dt}, {cUnscaled.host.data(), dt}, K,
                         N, segments, unscaled);
        cuda::ExpertRowSpace space;
        space.offsets = dOffsets.as<int32_t>();
        space.rows = dRows.as<int32_t>();
        space.experts = E;
        space.rowBound = R;
        space.staticCapacity = isStatic ? C : -1;
        space.padded = true;
        Buffer c(dt, R * N), pre(dt, R * N);
        c.poison();
        pre.poison();
        Status status = cuda::groupedGemm(*ctx, {a.device, dt}, {b.device, dt},
                                          {bias.device, dt}, {c.device, dt}, K,
                                          N, space, options, {pre.device, dt});
        ASSERT_TRUE(status.isOk()) << status.message();
        c.download();
        pre.download();
        const double tol = tolerance(dt);
        EXPECT_LE(rowError(c, cWant, validRows, N), tol);
        EXPECT_LE(rowError(pre, preWant, validRows, N), tol);
        // The scale matters: the unscaled result is far off.
        EXPECT_GT(rowError(c, cUnscaled, validRows, N), 10 * tol);
      }

  // A scale that is not a finite number > 0 is a Status.
  cuda::ExpertRowSpace space;
  space.offsets = dOffsets.as<int32_t>();
  space.rows = dRows.as<int32_t>();
  space.experts = E;
  space.rowBound = R;
  space.staticCapacity = C;
  Buffer a(DType::F32, R * K), b(DType::F32, E * K * N),
      bias(DType::F32, E * N), c(DType::F32, R * N);
  GroupedGemmOptions bad;
  bad.biasScale = 0.0f;
  Status status = cuda::groupedGemm(
      *ctx, {a.device, DType::F32}, {b.device, DType::F32},
      {bias.device, DType::F32}, {c.device, DType::F32}, K, N, space, bad);
  EXPECT_EQ(status.code(), StatusCode::InvalidArgument);
  EXPECT_NE(status.message().find("bias_scale"), std::string::npos)
      << status.message();
}

/// Out of memory is a Status, not an abort.
TEST(CudaBackend, OutOfMemoryIsAStatus) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  void *data = nullptr;
  Status status = ctx->scratch(0, int64_t{1} << 50, data);
  EXPECT_FALSE(status.isOk());
  EXPECT_NE(status.message().find("out of memory"), std::string::npos)
      << status.message();
  // The context keeps working.
  EXPECT_TRUE(ctx->scratch(0, 1024, data).isOk());
}

/// combine and dispatch_backward with more choices than a warp has lanes
/// (k 36: choices past 32 are read directly), several 512-byte chunks per
/// row with a partial last one, the scalar path (d 37), few tokens and
/// dropped slots, in each dtype, against the CPU in the same fp32 order.
TEST(CudaCombine, ManyChoicesAndChunksLikeTheCpu) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<cuda::KernelContext> ctx;
  ASSERT_TRUE(cuda::KernelContext::create(ctx).isOk());
  std::mt19937_64 rng(47);
  const int64_t T = 7, E = 40, k = 36;
  const int32_t C = 5; // about 6.3 slots per expert: some drop
  std::vector<int32_t> indices(T * k), locations(T * k), offsets(E + 1),
      rows(E), count(E, 0);
  std::vector<float> gates(T * k);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<int32_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int32_t e = 0; e < E; ++e)
      order[e] = e;
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t j = 0; j < k; ++j) {
      indices[t * k + j] = order[j];
      locations[t * k + j] = count[order[j]]++;
      gates[t * k + j] = uniform(rng);
    }
  }
  for (int64_t e = 0; e <= E; ++e)
    offsets[e] = static_cast<int32_t>(e * C);
  int64_t dropped = 0;
  for (int64_t e = 0; e < E; ++e) {
    rows[e] = std::min(count[e], C);
    dropped += count[e] - rows[e];
  }
  ASSERT_GT(dropped, 0) << "the routing should drop slots";
  auto device = [](DType type, const void *data, size_t n) {
    Buffer buffer(type, n);
    std::memcpy(buffer.host.data(), data, buffer.host.size());
    buffer.upload();
    return buffer;
  };
  Buffer dIndices = device(DType::I32, indices.data(), T * k);
  Buffer dLocations = device(DType::I32, locations.data(), T * k);
  Buffer dGates = device(DType::F32, gates.data(), T * k);
  Buffer dCapacity = device(DType::I32, &C, 1);
  Buffer dOffsets = device(DType::I32, offsets.data(), E + 1);
  Buffer dRows = device(DType::I32, rows.data(), E);
  Routing cpuRouting{indices.data(),
                     locations.data(),
                     gates.data(),
                     &C,
                     offsets.data(),
                     rows.data(),
                     T,
                     k,
                     E};
  Routing gpuRouting{dIndices.as<int32_t>(),
                     dLocations.as<int32_t>(),
                     dGates.as<float>(),
                     dCapacity.as<int32_t>(),
                     dOffsets.as<int32_t>(),
                     dRows.as<int32_t>(),
                     T,
                     k,
                     E};
  const int64_t R = E * C;
  for (DType dtype : {DType::F32, DType::BF16, DType::F16})
    for (int64_t d : {int64_t{600}, int64_t{37}}) {
      SCOPED_TRACE(std::string(toString(dtype)) + " d " + std::to_string(d));
      Buffer expertOut(dtype, R * d), out(dtype, T * d), gradX(dtype, T * d);
      expertOut.set(normals(rng, R * d, 1.0));
      Buffer cOut(dtype, T * d), cGradX(dtype, T * d);
      cpu::combine({expertOut.host.data(), dtype}, d, cpuRouting,
                   {cOut.host.data(), dtype});
      cpu::dispatchBackward({expertOut.host.data(), dtype}, d, cpuRouting,
                            {cGradX.host.data(), dtype});
      out.poison();
      gradX.poison();
      ASSERT_TRUE(cuda::combine(*ctx, {expertOut.device, dtype}, d, gpuRouting,
                                {out.device, dtype})
                      .isOk());
      ASSERT_TRUE(cuda::dispatchBackward(*ctx, {expertOut.device, dtype}, d,
                                         gpuRouting, {gradX.device, dtype})
                      .isOk());
      out.download();
      gradX.download();
      // The same fp32 operations in the same order: equal up to the last
      // bit of fp32 (the CPU may contract to FMA), then one rounding.
      const double tol = dtype == DType::F32 ? 1e-5 : 1e-2;
      for (int64_t i = 0; i < T * d; ++i) {
        ASSERT_NEAR(out.at(i), cOut.at(i),
                    tol * std::max(1.0, std::abs(cOut.at(i))))
            << "combine element " << i;
        ASSERT_NEAR(gradX.at(i), cGradX.at(i),
                    tol * std::max(1.0, std::abs(cGradX.at(i))))
            << "dispatch_backward element " << i;
      }
    }
}

} // namespace
