//===- FitSteps.cpp - Fit each step kind's figures to timed runs ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements fitStepCosts: from the timed steps of real plans, a
// fixed cost and a rate per step kind (docs/CostModel.md, "Calibrating with
// plans"). The generic figures (a copy's bandwidth, a tiny kernel's launch)
// miss what an eager step pays besides its bytes - several kernels, host
// work, a library call's setup - and that is most of a small layer's time.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/Calibrate.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace flex {

namespace {

/// y = alpha + slope * x, least squares weighted by 1 / y^2 (relative
/// error: a small layer's step counts as much as a large one's), with
/// alpha >= 0 and slope > 0. `slope` keeps `fallbackSlope` when the samples
/// cannot tell it (one size, or a fit that goes negative).
void fitLine(const std::vector<std::pair<double, double>> &xy,
             double fallbackSlope, double &alpha, double &slope) {
  double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto &[x, y] : xy) {
    const double w = 1.0 / std::max(1e-12, y * y);
    sw += w, sx += w * x, sy += w * y, sxx += w * x * x, sxy += w * x * y;
  }
  const double det = sw * sxx - sx * sx;
  const double spread = sxx / sw - (sx / sw) * (sx / sw);
  const double meanX = sx / sw;
  bool ok = det > 0 && spread > 1e-6 * meanX * meanX;
  if (ok) {
    slope = (sw * sxy - sx * sy) / det;
    alpha = (sy - slope * sx) / sw;
    ok = slope > 0 && alpha >= 0;
    if (ok)
      return;
    if (slope > 0) {
      // A negative intercept: through the origin.
      alpha = 0;
      slope = sxy / sxx;
      return;
    }
  }
  slope = fallbackSlope;
  alpha = std::max(0.0, (sy - slope * sx) / sw);
}

} // namespace

void collectStepSamples(const CostModel &model, const Plan &plan,
                        int64_t variant, bool backward, int64_t capacity,
                        const std::vector<double> &stepSeconds,
                        std::vector<StepSample> &samples) {
  const Variant &run = plan.variants.at(variant);
  const std::vector<Step> &steps = backward ? run.backward : run.forward;
  const Prediction predicted = model.predict(plan, variant, backward, capacity);
  for (size_t i = 0; i < steps.size() && i < stepSeconds.size(); ++i) {
    if (isCollective(steps[i].op) || !(stepSeconds[i] > 0))
      continue;
    samples.push_back({steps[i].op,
                       model.stepBasis(plan, steps[i], predicted.steps[i].rows,
                                       predicted.steps[i].batchedBlocks),
                       stepSeconds[i]});
  }
}

/// The device kernel's store_combine_slowdown from grouped_gemm_combine's
/// samples on it: each one's time past its launch and predicted GEMM, in
/// units of the combine step it replaces; the median of them (at least 0.1:
/// a GEMM predicted slower than it ran would read as a negative cost).
static void fitStoreCombine(const std::vector<StepSample> &samples,
                            DeviceProfile &profile) {
  DeviceGemmFigures figures = profile.deviceGemmFigures();
  std::vector<double> ratios;
  for (const StepSample &s : samples)
    if (s.op == StepOp::GroupedGemmCombine &&
        s.basis.gemmPath == GemmPath::Device && s.basis.combineSeconds > 0 &&
        s.seconds > 0 && std::isfinite(s.seconds))
      ratios.push_back(
          (s.seconds - figures.launchSeconds - s.basis.gemmSeconds) /
          s.basis.combineSeconds);
  if (ratios.empty())
    return;
  std::sort(ratios.begin(), ratios.end());
  const size_t mid = ratios.size() / 2;
  const double median =
      ratios.size() % 2 ? ratios[mid] : 0.5 * (ratios[mid - 1] + ratios[mid]);
  figures.storeCombineSlowdown = std::max(median, 0.1);
  profile.deviceGemm = figures;
}

void fitStepCosts(const std::vector<StepSample> &samples,
                  DeviceProfile &profile) {
  fitStoreCombine(samples, profile);
  std::map<StepOp, std::vector<const StepSample *>> byOp;
  for (const StepSample &sample : samples)
    if (sample.seconds > 0 && std::isfinite(sample.seconds))
      byOp[sample.op].push_back(&sample);
  for (const auto &[op, group] : byOp) {
    StepCostPoint point;
    point.op = std::string(toString(op));
    point.samples = static_cast<int64_t>(group.size());
    std::vector<std::pair<double, double>> xy;
    const StepCost cost = group.front()->basis.cost;
    switch (cost) {
    case StepCost::Memory: {
      for (const StepSample *s : group)
        xy.emplace_back(s->basis.bytes, s->seconds);
      double slope = 0;
      fitLine(xy, 1.0 / profile.memoryBandwidth, point.alphaSeconds, slope);
      point.bytesPerSecond = 1.0 / slope;
      break;
    }
    case StepCost::RouterGemm:
    case StepCost::ExpertGemm:
    case StepCost::ExpertWgrad:
      // The device-sized kernel's steps have figures of their own
      // (device_gemm); the kind's describe its cuBLAS paths.
      for (const StepSample *s : group)
        if (s->basis.gemmPath != GemmPath::Device)
          xy.emplace_back(s->basis.gemmSeconds,
                          s->seconds - s->basis.passSeconds);
      if (xy.empty())
        continue;
      point.samples = static_cast<int64_t>(xy.size());
      fitLine(xy, 1.0, point.alphaSeconds, point.gemmScale);
      break;
    case StepCost::Launch: {
      double sum = 0;
      for (const StepSample *s : group)
        sum += s->seconds;
      point.alphaSeconds = sum / group.size();
      break;
    }
    default:
      continue; // collectives: per world size, not from one rank's runs
    }
    auto it =
        std::find_if(profile.steps.begin(), profile.steps.end(),
                     [&](const StepCostPoint &p) { return p.op == point.op; });
    if (it != profile.steps.end())
      *it = point;
    else
      profile.steps.push_back(point);
  }
}

} // namespace flex
