//===- CostModel.cpp - Simulate a variant's steps on two streams ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the cost model: each step's time from its work and
// the profile, and the simulation of a pass on a compute and an exchange
// stream (docs/CostModel.md, "The model").
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/CostModel.h"
#include "ExpertGemmCost.h"
#include "flex/Runtime/ByteOverlap.h"
#include "flex/Runtime/Core/GroupedGemmRule.h"
#include "flex/Runtime/CostModel/Topology.h"

#include "flex/Runtime/StepSchema.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <sstream>

namespace flex {

using namespace costmodel;

namespace {

/// Bytes of the memory plan: workspace buffers at their offsets, caller
/// arguments each in a region of its own past the workspace (they never
/// alias it); the ordering rule is the CUDA backend's (ByteOverlap.h).
using Range = BasicByteRange<int64_t>;
using Touched = BasicStepBytes<int64_t>;

/// Where each buffer of a plan lies.
class Layout {
public:
  explicit Layout(const Plan &plan) : plan_(plan) {
    int64_t next = plan.workspace.bytes;
    for (const Argument &arg : plan.arguments) {
      next = (next + 255) / 256 * 256;
      argumentBase_.push_back(next);
      next += std::max<int64_t>(1, arg.numBytes());
    }
  }

  /// The buffer's bytes; with rows >= 0 only rows [first, first + rows) of
  /// it (clamped to the buffer).
  Range range(const BufferRef &ref, int64_t first = 0,
              int64_t rows = -1) const {
    const BufferDesc &desc = plan_.getBuffer(ref);
    int64_t base = ref.kind == BufferRef::Kind::Argument
                       ? argumentBase_[ref.index]
                       : plan_.workspace.buffers[ref.index].offset;
    Range r{base, base + desc.numBytes()};
    if (rows >= 0 && !desc.shape.empty() && desc.shape.front() > 0) {
      const int64_t rowBytes = desc.numBytes() / desc.shape.front();
      r.begin = std::min(r.end, base + first * rowBytes);
      r.end = std::min(r.end, r.begin + rows * rowBytes);
    }
    return r;
  }

private:
  const Plan &plan_;
  std::vector<int64_t> argumentBase_;
};

/// A compute step's bytes: a segment op's dispatch-shaped operands only
/// its chunk's rows (as CudaBackend::waitForOverlappingExchanges).
Touched computeBytes(const Layout &layout, const Step &step,
                     int64_t chunkRows) {
  Touched t;
  const SegmentFacts &seg = step.facts.segments;
  const bool chunked = seg.isValid() && chunkRows >= 0;
  for (int i = 0; i < kNumOperandRoles; ++i) {
    auto role = static_cast<OperandRole>(i);
    const bool rows = chunked && isDispatchShapedRole(role);
    const int64_t first = rows ? seg.chunk * chunkRows : 0;
    const int64_t count = rows ? chunkRows : -1;
    if (step.inputs[i].isValid())
      t.reads.push_back(layout.range(step.inputs[i], first, count));
    if (step.outputs[i].isValid())
      t.writes.push_back(layout.range(step.outputs[i], first, count));
  }
  return t;
}

/// An all_to_all's bytes: chunk q of D is contiguous in the received layout
/// (rows [q R / D, (q + 1) R / D) of R valid rows); its side in the dispatch
/// layout is scattered, counted whole (conservative).
Touched exchangeBytes(const Plan &plan, const Layout &layout, const Step &step,
                      int64_t rows) {
  Touched t;
  const int64_t chunks = std::max<int64_t>(1, step.attrs.chunks);
  const bool dispatch = step.attrs.direction == AllToAllDirection::Dispatch;
  for (int i = 0; i < kNumOperandRoles; ++i) {
    auto role = static_cast<OperandRole>(i);
    for (bool output : {false, true}) {
      const BufferRef &ref = output ? step.outputs[i] : step.inputs[i];
      if (!ref.isValid())
        continue;
      Range r = layout.range(ref);
      const bool received = (role == OperandRole::Output && dispatch) ||
                            (role == OperandRole::Input && !dispatch);
      const BufferDesc &desc = plan.getBuffer(ref);
      if (received && !desc.shape.empty()) {
        int64_t valid =
            rows >= 0 ? std::min(rows, desc.shape.front()) : desc.shape.front();
        int64_t per = valid / chunks;
        r = layout.range(ref, step.attrs.chunk * per, per);
      }
      (output ? t.writes : t.reads).push_back(r);
    }
  }
  return t;
}

/// When a compute step of `work` seconds started at `start` ends, running
/// `slowdown` times slower inside the exchange intervals `busy` (sorted,
/// disjoint: one stream).
double finishTime(double start, double work,
                  const std::vector<std::pair<double, double>> &busy,
                  double slowdown) {
  double t = start, left = work;
  for (const auto &[a, b] : busy) {
    if (b <= t)
      continue;
    if (a > t) {
      if (left <= a - t)
        return t + left;
      left -= a - t;
      t = a;
    }
    const double capacity = (b - t) / slowdown;
    if (left <= capacity)
      return t + left * slowdown;
    left -= capacity;
    t = b;
  }
  return t + left;
}

const Step *refStep(const Variant &variant, StepRef ref) {
  const std::vector<Step> &steps =
      ref.backward ? variant.backward : variant.forward;
  return ref.isValid() && ref.index < static_cast<int32_t>(steps.size())
             ? &steps[ref.index]
             : nullptr;
}

/// C for one step: the facts' static capacity, else `capacity` rounded up
/// to the alignment of the gate that sizes the step; -1 when unknown.
int64_t stepCapacity(const Variant &variant, const Step &step,
                     int64_t capacity) {
  if (step.facts.staticCapacity >= 0)
    return step.facts.staticCapacity;
  if (capacity < 0)
    return -1;
  int64_t alignment = 1;
  if (const Step *gate = refStep(variant, step.facts.capacityFrom))
    alignment = std::max<int64_t>(1, gate->attrs.capacityAlignment);
  return (capacity + alignment - 1) / alignment * alignment;
}

/// The valid rows the step's work counts: its chunk's G * n for a segment
/// op, E * C otherwise; -1 (the static bounds) when C is unknown. On one
/// rank with C known only on the device, GEMMs run the kept rows alone (a
/// GEMM per expert of its count), at most T * k of them: C is the largest
/// count, so E * C overcounts a skewed routing.
int64_t stepRows(const Plan &plan, const Variant &variant, const Step &step,
                 int64_t capacity) {
  const int64_t c = stepCapacity(variant, step, capacity);
  const SegmentFacts &seg = step.facts.segments;
  if (seg.isValid()) {
    int64_t n = seg.rows >= 0 ? seg.rows : (c >= 0 ? seg.rowsFor(c) : -1);
    return n >= 0 ? seg.groups * n : -1;
  }
  if (c < 0)
    return -1;
  const int64_t rows = plan.virtualExperts() * c;
  // A padded layout's memory steps still sweep its E * C rows (padding
  // zeroed); its GEMMs and a ragged layout's steps see the kept rows.
  const StepCost cost = getStepKind(step.op).cost;
  const bool keptRowsOnly = !step.facts.padded ||
                            cost == StepCost::ExpertGemm ||
                            cost == StepCost::ExpertWgrad;
  if (plan.worldSize <= 1 && step.facts.staticCapacity < 0 && keptRowsOnly)
    return std::min(rows, plan.layer.tokens * plan.layer.topK);
  return rows;
}

CollectiveKind collectiveKind(StepCost cost) {
  switch (cost) {
  case StepCost::Gather:
    return CollectiveKind::AllGather;
  case StepCost::ReduceScatter:
    return CollectiveKind::ReduceScatter;
  case StepCost::Sync:
    return CollectiveKind::AllReduce;
  default:
    return CollectiveKind::AllToAll;
  }
}

/// A step that moved less than this (us) between two rounds of the
/// schedule has settled.
constexpr double kSettledUs = 1e-6;

/// `a` beats `b` by more than floating-point noise (two sums of the same
/// step times in another order differ in the last bits).
bool clearlyFaster(double a, double b) { return a < b * (1 - 1e-12); }

std::string formatUs(double us) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g us", us);
  return text;
}

/// Which exchange each compute step of `steps` waits for (the newest pending
/// one its wait rule names; -1: none), the streams and rows as `out` says.
std::vector<int64_t> exchangeWaits(const Plan &plan, const Layout &layout,
                                   const std::vector<Step> &steps,
                                   const std::vector<StepPrediction> &out) {
  std::vector<int64_t> waitsFor(steps.size(), -1);
  std::vector<Touched> pendingBytes; // not yet waited for, oldest first
  std::vector<int64_t> pendingStep;
  for (size_t i = 0; i < steps.size(); ++i) {
    const Step &step = steps[i];
    if (out[i].stream == CostStream::Exchange) {
      pendingBytes.push_back(exchangeBytes(plan, layout, step, out[i].rows));
      pendingStep.push_back(static_cast<int64_t>(i));
      continue;
    }
    int64_t follow = -1; // in the pending list
    if (step.facts.wait == ExchangeWait::All) {
      follow = static_cast<int64_t>(pendingStep.size()) - 1;
    } else if (step.facts.wait == ExchangeWait::Overlapping) {
      const SegmentFacts &seg = step.facts.segments;
      Touched bytes =
          computeBytes(layout, step, seg.isValid() ? out[i].rows : -1);
      for (size_t p = pendingBytes.size(); p-- > 0 && follow < 0;)
        if (pendingBytes[p].mustPrecede(bytes))
          follow = static_cast<int64_t>(p);
    }
    if (follow >= 0) {
      waitsFor[i] = pendingStep[follow];
      pendingBytes.erase(pendingBytes.begin(),
                         pendingBytes.begin() + follow + 1);
      pendingStep.erase(pendingStep.begin(), pendingStep.begin() + follow + 1);
    }
  }
  return waitsFor;
}

} // namespace

