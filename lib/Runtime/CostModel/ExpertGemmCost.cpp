//===- ExpertGemmCost.cpp - Which path an expert GEMM takes, and its price
//-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The cost model's expert GEMMs (CostModel.cpp prices the rest): the path
// the backend takes for a grouped GEMM step (batched, per expert, the
// device-sized kernel, a fused step's kernel or its unfused pair), mirroring
// Core/GroupedGemmRule.h, and the device kernel's and per-expert cuBLAS's
// time from the profile (docs/CostModel.md).
//
//===----------------------------------------------------------------------===//

#include "ExpertGemmCost.h"

#include "flex/Runtime/Core/GroupedGemmRule.h"
#include "flex/Runtime/StepSchema.h"

#include <algorithm>
#include <cmath>

namespace flex::costmodel {

bool fusedGluOnDevice(const DeviceProfile &profile,
                      const CostModelOptions &options, DType dtype, int64_t k,
                      int64_t n) {
  return profile.backend == "cuda" && profile.deviceGemmFigures().available &&
         options.groupedGemm != GroupedGemmImpl::Cublas &&
         deviceGemmShapeFits(dtype, k, n);
}

bool isFusedBackward(StepOp op) {
  return op == StepOp::GroupedGemmActivationBackward ||
         op == StepOp::GroupedGemmGluBackward;
}

bool fusedActivationBackwardOnDevice(const DeviceProfile &profile,
                                     const CostModelOptions &options,
                                     DType dtype, int64_t k, int64_t n,
                                     int64_t rows, int64_t groups) {
  return options.wgmmaGemm && fusedGluOnDevice(profile, options, dtype, k, n) &&
         (options.groupedGemm == GroupedGemmImpl::Device ||
          autoFusesBackwardInStore(rows, groups, /*capturing=*/false));
}

int64_t declaredRows(const Step &step, const BufferDesc &a) {
  return std::max<int64_t>(
      0, (a.shape.empty() ? 0 : a.shape.front()) -
             (step.facts.segments.isValid() ? step.facts.segments.baseRow : 0));
}

int64_t fusedBackwardRowsOf(const Step &step, const BufferDesc &a,
                            int64_t groups) {
  const SegmentFacts &seg = step.facts.segments;
  return fusedBackwardRows(seg.isValid() ? seg.rows : step.facts.staticCapacity,
                           groups, declaredRows(step, a));
}

double elementwisePassSeconds(const DeviceProfile &profile, double rows,
                              int64_t n, DType dtype, int tensors) {
  return profile.launchSeconds + tensors * rows * static_cast<double>(n) *
                                     static_cast<double>(dtypeSize(dtype)) /
                                     profile.memoryBandwidth;
}

GemmPath expertGemmPath(const DeviceProfile &profile,
                        const CostModelOptions &options, const Step &step,
                        const BufferDesc &a, int64_t k, int64_t n,
                        int64_t groups) {
  if (step.op == StepOp::GroupedGemmGlu &&
      fusedGluOnDevice(profile, options, a.dtype, k, n))
    return GemmPath::Device;
  if (isFusedBackward(step.op) &&
      fusedActivationBackwardOnDevice(profile, options, a.dtype, k, n,
                                      fusedBackwardRowsOf(step, a, groups),
                                      groups))
    return GemmPath::Device;
  const SegmentFacts &seg = step.facts.segments;
  const bool dynamic =
      seg.isValid() ? seg.rows < 0 : step.facts.staticCapacity < 0;
  if (!dynamic)
    return GemmPath::Batched;
  if (profile.backend != "cuda" || !profile.deviceGemmFigures().available ||
      !deviceGemmShapeFits(a.dtype, k, n))
    return GemmPath::PerExpert;
  // A gather-fused GEMM (row_tokens) follows the rule with its own bound;
  // off the device kernel its rows are copied first (priced in stepBasis).
  const int64_t rowBound = declaredRows(step, a);
  // Not `capturing`: the backend records a dynamic pass only where the
  // rule already sends every GEMM to the kernel (grouped_gemm=device, or
  // auto at decode sizes: CudaBackend::canCapturePass). The host
  // path (PerExpert) is priced by the table's ragged points whether it runs
  // a GEMM per expert or cuBLAS's grouped call (groupedCublasTakes needs
  // the counts, which only the run has).
  return prefersDeviceGemm(options.groupedGemm, rowBound, groups,
                           /*capturing=*/false,
                           getStepKind(step.op).cost == StepCost::ExpertWgrad,
                           options.wgmmaGemm, step.gathersA())
             ? GemmPath::Device
             : GemmPath::PerExpert;
}

double touchedExperts(double rows, int64_t groups) {
  if (rows <= 0 || groups <= 0)
    return 0;
  const double e = static_cast<double>(groups);
  return std::min({e, rows, e * -std::expm1(rows * std::log1p(-1.0 / e))});
}

/// The weight gradient's device kernel walks each expert's rows (its K
/// dimension) in steps of the large tile's BK.
constexpr int64_t kDeviceWgradRowStep = 32;

/// The weight gradient's output tile (DeviceGroupedGemm.cu's large tile).
constexpr int64_t kDeviceWgradTile = 128;

double deviceGemmSeconds(const DeviceProfile &profile, double rows,
                         int64_t groups, int64_t k, int64_t n, DType dtype,
                         int64_t rowBound, bool wgrad, bool wgmma,
                         bool wgmmaTilesOnly, double storeElementsPerRow) {
  const DeviceGemmFigures figures = profile.deviceGemmFigures();
  const double touched = touchedExperts(rows, groups);
  if (touched <= 0)
    return 0;
  // The wgmma kernel runs its 128-row tiles at any rows (the backend takes
  // it over the few-rows tile where it has it: DeviceGroupedGemm.cu's
  // deviceGroupedGemmAutoTiles).
  const DeviceGemmTile tile = wgrad || wgmma || wgmmaTilesOnly
                                  ? DeviceGemmTile::Large
                                  : deviceGemmTile(rowBound, groups);
  const double step = static_cast<double>(wgrad ? kDeviceWgradRowStep
                                                : deviceGemmTileRows(tile));
  const double padded = touched * std::ceil(rows / touched / step) * step;
  const double kn = static_cast<double>(k) * static_cast<double>(n);
  const double rate = tile == DeviceGemmTile::Small
                          ? figures.smallFlopsPerSecond
                      : wgmma ? figures.wgmmaFlopsPerSecond
                              : figures.largeFlopsPerSecond;
  const double element = static_cast<double>(dtypeSize(dtype));
  const double weights = (wgrad ? static_cast<double>(groups) : touched) * kn;
  const double bytes =
      (weights + rows * (static_cast<double>(k + n) + storeElementsPerRow)) *
      element;
  const double tiles =
      wgrad ? static_cast<double>(groups) *
                  std::ceil(static_cast<double>(k) / kDeviceWgradTile) *
                  std::ceil(static_cast<double>(n) / kDeviceWgradTile)
            : 0.0;
  return std::max(
      {2.0 * kn * padded / rate,
       bytes / (figures.weightReadEfficiency * profile.memoryBandwidth),
       tiles * figures.wgradTileSeconds});
}

double stepOnDeviceKernel(const DeviceProfile &profile,
                          const CostModelOptions &options, const Step &step,
                          const BufferDesc &a, double rows, int64_t groups,
                          int64_t k, int64_t n, bool wgrad) {
  const int64_t rowBound = declaredRows(step, a);
  // The wgmma kernel takes the large tiles of the forward and
  // input-gradient products; with a gathered A its cp.async producer runs at
  // about the mma.sync kernel's rate (Run 32: G3's gathered GLU step 5633 us
  // against 2104 with TMA), priced so.
  const bool wgmma = options.wgmmaGemm && !wgrad && !step.gathersA();
  // The backward-fused steps run on the wgmma kernel's tiles alone.
  const bool wgmmaOnly = isFusedBackward(step.op) &&
                         fusedActivationBackwardOnDevice(
                             profile, options, a.dtype, k, n,
                             fusedBackwardRowsOf(step, a, groups), groups);
  const double storeElements = !wgmmaOnly ? 0.0
                               : step.op == StepOp::GroupedGemmGluBackward
                                   ? 3.0 * static_cast<double>(n)
                                   : static_cast<double>(n);
  return deviceGemmSeconds(profile, rows, groups, k, n, a.dtype, rowBound,
                           wgrad, wgmma, wgmmaOnly, storeElements);
}

double cublasPerExpertSeconds(const DeviceProfile &profile, double rows,
                              int64_t groups, int64_t k, int64_t n,
                              DType dtype) {
  const double touched = touchedExperts(rows, groups);
  if (touched <= 0)
    return 0.0;
  const double m = std::max(
      rows / touched, static_cast<double>(profile.gemmMinRows(dtype, true)));
  const double rate = profile.gemmFlopsPerSecond(std::max<int64_t>(1, groups),
                                                 static_cast<int64_t>(m + 0.5),
                                                 n, k, dtype, true);
  const double kn = static_cast<double>(std::max<int64_t>(1, k * n));
  return rate > 0 ? 2.0 * kn * touched * m / rate : 0.0;
}

} // namespace flex::costmodel
