//===- CostModel.h - Predict a variant's time from its own steps -*- C++
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The runtime cost model (docs/CostModel.md): the predicted time of a
// variant is a simulation of that variant's own plan steps on the resources
// they use. Each step costs what its work (getStepWork, StepSchema.h) takes
// on the device profile (DeviceProfile.h); an all_to_all whose facts say
// exchangeStream runs on the exchange stream, beside the compute stream; a
// compute step waits for the pending exchanges whose bytes it touches (the
// rule of StepBytes.h, on the memory plan's offsets) or, when its facts say
// All, for every one; compute runs overlapSlowdown times slower while an
// exchange runs, and an exchange exchangeSlowdown times slower while compute
// runs (the schedule simulated again until it settles). choose() predicts every
// variant and takes the fastest, a pure function of the plan, the profile and
// C, so every rank given the same profile and the same synced C picks the same
// variant.
//
// MLIR-free; it reads the plan model and the profile, never a backend.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COSTMODEL_COSTMODEL_H
#define FLEX_RUNTIME_COSTMODEL_COSTMODEL_H

#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/CostModel/DeviceProfile.h"
#include "flex/Runtime/Plan.h"
#include "flex/Runtime/StepSchema.h"

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

/// The stage of the layer a step belongs to, derived from its kind.
enum class CostStage : uint8_t {
  Gate,        ///< router, gate, shard_routing and their backwards
  Dispatch,    ///< dispatch, dispatch_backward, uniform_segments
  Experts,     ///< GEMMs, activations, GLUs
  Combine,     ///< combine, combine_backward
  Collectives, ///< every step that talks to other ranks
};
inline constexpr int kNumCostStages = 5;
std::string_view toString(CostStage stage);
CostStage getCostStage(StepOp op);

/// The resource a step runs on.
enum class CostStream : uint8_t { Compute, Exchange };
std::string_view toString(CostStream stream);

struct CostModelOptions {
  /// Exchanges run on their own stream (the CUDA backend's cuda_overlap);
  /// ignored, as false, for a "cpu" profile, whose exchanges are blocking.
  bool overlap = true;
  /// The collectives' transport to look up in the profile; "" = any.
  std::string transport;
  /// With a node shape (Topology.h): a 2DH exchange's two block reorders
  /// cost one device copy per block (the CUDA backend's way, 2 W copies);
  /// false prices one copy kernel per phase instead (a fused reorder).
  bool hierarchicalCopyPerBlock = true;
  /// The CUDA backend's grouped_gemm option (RuntimeOptions::groupedGemm):
  /// which path a dynamic grouped GEMM takes (Core/GroupedGemmRule.h).
  GroupedGemmImpl groupedGemm = GroupedGemmImpl::Auto;
  /// The CUDA backend's device-sized kernel runs wgmma tiles (Hopper;
  /// Backend::groupedGemmRunsWgmma): dynamic forward and input-gradient
  /// GEMMs take it at any size, priced at the profile's wgmma rate.
  bool wgmmaGemm = false;
};

/// How a GEMM step runs, and so what prices it.
enum class GemmPath : uint8_t {
  None,      ///< not a GEMM step
  Batched,   ///< one batched GEMM (rows per group known on the host): the
             ///< GEMM table's padded points
  PerExpert, ///< counts read to the host, a GEMM per group with rows: the
             ///< table's ragged points
  Device,    ///< the CUDA device-sized kernel: the profile's device_gemm
};
std::string_view toString(GemmPath path);

/// What a step's time is computed from: its cost class, its bytes and
/// FLOPs, and the GEMM table's time for its FLOPs (GEMM steps; 0 else).
/// The calibration fits each kind's figures against these.
struct StepBasis {
  StepCost cost = StepCost::Memory;
  double bytes = 0; ///< read plus written
  double bytesExchanged = 0;
  double flops = 0;
  /// Batched and PerExpert: the GEMM table's time; Device: max(padded
  /// FLOPs / tile rate, touched bytes / read rate), its launch not counted.
  /// grouped_gemm_glu: both products (off the device kernel, two GEMMs).
  double gemmSeconds = 0;
  GemmPath gemmPath = GemmPath::None;
  /// A fused step off the kernel that fuses it: the elementwise pass it runs
  /// after its GEMMs (launch and bytes), which the fused kernel does not
  /// make: grouped_gemm_glu's glu, grouped_gemm_activation_backward's
  /// activation_backward. grouped_gemm_combine: its combine, priced as the
  /// combine step (times store_combine_slowdown on the device kernel).
  double passSeconds = 0;
  /// grouped_gemm_combine: the combine step's own price, what the store's
  /// sums are a multiple of (the calibration fits that multiple).
  double combineSeconds = 0;
};