std::string_view toString(CostStage stage) {
  static constexpr std::string_view kNames[] = {"gate", "dispatch", "experts",
                                                "combine", "collectives"};
  return kNames[static_cast<int>(stage)];
}

std::string_view toString(GemmPath path) {
  static constexpr std::string_view kNames[] = {"none", "batched", "per_expert",
                                                "device"};
  return kNames[static_cast<int>(path)];
}

std::string_view toString(CostStream stream) {
  return stream == CostStream::Compute ? "compute" : "exchange";
}

CostStage getCostStage(StepOp op) {
  if (isCollective(op))
    return CostStage::Collectives;
  switch (op) {
  case StepOp::Router:
  case StepOp::Gate:
  case StepOp::GateBackward:
  case StepOp::RouterBackward:
  case StepOp::ShardRouting:
  case StepOp::ShardRoutingBackward:
    return CostStage::Gate;
  case StepOp::Dispatch:
  case StepOp::DispatchRows:
  case StepOp::DispatchBackward:
  case StepOp::UniformSegments:
    return CostStage::Dispatch;
  case StepOp::Combine:
  case StepOp::CombineBackward:
    return CostStage::Combine;
  default:
    return CostStage::Experts;
  }
}

/// The rows an aligned layout's batched GEMM computes: every whole block of
/// kAlignedLayoutRows rows of its product's buffer (GroupedGemm.cu's
/// alignedBlocksGemm), used or not.
static int64_t alignedBlockRows(const Plan &plan, const Step &step) {
  const BufferDesc &out = plan.getBuffer(step.out(gemmProductRole(step.op)));
  const int64_t declared = out.shape.empty() ? 0 : out.shape.front();
  return declared / kAlignedLayoutRows * kAlignedLayoutRows;
}

