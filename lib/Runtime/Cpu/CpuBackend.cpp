//===- CpuBackend.cpp - Plan steps on the CPU kernels ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the CPU backend: it maps each plan step to its kernel
// in CpuKernels.h, with sizes taken from the (verified) buffer shapes, and
// each collective step to the communicator (all_to_all packs its rows per
// AllToAllLayout.h into staging blocks and exchanges them flat or, with
// ranks_per_node, per HierarchicalAllToAll.h). Steps run synchronously on the
// calling thread (the kernels use OpenMP inside).
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Comm/AllToAllLayout.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Comm/HierarchicalAllToAll.h"
#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/StepViews.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace flex {
namespace {

// The operand views, the roles (R) and the kernels' arguments (StepViews.h).
using namespace step_views;

/// What the CPU kernels of a step take besides its operands.
using KernelArgs = step_views::LayerArgs;

class CpuBackend final : public Backend {
public:
  CpuBackend();
  std::string_view name() const override { return "cpu"; }

private:
  /// Registers a kernel that takes the step's KernelArgs.
  void setArgsKernel(
      StepOp op,
      std::function<void(const Step &, const StepOperands &, KernelArgs &)>
          kernel) {
    setKernel(op, [kernel](const Plan &plan, const Step &step,
                           const StepOperands &ops) {
      KernelArgs args(plan, ops);
      kernel(step, ops, args);
      return Status::ok();
    });
  }
  void setComputeKernels();
  void setBackwardKernels();
  void setRoutingKernels();
  Status gate(const Plan &plan, const Step &step, const StepOperands &ops);
  /// The collectives with communicator-side work of their own; they run
  /// through the step's communicator (setCollectiveKernel).
  Status syncCapacity(const Plan &plan, const Step &step,
                      const StepOperands &ops, Communicator &comm);
  Status allToAll(const Plan &plan, const Step &step, const StepOperands &ops,
                  Communicator &comm);
  /// all_to_all staging blocks, kept between calls.
  std::vector<uint8_t> sendStaging_, recvStaging_;
  /// The reordered blocks of the hierarchical all_to_all.
  std::vector<uint8_t> scratchStaging_;
};

Status CpuBackend::syncCapacity(const Plan &plan, const Step &step,
                                const StepOperands &ops, Communicator &comm) {
  // One C on every rank: the largest keeps every slot each rank keeps.
  int32_t *capacity = writeAs<int32_t>(ops.out(R::Capacity));
  if (Status status = comm.allReduceMaxInt32(capacity, 1, "sync_capacity");
      !status)
    return status;
  // The gate's offsets: one per expert.
  int32_t *offsets = writeAs<int32_t>(ops.out(R::ExpertOffsets));
  for (int64_t e = 0; e <= plan.layer.experts; ++e)
    offsets[e] = static_cast<int32_t>(e * *capacity);
  return Status::ok();
}

Status CpuBackend::allToAll(const Plan &plan, const Step &step,
                            const StepOperands &ops, Communicator &comm) {
  // all_to_all moves the blocks of every (virtual) expert among the ranks
  // of its group (all W, or one group of a grouped step).
  const int64_t E = plan.virtualExperts(), W = comm.size();
  const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
  const StepAttrs &a = step.attrs;
  AllToAllLayout layout;
  layout.ranks = W;
  layout.localExperts = E / W;
  layout.capacity = *readAs<int32_t>(ops.in(R::Capacity));
  layout.chunks = a.chunks;
  layout.chunk = a.chunk;
  std::string what = describeAllToAll(step, ops);
  if (Status status = checkAllToAllRows(what, E, layout.capacity, step, ops);
      !status)
    return status;
  const int64_t rowBytes =
      input.desc->shape[1] * static_cast<int64_t>(dtypeSize(input.desc->dtype));
  const int64_t blockBytes = layout.blockRows() * rowBytes;
  sendStaging_.resize(static_cast<size_t>(W * blockBytes));
  recvStaging_.resize(static_cast<size_t>(W * blockBytes));
  std::vector<int64_t> offsets(W), sizes(W, blockBytes);
  for (int64_t p = 0; p < W; ++p)
    offsets[p] = p * blockBytes;
  layout.pack(a.direction, input.data, rowBytes, sendStaging_.data());
  // 2DH moves the same staging blocks in two phases; with one node
  // (N == W) or one rank per node (N == 1) it degenerates to the flat
  // exchange plus copies, so those run flat.
  const bool hierarchical = a.ranksPerNode > 1 && a.ranksPerNode < W;
  Status status =
      hierarchical
          ? hierarchicalAllToAll(comm, a.ranksPerNode, sendStaging_.data(),
                                 recvStaging_.data(), blockBytes,
                                 scratchStaging_, what)
          : comm.allToAll(sendStaging_.data(), offsets.data(), sizes.data(),
                          recvStaging_.data(), offsets.data(), sizes.data(),
                          what);
  if (!status)
    return status;
  layout.unpack(a.direction, recvStaging_.data(), rowBytes, output.data);
  return Status::ok();
}

CpuBackend::CpuBackend() {
  setComputeKernels();
  setBackwardKernels();
  setRoutingKernels();
  setKernel(StepOp::Gate,
            [this](const Plan &plan, const Step &step,
                   const StepOperands &ops) { return gate(plan, step, ops); });
  setCollectiveKernel(StepOp::SyncCapacity, &CpuBackend::syncCapacity);
  setCollectiveKernel(StepOp::AllToAll, &CpuBackend::allToAll);
  setGatherScatterKernels();
}

Status CpuBackend::gate(const Plan &plan, const Step &step,
                        const StepOperands &ops) {
  const LayerConfig &layer = plan.layer;
  const StepAttrs &a = step.attrs;
  GateOutputs out = step_views::gateOutputs(ops);
  cpu::gate(readAs<float>(ops.in(R::Logits)), layer.tokens, layer.experts, a,
            out);
  // The plan sized the dispatch buffers for C <= the aligned static bound
  // (the loader checked); a larger C would write past them.
  int64_t bound = alignedCapacityBound(layer, a.capacityAlignment);
  if (*out.capacity < 0 || *out.capacity > bound)
    return Status(StatusCode::Internal,
                  "gate computed capacity " + std::to_string(*out.capacity) +
                      ", outside the static bound [0, " +
                      std::to_string(bound) +
                      "] the plan's buffers were sized for");
  return Status::ok();
}

void CpuBackend::setComputeKernels() {
  using Args = KernelArgs;
  setArgsKernel(
      StepOp::Router, [](const Step &, const StepOperands &ops, Args &x) {
        cpu::router(read(ops.in(R::X)), read(ops.in(R::Wg)),
                    writeAs<float>(ops.out(R::Logits)), x.T, x.d, x.E);
      });
  setArgsKernel(StepOp::Dispatch,
                [](const Step &, const StepOperands &ops, Args &x) {
                  cpu::dispatch(read(ops.in(R::X)), x.d, x.routing,
                                write(ops.out(R::Dispatched)));
                });
  setArgsKernel(StepOp::DispatchRows,
                [](const Step &, const StepOperands &ops, Args &x) {
                  const TensorView &rowTokens = ops.out(R::RowTokens);
                  cpu::dispatchRows(x.routing, rowTokens.desc->shape.front(),
                                    writeAs<int32_t>(rowTokens));
                });
  setArgsKernel(StepOp::GroupedGemm, [](const Step &step,
                                        const StepOperands &ops, Args &x) {
    const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
    cpu::groupedGemm(read(a), read(ops.in(R::B)), read(ops.in(R::Bias)),
                     write(c), cols(a), cols(c), x.segments,
                     step_views::gemmOptions(step.attrs),
                     write(ops.out(R::Pre)), rowGather(ops, x));
  });
  setArgsKernel(StepOp::GroupedGemmGlu, [](const Step &,
                                           const StepOperands &ops, Args &x) {
    const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
    cpu::groupedGemmGlu(read(a), read(ops.in(R::B)), read(ops.in(R::BUp)),
                        write(c), cols(a), cols(c), x.segments,
                        write(ops.out(R::GateIn)), write(ops.out(R::UpIn)),
                        rowGather(ops, x));
  });
  setArgsKernel(
      StepOp::Glu, [](const Step &, const StepOperands &ops, Args &x) {
        cpu::glu(read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
                 write(ops.out(R::C)), cols(ops.out(R::C)), x.segments);
      });
  // The reference is the two steps themselves: the product into c, then
  // the combine reading it (row_tokens is for the GPU's fused store).
  setArgsKernel(StepOp::GroupedGemmCombine,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
                  cpu::groupedGemm(read(a), read(ops.in(R::B)),
                                   read(ops.in(R::Bias)), write(c), cols(a),
                                   cols(c), x.segments,
                                   step_views::gemmOptions(step.attrs));
                  cpu::combine(read(c), x.d, x.routing, write(ops.out(R::Out)));
                });
  setArgsKernel(StepOp::Combine,
                [](const Step &, const StepOperands &ops, Args &x) {
                  cpu::combine(read(ops.in(R::ExpertOut)), x.d, x.routing,
                               write(ops.out(R::Out)));
                });
}

