//===- Calibrate.h - Measure a device profile -------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// Calibration: measures the figures of a DeviceProfile on this machine
// (docs/CostModel.md, "Calibration"). The CPU backend's calibration runs the
// CPU kernels' public API (Cpu/CpuKernels.h) and, given a host communicator,
// the collectives, so the whole path runs in CI. `moe-run --calibrate`
// wraps it. The CUDA backend's calibration (calibrateCuda) runs the CUDA
// kernels' grouped GEMM, a device copy and a tiny step on the current GPU.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COSTMODEL_CALIBRATE_H
#define FLEX_RUNTIME_COSTMODEL_CALIBRATE_H

#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/CostModel/DeviceProfile.h"
#include "flex/Runtime/Status.h"

#include <string>
#include <vector>

namespace flex {

class Communicator;

struct CalibrationOptions {
  /// A fraction of a second (small shapes, few repetitions) instead of a
  /// few seconds: tests and smoke runs.
  bool quick = false;
  /// The device name to record; "" = the CPU model from /proc/cpuinfo.
  std::string deviceName;
};

/// Measures the CPU backend's profile: grouped-GEMM FLOP/s for a few shapes
/// (f32 and bf16), the copy bandwidth and the cost of one small kernel call,
/// and, when `communicator` has more than one rank, alpha and beta of
/// all_to_all, all_gather, reduce_scatter and all_reduce, fitted from two
/// message sizes. With a communicator it is a collective call: every rank
/// must make it, and every rank gets the same profile (each figure is the
/// slowest rank's).
Status calibrateCpu(const CalibrationOptions &options,
                    Communicator *communicator, DeviceProfile &profile);

/// Measures the CUDA backend's profile on the current GPU in well under a
/// minute (docs/CostModel.md, "CUDA calibration"): grouped-GEMM FLOP/s
/// through cuda::groupedGemm over a grid of shapes (bf16 and f32, padded and
/// ragged), the bandwidth of a large device copy and the cost of one tiny
/// step, timed with CUDA events (median after a warm-up), and the device
/// name, driver, CUDA and NCCL versions. One GPU: collectives and the
/// slowdown beside an exchange keep the built-in figures (said in the
/// notes). Unavailable when built without CUDA or no device is visible.
Status calibrateCuda(const CalibrationOptions &options, DeviceProfile &profile);
/// As above; with a device (NCCL) communicator of W > 1 ranks, also Flex's
/// own exchange (a block per peer and local expert, in place), all_gather,
/// reduce_scatter and all_reduce (alpha, beta at two sizes) and the two
/// slowdowns (a GEMM loop beside an exchange loop), the slowest rank's
/// figures on every rank. A collective call: every rank makes it.
Status calibrateCuda(const CalibrationOptions &options,
                     Communicator *communicator, DeviceProfile &profile);

/// Alpha and beta of `point` through two (bytes, seconds) measurements of a
/// collective (the larger message no slower, noise: all latency).
void fitCollectivePoint(double bytes0, double t0, double bytes1, double t1,
                        CollectivePoint &point);

/// One step of a real plan, run and timed: what the model computes its time
/// from (the profile the basis was computed with) and the measured mean.
struct StepSample {
  StepOp op = StepOp::Router;
  StepBasis basis;
  double seconds = 0;
};

/// The samples of one timed pass of `plan`'s `variant` (forward, or
/// backward) at capacity C: each compute step's basis for the rows the model
/// counts it for, with its measured seconds (`stepSeconds`, one per step of
/// the pass). Collectives and steps without a positive time are left out.
void collectStepSamples(const CostModel &model, const Plan &plan,
                        int64_t variant, bool backward, int64_t capacity,
                        const std::vector<double> &stepSeconds,
                        std::vector<StepSample> &samples);

/// Fits each step kind's figures (StepCostPoint) to the samples and puts
/// them in `profile.steps`, replacing those of the kinds sampled: memory
/// steps alpha + bytes / bandwidth, GEMM steps alpha + scale x the table's
/// time, launch steps alpha; least squares on relative error, alpha >= 0.
/// Collectives are not fitted (their points are per world size).
/// grouped_gemm_combine's samples on the device kernel also set
/// `device_gemm.store_combine_slowdown` (the median of their time past the
/// launch and the predicted GEMM, over the combine step's price).
void fitStepCosts(const std::vector<StepSample> &samples,
                  DeviceProfile &profile);

} // namespace flex

#endif // FLEX_RUNTIME_COSTMODEL_CALIBRATE_H