bool CostModel::batchesBlocks(const Plan &plan, const Variant &variant,
                              const Step &step, int64_t capacity) const {
  const SegmentFacts &seg = step.facts.segments;
  // A pipelined chunk's dynamic segments (uniform_segments) hold every row
  // of their blocks; an aligned layout's 128-row blocks batch with no host
  // read (GroupedGemm.cu's alignedBlocksGemm); otherwise a padded layout's
  // blocks on one rank.
  const bool chunkBlocks = seg.isValid() && seg.rows < 0;
  const bool alignedBlocks =
      step.facts.aligned && !seg.isValid() && plan.worldSize <= 1;
  if (profile_.backend != "cuda" ||
      getStepKind(step.op).cost != StepCost::ExpertGemm ||
      step.facts.staticCapacity >= 0 ||
      (!chunkBlocks && !alignedBlocks &&
       (seg.isValid() || !step.facts.padded || plan.worldSize > 1)))
    return false;
  const int64_t c = stepCapacity(variant, step, capacity);
  const int64_t experts = plan.virtualExperts();
  if (c <= 0)
    return false;
  // Only where the counts are read back: the device-sized kernel (checked
  // first by the backend) computes the kept rows alone.
  const BufferDesc &a = plan.getBuffer(step.in(OperandRole::A));
  const BufferDesc &b = plan.getBuffer(step.in(OperandRole::B));
  const BufferDesc &out = plan.getBuffer(step.out(gemmProductRole(step.op)));
  if (a.shape.empty() || out.shape.empty() ||
      expertGemmPath(
          profile_, options_, step, a, a.shape.back(), out.shape.back(),
          b.shape.size() >= 3 ? b.shape.front() : 1) != GemmPath::PerExpert)
    return false;
  if (chunkBlocks || alignedBlocks)
    return true;
  // The rows the blocks hold: every kept row, at most T * k.
  const int64_t held =
      std::min(experts * c, plan.layer.tokens * plan.layer.topK);
  return batchesUniformBlocks(experts, c, held);
}