struct StepPrediction {
  int32_t index = 0; ///< in the pass's step list
  StepOp op = StepOp::Router;
  CostStage stage = CostStage::Gate;
  CostStream stream = CostStream::Compute;
  /// The rows the step's work was counted for (-1: the static bound).
  int64_t rows = -1;
  /// GEMM steps: the path priced (the one the backend takes).
  GemmPath gemmPath = GemmPath::None;
  /// A dynamic padded layout's forward or input-gradient GEMM priced as
  /// one batched GEMM over its E * C block rows (`rows`), as the CUDA
  /// backend runs it once the counts are on the host
  /// (batchesUniformBlocks, Core/GroupedGemmRule.h).
  bool batchedBlocks = false;
  double startUs = 0;
  double us = 0; ///< end - start, the overlap slowdown included
  double endUs() const { return startUs + us; }
};

struct Prediction {
  int64_t variant = 0;
  bool backward = false;
  /// The capacity the rows were counted for (-1: the buffers' bounds).
  int64_t capacity = -1;
  std::vector<StepPrediction> steps;
  /// The sum of the steps' times per stage (not overlapped).
  std::array<double, kNumCostStages> stageUs{};
  /// The makespan: when the last step on either stream ends.
  double totalUs = 0;
};

/// choose()'s answer.
struct Choice {
  int64_t variant = -1;
  /// Per variant, the forward prediction and (when `backward`) the backward
  /// one; total = their sum.
  std::vector<Prediction> forward, backward;
  std::vector<double> totalUs;
  std::string reason;
};

class CostModel {
public:
  explicit CostModel(DeviceProfile profile, CostModelOptions options = {})
      : profile_(std::move(profile)), options_(std::move(options)) {}

  const DeviceProfile &profile() const { return profile_; }
  const CostModelOptions &options() const { return options_; }

  /// The predicted forward (or backward) of `variant` for capacity C:
  /// dispatch-shaped steps count E * C rows (padded or not; an upper bound
  /// for a ragged layout), a segment op of a pipelined variant its chunk's
  /// G * W * C / D rows; a fixed capacity known on the host (the step's
  /// facts) wins over `capacity`; capacity < 0 counts the static bounds.
  Prediction predict(const Plan &plan, int64_t variant, bool backward,
                     int64_t capacity) const;

  /// Predicts every variant (forward, and backward too when `backward`)
  /// and picks the smallest total; ties go to the lower index. Deterministic.
  Choice choose(const Plan &plan, bool backward, int64_t capacity) const;

  /// The quantities stepSeconds() combines with the profile's figures;
  /// `batchedBlocks`: StepPrediction::batchedBlocks.
  StepBasis stepBasis(const Plan &plan, const Step &step, int64_t rows,
                      bool batchedBlocks = false) const;
  /// The seconds one step takes alone on its stream (no waits, no overlap).
  double stepSeconds(const Plan &plan, const Step &step, int64_t rows) const;
  /// The combine step over `rows` product rows of n columns (its fitted
  /// figures): what grouped_gemm_combine's combine is priced from.
  double combineStepSeconds(const Plan &plan, double rows, int64_t n,
                            DType dtype) const;
  /// A memory-bound step of kind `op` moving `bytes`: its fitted figures,
  /// else a launch and the profile's bandwidth.
  double memoryStepSeconds(StepOp op, double bytes) const;
  /// Whether the profile's node shape prices this collective step (no
  /// exact measured point, a built-in profile's points, or a 2DH exchange)
  /// rather than a measured point; false without a node shape.
  bool usesTopology(const Plan &plan, const Step &step) const;
  /// Whether the step is a dynamic padded layout's forward or
  /// input-gradient GEMM whose E * C blocks at `capacity` hold enough of
  /// their rows for the CUDA backend to batch them (one rank).
  bool batchesBlocks(const Plan &plan, const Variant &variant, const Step &step,
                     int64_t capacity) const;

private:
  /// stepSeconds() of an already computed basis.
  double basisSeconds(const Plan &plan, const Step &step,
                      const StepBasis &basis) const;

  DeviceProfile profile_;
  CostModelOptions options_;
};

} // namespace flex

#endif // FLEX_RUNTIME_COSTMODEL_COSTMODEL_H