void CpuBackend::setBackwardKernels() {
  using Args = KernelArgs;
  setArgsKernel(StepOp::CombineBackward, [](const Step &,
                                            const StepOperands &ops, Args &x) {
    cpu::combineBackward(read(ops.in(R::GradOut)), read(ops.in(R::ExpertOut)),
                         x.d, x.routing, write(ops.out(R::GradExpertOut)),
                         writeAs<float>(ops.out(R::GradGates)));
  });
  setArgsKernel(StepOp::GroupedGemmWgrad, [](const Step &step,
                                             const StepOperands &ops, Args &x) {
    const TensorView &a = ops.in(R::A), &gradC = ops.in(R::GradC);
    GroupedGemmWgradOptions options;
    options.accumulate = step.attrs.accumulate;
    cpu::groupedGemmWgrad(read(a), read(gradC), cols(a), cols(gradC),
                          x.segments, write(ops.out(R::GradB)),
                          write(ops.out(R::GradBias)), options,
                          rowGather(ops, x));
  });
  setArgsKernel(StepOp::GroupedGemmActivationBackward,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
                  cpu::groupedGemmActivationBackward(
                      read(a), read(ops.in(R::B)), read(ops.in(R::Pre)),
                      write(c), cols(a), cols(c), x.segments, step.attrs.transB,
                      step.attrs.activation);
                });
  setArgsKernel(
      StepOp::GroupedGemmGluBackward,
      [](const Step &step, const StepOperands &ops, Args &x) {
        const TensorView &a = ops.in(R::A), &gradGate = ops.out(R::GradGateIn);
        cpu::groupedGemmGluBackward(
            read(a), read(ops.in(R::B)), read(ops.in(R::GateIn)),
            read(ops.in(R::UpIn)), write(gradGate), write(ops.out(R::GradUpIn)),
            cols(a), cols(gradGate), x.segments, step.attrs.transB);
      });
  setArgsKernel(StepOp::ActivationBackward,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  cpu::activationBackward(
                      read(ops.in(R::Pre)), read(ops.in(R::Grad)),
                      write(ops.out(R::GradPre)), cols(ops.out(R::GradPre)),
                      x.segments, step.attrs.activation);
                });
  setArgsKernel(
      StepOp::GluBackward, [](const Step &, const StepOperands &ops, Args &x) {
        cpu::gluBackward(read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
                         read(ops.in(R::Grad)), write(ops.out(R::GradGateIn)),
                         write(ops.out(R::GradUpIn)), cols(ops.in(R::Grad)),
                         x.segments);
      });
  setArgsKernel(StepOp::DispatchBackward,
                [](const Step &, const StepOperands &ops, Args &x) {
                  cpu::dispatchBackward(read(ops.in(R::GradDispatched)), x.d,
                                        x.routing, write(ops.out(R::GradX)));
                });
  setArgsKernel(StepOp::GateBackward,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  cpu::gateBackward(readAs<float>(ops.in(R::GradGates)),
                                    readAs<float>(ops.in(R::GradLAux)),
                                    readAs<float>(ops.in(R::Scores)), x.routing,
                                    step_views::gateBackwardAttrs(step.attrs),
                                    writeAs<float>(ops.out(R::GradLogits)));
                });
  setArgsKernel(StepOp::RouterBackward, [](const Step &,
                                           const StepOperands &ops, Args &x) {
    cpu::routerBackward(read(ops.in(R::X)), read(ops.in(R::Wg)),
                        readAs<float>(ops.in(R::GradLogits)), x.T, x.d, x.E,
                        write(ops.out(R::GradX)), write(ops.out(R::GradWg)));
  });
}