StepBasis CostModel::stepBasis(const Plan &plan, const Step &step, int64_t rows,
                               bool batchedBlocks) const {
  using R = OperandRole;
  const StepWork work = getStepWork(plan, step, rows);
  StepBasis basis;
  basis.cost = getStepKind(step.op).cost;
  basis.bytes = work.bytesRead + work.bytesWritten;
  basis.bytesExchanged = work.bytesExchanged;
  basis.flops = work.flops;
  // `flops` of a GEMM over `groups` groups at the table's rate.
  auto gemm = [&](double flops, int64_t groups, int64_t k, int64_t n,
                  DType dtype, bool ragged) {
    const double kn = static_cast<double>(std::max<int64_t>(1, k * n));
    groups = std::max<int64_t>(1, groups);
    const auto m = static_cast<int64_t>(flops / (2.0 * kn * groups) + 0.5);
    const double rate =
        profile_.gemmFlopsPerSecond(groups, m, n, k, dtype, ragged);
    return rate > 0 ? flops / rate : 0.0;
  };
  // The groups of a grouped GEMM: the leading dim of its expert operand.
  auto groupsOf = [&](const BufferRef &ref) -> int64_t {
    const BufferDesc &desc = plan.getBuffer(ref);
    return desc.shape.size() >= 3 ? desc.shape.front() : 1;
  };
  // The path the backend takes for a grouped GEMM (or its gradient) over
  // the rows of `rowsOf`, whose dtype is a's.
  auto expertPath = [&](const BufferDesc &rowsOf, int64_t groups, int64_t k,
                        int64_t n, bool wgrad) {
    GemmPath path =
        expertGemmPath(profile_, options_, step, rowsOf, k, n, groups);
    // The counts read back, blocks of one size batch (GroupedGemm.cu).
    if (batchedBlocks && !wgrad && path == GemmPath::PerExpert)
      path = GemmPath::Batched;
    return path;
  };
  // A grouped GEMM (or its gradient) of `flops` = 2kn rows priced on
  // `path`.
  auto gemmOn = [&](GemmPath path, const BufferDesc &a, double flops,
                    int64_t groups, int64_t k, int64_t n, bool wgrad) {
    const double kn = static_cast<double>(std::max<int64_t>(1, k * n));
    const double rows = flops / (2.0 * kn);
    switch (path) {
    case GemmPath::Device:
      return stepOnDeviceKernel(profile_, options_, step, a, rows, groups, k, n,
                                wgrad);
    case GemmPath::PerExpert:
      if (profile_.backend == "cuda")
        return cublasPerExpertSeconds(profile_, rows, groups, k, n, a.dtype);
      return gemm(flops, groups, k, n, a.dtype, true);
    default:
      // An aligned layout's batch (one GEMM per 128-row block) is priced
      // as the strided batch over the same rows per expert: the same tiles
      // of the same weights. (The table's points have 8 and 64 groups; its
      // 128-row points are far from a full device's hundreds of blocks.)
      return gemm(flops, groups, k, n, a.dtype, false);
    }
  };
  // A grouped GEMM (or its gradient) of `rows` = FLOPs / 2kn rows, priced
  // on the path the backend takes.
  auto expertGemm = [&](const BufferDesc &rowsOf, int64_t groups, int64_t k,
                        int64_t n, bool wgrad) {
    basis.gemmPath = expertPath(rowsOf, groups, k, n, wgrad);
    return gemmOn(basis.gemmPath, rowsOf, work.flops, groups, k, n, wgrad);
  };
  // A gathered GEMM off the device kernel (grouped_gemm=cublas, or a device
  // without it) first copies its R rows of K into scratch: read and written
  // once, one launch (GroupedGemm.cu's gatherRows).
  auto gatherCopySeconds = [&](const BufferDesc &a, double rows) {
    if (!step.gathersA() || basis.gemmPath == GemmPath::Device)
      return 0.0;
    const int64_t k = a.shape.back();
    return profile_.launchSeconds +
           2.0 * rows * static_cast<double>(k) *
               static_cast<double>(dtypeSize(a.dtype)) /
               profile_.memoryBandwidth;
  };
  switch (basis.cost) {
  case StepCost::RouterGemm:
    basis.gemmPath = GemmPath::Batched;
    basis.gemmSeconds =
        gemm(work.flops, 1, plan.layer.modelDim, plan.layer.experts,
             plan.layer.routerFp32 ? DType::F32 : plan.layer.dtype, false);
    break;
  // The rows of the product are c's (grad_c's): with row_tokens, a is x.
  case StepCost::ExpertGemm: {
    const BufferDesc &a = plan.getBuffer(step.in(R::A));
    const BufferDesc &c = plan.getBuffer(step.out(gemmProductRole(step.op)));
    const int64_t k = a.shape.back(), n = c.shape.back();
    const double kn = static_cast<double>(std::max<int64_t>(1, k * n));
    if (step.op == StepOp::GroupedGemmGlu) {
      // Its FLOPs are two products': fused, one device GEMM of 2N columns
      // (the gate and up tiles side by side) and no glu pass; else two
      // GEMMs on grouped_gemm's path and the glu's pass (fusedGluOnDevice).
      const int64_t groups = groupsOf(step.in(R::B));
      const double rows = work.flops / (4.0 * kn);
      basis.gemmPath = expertPath(c, groups, k, n, false);
      if (basis.gemmPath == GemmPath::Device) {
        basis.gemmSeconds =
            gemmOn(basis.gemmPath, c, work.flops, groups, k, 2 * n, false);
      } else {
        basis.gemmSeconds = 2.0 * (gemmOn(basis.gemmPath, c, work.flops / 2.0,
                                          groups, k, n, false) +
                                   gatherCopySeconds(a, rows));
        basis.passSeconds = elementwisePassSeconds(profile_, rows, n, c.dtype);
      }
      break;
    }
    const int64_t groups = groupsOf(step.in(R::B));
    basis.gemmSeconds = expertGemm(c, groups, k, n, false) +
                        gatherCopySeconds(a, work.flops / (2.0 * kn));
    if (step.op == StepOp::GroupedGemmCombine) {
      // Its combine: the combine step's price, a multiple of it where the
      // device kernel sums it in its store (store_combine_slowdown).
      basis.combineSeconds =
          combineStepSeconds(plan, work.flops / (2.0 * kn), n, c.dtype);
      basis.passSeconds =
          basis.gemmPath == GemmPath::Device
              ? profile_.deviceGemmFigures().storeCombineSlowdown *
                    basis.combineSeconds
              : basis.combineSeconds;
    }
    // The activation's backward: in the wgmma kernel's store, else its pass
    // (fusedActivationBackwardOnDevice).
    if (isFusedBackward(step.op) &&
        !fusedActivationBackwardOnDevice(profile_, options_, c.dtype, k, n,
                                         fusedBackwardRowsOf(step, a, groups),
                                         groups))
      basis.passSeconds = elementwisePassSeconds(
          profile_, work.flops / (2.0 * kn), n, c.dtype,
          step.op == StepOp::GroupedGemmGluBackward ? 5 : 3);
    break;
  }
  case StepCost::ExpertWgrad: {
    const BufferDesc &a = plan.getBuffer(step.in(R::A));
    const BufferDesc &g = plan.getBuffer(step.in(R::GradC));
    const int64_t k = a.shape.back(), n = g.shape.back();
    const double kn = static_cast<double>(std::max<int64_t>(1, k * n));
    basis.gemmSeconds =
        expertGemm(g, groupsOf(step.out(R::GradB)), k, n, true) +
        gatherCopySeconds(a, work.flops / (2.0 * kn));
    break;
  }
  default:
    break;
  }
  return basis;
}

