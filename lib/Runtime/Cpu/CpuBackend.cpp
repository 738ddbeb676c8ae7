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
#include <vector>

namespace flex {
namespace {

using R = OperandRole;

using step_views::read;
using step_views::readAs;
using step_views::write;
using step_views::writeAs;

class CpuBackend final : public Backend {
public:
  std::string_view name() const override { return "cpu"; }
  Status runStep(const Plan &plan, const Step &step,
                 const StepOperands &ops) override;

private:
  Status runCollective(const Plan &plan, const Step &step,
                       const StepOperands &ops);
  /// all_to_all staging blocks, kept between calls.
  std::vector<uint8_t> sendStaging_, recvStaging_;
  /// The reordered blocks of the hierarchical all_to_all.
  std::vector<uint8_t> scratchStaging_;
};

std::string bufferName(const TensorView &view) {
  return "'" + view.desc->name + "'";
}

Status CpuBackend::runCollective(const Plan &plan, const Step &step,
                                 const StepOperands &ops) {
  Communicator *group = nullptr;
  if (Status status = communicatorFor(step, group); !status)
    return status;
  Communicator &comm = *group;
  // all_to_all moves the blocks of every (virtual) expert among the ranks
  // of its group (all W, or one group of a grouped step).
  const int64_t E = plan.virtualExperts(), W = comm.size();
  switch (step.op) {
  case StepOp::SyncCapacity: {
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
  case StepOp::AllToAll: {
    const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
    const StepAttrs &a = step.attrs;
    AllToAllLayout layout;
    layout.ranks = W;
    layout.localExperts = E / W;
    layout.capacity = *readAs<int32_t>(ops.in(R::Capacity));
    layout.chunks = a.chunks;
    layout.chunk = a.chunk;
    std::string what = "all_to_all " + std::string(toString(a.direction)) +
                       " " + bufferName(input) + " -> " + bufferName(output) +
                       ", chunk " + std::to_string(a.chunk) + " of " +
                       std::to_string(a.chunks);
    if (layout.capacity % a.chunks != 0)
      return Status(StatusCode::Internal,
                    what + ": capacity " + std::to_string(layout.capacity) +
                        " is not a multiple of the " +
                        std::to_string(a.chunks) + " chunks");
    const int64_t rows = E * layout.capacity;
    if (rows > input.desc->shape[0] || rows > output.desc->shape[0])
      return Status(StatusCode::Internal,
                    what + ": E * C = " + std::to_string(rows) +
                        " rows exceed the buffers' " +
                        std::to_string(std::min(input.desc->shape[0],
                                                output.desc->shape[0])));
    const int64_t rowBytes = input.desc->shape[1] *
                             static_cast<int64_t>(dtypeSize(input.desc->dtype));
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
  case StepOp::AllGather: {
    const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
    return comm.allGather(input.data, input.desc->numBytes(), output.data,
                          "all_gather " + bufferName(input) + " -> " +
                              bufferName(output));
  }
  case StepOp::ReduceScatter: {
    const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
    return comm.reduceScatterSum(
        input.data, output.data, output.desc->numElements(), output.desc->dtype,
        "reduce_scatter " + bufferName(input) + " -> " + bufferName(output));
  }
  default:
    return Status(StatusCode::Internal, "op '" +
                                            std::string(toString(step.op)) +
                                            "' is not a collective");
  }
}

Status CpuBackend::runStep(const Plan &plan, const Step &step,
                           const StepOperands &ops) {
  const LayerConfig &layer = plan.layer;
  const int64_t T = layer.tokens, d = layer.modelDim, E = layer.experts;
  const int64_t k = std::min(layer.topK, layer.experts);
  // Routing is read from whichever side of the step holds it.
  Routing routing = step_views::routingOf(layer, ops);
  // The row groups of a segment op: the gate's E experts, or the L local
  // experts of a received buffer (uniform_segments).
  ExpertSegments segments = routing.segments();
  if (ops.in(R::ExpertRows).isPresent())
    segments.experts = ops.in(R::ExpertRows).desc->shape[0];
  // The column count of a [R, N] operand.
  auto cols = [](const TensorView &view) { return view.desc->shape.back(); };

  switch (step.op) {
  case StepOp::Router:
    cpu::router(read(ops.in(R::X)), read(ops.in(R::Wg)),
                writeAs<float>(ops.out(R::Logits)), T, d, E);
    break;
  case StepOp::Gate: {
    const StepAttrs &a = step.attrs;
    GateOutputs out = step_views::gateOutputs(ops);
    cpu::gate(readAs<float>(ops.in(R::Logits)), T, E, a, out);
    // The plan sized the dispatch buffers for C <= the aligned static bound
    // (the loader checked); a larger C would write past them.
    int64_t bound = alignedCapacityBound(layer, a.capacityAlignment);
    if (*out.capacity < 0 || *out.capacity > bound)
      return Status(StatusCode::Internal,
                    "gate computed capacity " +
                        std::to_string(*out.capacity) +
                        ", outside the static bound [0, " +
                        std::to_string(bound) +
                        "] the plan's buffers were sized for");
    break;
  }
  case StepOp::Dispatch:
    cpu::dispatch(read(ops.in(R::X)), d, routing,
                  write(ops.out(R::Dispatched)));
    break;
  case StepOp::GroupedGemm: {
    const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
    GroupedGemmOptions options;
    options.transB = step.attrs.transB;
    options.accumulate = step.attrs.accumulate;
    options.epilogue = step.attrs.epilogue;
    options.biasScale = static_cast<float>(step.attrs.biasScale);
    cpu::groupedGemm(read(a), read(ops.in(R::B)), read(ops.in(R::Bias)),
                     write(c), cols(a), cols(c), segments, options,
                     write(ops.out(R::Pre)));
    break;
  }
  case StepOp::Glu:
    cpu::glu(read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
             write(ops.out(R::C)), cols(ops.out(R::C)), segments);
    break;
  case StepOp::Combine:
    cpu::combine(read(ops.in(R::ExpertOut)), d, routing,
                 write(ops.out(R::Out)));
    break;
  case StepOp::CombineBackward:
    cpu::combineBackward(read(ops.in(R::GradOut)), read(ops.in(R::ExpertOut)),
                         d, routing, write(ops.out(R::GradExpertOut)),
                         writeAs<float>(ops.out(R::GradGates)));
    break;
  case StepOp::GroupedGemmWgrad: {
    const TensorView &a = ops.in(R::A), &gradC = ops.in(R::GradC);
    GroupedGemmWgradOptions options;
    options.accumulate = step.attrs.accumulate;
    cpu::groupedGemmWgrad(read(a), read(gradC), cols(a), cols(gradC), segments,
                          write(ops.out(R::GradB)), write(ops.out(R::GradBias)),
                          options);
    break;
  }
  case StepOp::ActivationBackward:
    cpu::activationBackward(read(ops.in(R::Pre)), read(ops.in(R::Grad)),
                            write(ops.out(R::GradPre)),
                            cols(ops.out(R::GradPre)), segments,
                            step.attrs.activation);
    break;
  case StepOp::GluBackward:
    cpu::gluBackward(read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
                     read(ops.in(R::Grad)), write(ops.out(R::GradGateIn)),
                     write(ops.out(R::GradUpIn)), cols(ops.in(R::Grad)),
                     segments);
    break;
  case StepOp::DispatchBackward:
    cpu::dispatchBackward(read(ops.in(R::GradDispatched)), d, routing,
                          write(ops.out(R::GradX)));
    break;
  case StepOp::GateBackward: {
    GateBackwardAttrs attrs;
    attrs.topK = step.attrs.topK;
    attrs.normalize = step.attrs.normalize;
    cpu::gateBackward(readAs<float>(ops.in(R::GradGates)),
                      readAs<float>(ops.in(R::GradLAux)),
                      readAs<float>(ops.in(R::Scores)), routing, attrs,
                      writeAs<float>(ops.out(R::GradLogits)));
    break;
  }
  case StepOp::RouterBackward:
    cpu::routerBackward(read(ops.in(R::X)), read(ops.in(R::Wg)),
                        readAs<float>(ops.in(R::GradLogits)), T, d, E,
                        write(ops.out(R::GradX)), write(ops.out(R::GradWg)));
    break;
  case StepOp::UniformSegments: {
    // The received buffer of chunk q is [L, W, Cq] rows per chunk: group g
    // is one block of W * Cq rows.
    const StepAttrs &a = step.attrs;
    const int64_t C = *routing.capacity, n = a.ranks * (C / a.chunks);
    int32_t *offsets = writeAs<int32_t>(ops.out(R::ExpertOffsets));
    int32_t *rows = writeAs<int32_t>(ops.out(R::ExpertRows));
    for (int64_t g = 0; g <= a.groups; ++g)
      offsets[g] = static_cast<int32_t>(a.chunk * a.groups * n + g * n);
    for (int64_t g = 0; g < a.groups; ++g)
      rows[g] = static_cast<int32_t>(n);
    break;
  }
  case StepOp::ShardRouting:
    cpu::shardRouting(routing, step.attrs.shards,
                      writeAs<int32_t>(ops.out(R::Indices)),
                      writeAs<int32_t>(ops.out(R::Locations)),
                      writeAs<float>(ops.out(R::Gates)),
                      writeAs<int32_t>(ops.out(R::ExpertOffsets)),
                      writeAs<int32_t>(ops.out(R::ExpertRows)));
    break;
  case StepOp::ShardRoutingBackward:
    cpu::shardRoutingBackward(readAs<float>(ops.in(R::GradGates)), T, k,
                              step.attrs.shards,
                              writeAs<float>(ops.out(R::GradGates)));
    break;
  case StepOp::SyncCapacity:
  case StepOp::AllToAll:
  case StepOp::AllGather:
  case StepOp::ReduceScatter:
    return runCollective(plan, step, ops);
  }
  return Status::ok();
}

} // namespace

std::unique_ptr<Backend> createCpuBackend() {
  return std::make_unique<CpuBackend>();
}

} // namespace flex