void CpuBackend::setRoutingKernels() {
  using Args = KernelArgs;
  setArgsKernel(StepOp::UniformSegments, [](const Step &step,
                                            const StepOperands &ops, Args &x) {
    // The received buffer of chunk q is [L, W, Cq] rows per chunk: group g
    // is one block of W * Cq rows.
    const StepAttrs &a = step.attrs;
    const int64_t C = *x.routing.capacity, n = a.ranks * (C / a.chunks);
    int32_t *offsets = writeAs<int32_t>(ops.out(R::ExpertOffsets));
    int32_t *rows = writeAs<int32_t>(ops.out(R::ExpertRows));
    for (int64_t g = 0; g <= a.groups; ++g)
      offsets[g] = static_cast<int32_t>(a.chunk * a.groups * n + g * n);
    for (int64_t g = 0; g < a.groups; ++g)
      rows[g] = static_cast<int32_t>(n);
  });
  setArgsKernel(StepOp::ShardRouting,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  cpu::shardRouting(x.routing, step.attrs.shards,
                                    writeAs<int32_t>(ops.out(R::Indices)),
                                    writeAs<int32_t>(ops.out(R::Locations)),
                                    writeAs<float>(ops.out(R::Gates)),
                                    writeAs<int32_t>(ops.out(R::ExpertOffsets)),
                                    writeAs<int32_t>(ops.out(R::ExpertRows)));
                });
  setArgsKernel(StepOp::ShardRoutingBackward,
                [](const Step &step, const StepOperands &ops, Args &x) {
                  cpu::shardRoutingBackward(
                      readAs<float>(ops.in(R::GradGates)), x.T, x.k,
                      step.attrs.shards, writeAs<float>(ops.out(R::GradGates)));
                });
}

} // namespace

std::unique_ptr<Backend> createCpuBackend() {
  return std::make_unique<CpuBackend>();
}

} // namespace flex