double CostModel::combineStepSeconds(const Plan &plan, double rows, int64_t n,
                                     DType dtype) const {
  // The kept rows read back and out written once.
  const double bytes = (rows + static_cast<double>(plan.layer.tokens)) *
                       static_cast<double>(n) *
                       static_cast<double>(dtypeSize(dtype));
  return memoryStepSeconds(StepOp::Combine, bytes);
}

double CostModel::memoryStepSeconds(StepOp op, double bytes) const {
  // What calibrating real plans measured for this kind (its fixed cost and
  // rate), else a launch and the profile's bandwidth.
  const StepCostPoint *fitted = profile_.findStep(toString(op));
  const double bandwidth = fitted && fitted->bytesPerSecond > 0
                               ? fitted->bytesPerSecond
                               : profile_.memoryBandwidth;
  return (fitted ? fitted->alphaSeconds : profile_.launchSeconds) +
         bytes / bandwidth;
}

double CostModel::stepSeconds(const Plan &plan, const Step &step,
                              int64_t rows) const {
  return basisSeconds(plan, step, stepBasis(plan, step, rows));
}

double CostModel::basisSeconds(const Plan &plan, const Step &step,
                               const StepBasis &basis) const {
  // What calibrating real plans measured for this kind (its fixed cost:
  // launches, host work, small kernels), else the generic figures.
  const StepCostPoint *fitted = profile_.findStep(toString(step.op));
  switch (basis.cost) {
  case StepCost::Memory:
    return memoryStepSeconds(step.op, basis.bytes);
  case StepCost::Launch:
    return fitted ? fitted->alphaSeconds : profile_.launchSeconds;
  case StepCost::RouterGemm:
  case StepCost::ExpertGemm:
  case StepCost::ExpertWgrad:
    // The device kernel has figures of its own; the kind's fitted ones
    // describe its cuBLAS paths. (A fused step's pass follows either where
    // the kernel does not fuse it.)
    if (basis.gemmPath == GemmPath::Device)
      return profile_.deviceGemmFigures().launchSeconds + basis.gemmSeconds +
             basis.passSeconds;
    return (fitted
                ? fitted->alphaSeconds + fitted->gemmScale * basis.gemmSeconds
                : basis.gemmSeconds) +
           basis.passSeconds;
  case StepCost::Exchange:
  case StepCost::Gather:
  case StepCost::ReduceScatter:
  case StepCost::Sync:
    break;
  }
  const int64_t group = step.attrs.groupRanks(plan.worldSize);
  if (group <= 1)
    return profile_.launchSeconds;
  const CollectiveKind kind = collectiveKind(basis.cost);
  if (usesTopology(plan, step)) {
    const Topology &topology = *profile_.topology;
    const int64_t n = step.attrs.ranksPerNode;
    if (kind == CollectiveKind::AllToAll && n > 1 && n < group) {
      StagingFigures staging;
      staging.bytesPerSecond = profile_.memoryBandwidth;
      staging.launchSeconds = profile_.launchSeconds;
      staging.copyPerBlock = options_.hierarchicalCopyPerBlock;
      return hierarchicalAllToAllCost(topology, group, n,
                                      basis.bytesExchanged / double(group - 1),
                                      staging)
          .seconds;
    }
    return collectiveCost(topology, kind, group, step.attrs.groupStride,
                          basis.bytesExchanged)
        .seconds;
  }
  const CollectivePoint *point =
      profile_.findCollective(kind, plan.worldSize, group, options_.transport);
  // A kind the calibration did not measure: the built-in figures.
  DeviceProfile fallback;
  if (!point) {
    fallback = defaultProfile(profile_.backend, plan.worldSize);
    point = fallback.findCollective(kind, plan.worldSize, group, "");
  }
  return point->alphaSeconds + basis.bytesExchanged / point->betaBytesPerSecond;
}

bool CostModel::usesTopology(const Plan &plan, const Step &step) const {
  const StepCost cost = getStepKind(step.op).cost;
  if (!profile_.topology || !isCollective(step.op))
    return false;
  const int64_t group = step.attrs.groupRanks(plan.worldSize);
  const int64_t n = step.attrs.ranksPerNode;
  // A measured point is a flat exchange: it never prices a 2DH one.
  if (cost == StepCost::Exchange && n > 1 && n < group)
    return true;
  const CollectivePoint *point = profile_.findCollective(
      collectiveKind(cost), plan.worldSize, group, options_.transport);
  const bool exact =
      point && !profile_.builtin && point->worldSize == plan.worldSize &&
      point->groupSize == group &&
      (options_.transport.empty() || point->transport == options_.transport);
  return !exact;
}

Prediction CostModel::predict(const Plan &plan, int64_t variantIndex,
                              bool backward, int64_t capacity) const {
  const Variant &variant = plan.variants.at(variantIndex);
  const std::vector<Step> &steps =
      backward ? variant.backward : variant.forward;
  const bool overlap = options_.overlap && profile_.backend != "cpu";
  const Layout layout(plan);
  Prediction prediction;
  prediction.variant = variantIndex;
  prediction.backward = backward;
  prediction.capacity = capacity;

  // Each step alone: its rows, path and time do not depend on the schedule.
  std::vector<double> aloneUs;
  for (size_t i = 0; i < steps.size(); ++i) {
    const Step &step = steps[i];
    StepPrediction out;
    out.index = static_cast<int32_t>(i);
    out.op = step.op;
    out.stage = getCostStage(step.op);
    out.rows = stepRows(plan, variant, step, capacity);
    out.batchedBlocks = batchesBlocks(plan, variant, step, capacity);
    // A padded layout's blocks compute all E * C rows, an aligned one's
    // every block its buffers declare (a chunk's segments are whole
    // already).
    if (out.batchedBlocks && step.facts.aligned)
      out.rows = alignedBlockRows(plan, step);
    else if (out.batchedBlocks && !step.facts.segments.isValid())
      out.rows = plan.virtualExperts() * stepCapacity(variant, step, capacity);
    const StepBasis basis = stepBasis(plan, step, out.rows, out.batchedBlocks);
    out.gemmPath = basis.gemmPath;
    out.stream =
        overlap && step.op == StepOp::AllToAll && step.facts.exchangeStream
            ? CostStream::Exchange
            : CostStream::Compute;
    aloneUs.push_back(basisSeconds(plan, step, basis) * 1e6);
    prediction.steps.push_back(out);
  }

  // Which exchange each compute step waits for: fixed by the steps' order
  // and bytes, not by the schedule, so found once for every round below.
  const std::vector<int64_t> waitsFor =
      exchangeWaits(plan, layout, steps, prediction.steps);

  // One schedule of both streams, the exchanges slowed inside the compute
  // stream's busy intervals `computeBusy` (those of the schedule before;
  // empty: none); returns this schedule's compute intervals.
  auto schedule = [&](const std::vector<std::pair<double, double>>
                          &computeBusy) {
    double compute = 0, exchange = 0; // when each stream is free, in us
    std::vector<std::pair<double, double>> busy; // every exchange's interval
    std::vector<std::pair<double, double>> computing;
    for (size_t i = 0; i < steps.size(); ++i) {
      const Step &step = steps[i];
      StepPrediction &out = prediction.steps[i];
      const double alone = aloneUs[i];
      if (out.stream == CostStream::Exchange) {
        // Queued after the compute stream's work so far.
        out.startUs = std::max(compute, exchange);
        const double end = profile_.exchangeSlowdown > 1
                               ? finishTime(out.startUs, alone, computeBusy,
                                            profile_.exchangeSlowdown)
                               : out.startUs + alone;
        out.us = end - out.startUs;
        exchange = end;
        busy.emplace_back(out.startUs, exchange);
        continue;
      }
      out.startUs =
          waitsFor[i] >= 0
              ? std::max(compute, prediction.steps[waitsFor[i]].endUs())
              : compute;
      const bool slowed = !isCollective(step.op) &&
                          profile_.overlapSlowdown > 1 && !busy.empty();
      const double end = slowed ? finishTime(out.startUs, alone, busy,
                                             profile_.overlapSlowdown)
                                : out.startUs + alone;
      out.us = end - out.startUs;
      compute = end;
      // A collective on the compute stream is no compute an exchange
      // shares the device with.
      if (!isCollective(step.op) && out.us > 0) {
        if (!computing.empty() && computing.back().second >= out.startUs)
          computing.back().second = end;
        else
          computing.emplace_back(out.startUs, end);
      }
    }
    prediction.totalUs = std::max(compute, exchange);
    return computing;
  };

  std::vector<std::pair<double, double>> computing = schedule({});
  // Slowing the exchanges moves the compute beside them (waits, slowdown),
  // which moves where the exchanges are slowed: schedule again until no
  // step moves. A change travels one chunk down a pipeline per round (an
  // r1d4 pass settles in about 7), so the budget grows with the exchanges;
  // a schedule that has not settled by then is the last one.
  const auto exchanges = std::count_if(
      prediction.steps.begin(), prediction.steps.end(),
      [](const StepPrediction &s) { return s.stream == CostStream::Exchange; });
  const int64_t rounds = profile_.exchangeSlowdown > 1
                             ? 2 * static_cast<int64_t>(exchanges) + 4
                             : 0;
  auto timeline = [&] {
    std::vector<std::pair<double, double>> times;
    for (const StepPrediction &s : prediction.steps)
      times.emplace_back(s.startUs, s.us);
    return times;
  };
  for (int64_t round = 0; round < rounds; ++round) {
    const std::vector<std::pair<double, double>> before = timeline();
    computing = schedule(computing);
    const std::vector<std::pair<double, double>> after = timeline();
    bool settled = true;
    for (size_t i = 0; i < after.size() && settled; ++i)
      settled = std::abs(after[i].first - before[i].first) <=
                    kSettledUs + 1e-12 * std::abs(before[i].first) &&
                std::abs(after[i].second - before[i].second) <=
                    kSettledUs + 1e-12 * std::abs(before[i].second);
    if (settled)
      break;
  }
  for (const StepPrediction &out : prediction.steps)
    prediction.stageUs[static_cast<int>(out.stage)] += out.us;
  return prediction;
}

Choice CostModel::choose(const Plan &plan, bool backward,
                         int64_t capacity) const {
  Choice choice;
  for (int64_t v = 0; v < static_cast<int64_t>(plan.variants.size()); ++v) {
    choice.forward.push_back(predict(plan, v, false, capacity));
    double total = choice.forward.back().totalUs;
    if (backward) {
      choice.backward.push_back(predict(plan, v, true, capacity));
      total += choice.backward.back().totalUs;
    }
    choice.totalUs.push_back(total);
    // Faster by more than rounding only: ties keep the lower index.
    if (choice.variant < 0 ||
        clearlyFaster(total, choice.totalUs[choice.variant]))
      choice.variant = v;
  }
  if (choice.variant < 0) {
    choice.reason = "the plan has no variant";
    return choice;
  }
  std::ostringstream reason;
  const std::string &name = plan.variants[choice.variant].name;
  reason << "'" << name << "' predicted "
         << formatUs(choice.totalUs[choice.variant])
         << (backward ? " (forward + backward)" : " (forward)");
  int64_t next = -1;
  for (int64_t v = 0; v < static_cast<int64_t>(choice.totalUs.size()); ++v)
    if (v != choice.variant &&
        (next < 0 || clearlyFaster(choice.totalUs[v], choice.totalUs[next])))
      next = v;
  if (next < 0) {
    reason << ", the only variant";
  } else {
    const double best = choice.totalUs[choice.variant];
    const double ratio = best > 0 ? choice.totalUs[next] / best : 1.0;
    char text[32];
    std::snprintf(text, sizeof text, "%.2fx", ratio);
    reason << ", " << text << " faster than the next best '"
           << plan.variants[next].name << "' ("
           << formatUs(choice.totalUs[next]) << ")";
  }
  reason << "; profile " << (profile_.builtin ? "built-in " : "")
         << profile_.deviceName << " (" << profile_.backend << ")";
  choice.reason = reason.str();
  return choice;
}

} // namespace flex
