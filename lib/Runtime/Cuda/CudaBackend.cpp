//===- CudaBackend.cpp - Plan steps on the GPU ----------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the CUDA backend: each plan step becomes the kernels
// of CudaKernels.h, queued in plan order on one stream (the caller's, from
// setStream, or the backend's own). Steps' `stream` and `wait` fields are
// satisfied by that order. Memory comes from cudaMalloc; device events time
// the steps; a pass with a static routing can be recorded as a CUDA graph
// and replayed. Every CUDA and cuBLAS error comes back as a Status. Each
// step kind has its kernel in the table every backend shares
// (Backend::setKernel); runStep first orders the step after the exchanges
// it waits for. The collectives and the exchange stream are in
// CudaExchange.cpp.
//
// What the plan says about a step comes from its compiled facts
// (StepFacts.h): which routing it reads and whether it is padded, the
// static capacity, the chunk and base row of a segment op, whether an
// exchange runs on the exchange stream and how a step waits for exchanges.
// The backend searches no plan and tracks no "what ran last"; the only
// run-time state about a routing is the device-written C read back for a
// dynamic capacity.
//
//===----------------------------------------------------------------------===//

#include "CudaBackendImpl.h"
#include "GroupedGemmInternal.h"
#include "flex/Runtime/Core/GroupedGemmRule.h"
#include "flex/Runtime/StepSchema.h"
#include "flex/Runtime/StepViews.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <thread>

namespace flex {
namespace {

// The operand views, the roles (R) and the kernels' arguments (StepViews.h).
using namespace step_views;

/// The rows a per-expert step works on, from its compiled facts: the groups
/// of the routing's (virtual) experts, or the G = L local experts of one
/// chunk of a received buffer (expert_rows from uniform_segments). A
/// received buffer of a fixed capacity is static too: chunk q's groups are G
/// blocks of n = W * C / D rows from row q * G * n, and the kernels see the
/// buffers from that row on (`shift`), as one static batch.
class RowSpaces {
public:
  RowSpaces(const StepFacts &facts, const StepOperands &ops,
            const Routing &routing)
      : facts_(facts), routing_(routing),
        groups_(ops.in(R::ExpertRows).isPresent()
                    ? ops.in(R::ExpertRows).desc->shape[0]
                    : routing.experts) {}

  /// The rows of the dispatch-shaped operand `view`.
  cuda::ExpertRowSpace space(const TensorView &view) const {
    cuda::ExpertRowSpace result;
    result.offsets = routing_.expertOffsets;
    result.rows = routing_.expertRows;
    result.experts = groups_;
    result.rowBound = view.desc->shape.front();
    if (facts_.segments.isValid()) {
      result.staticCapacity = facts_.segments.rows;
      result.rowBound = std::max<int64_t>(0, result.rowBound - baseRow());
      return result;
    }
    // shard_routing's virtual experts keep the gate's C, padded whatever
    // the gate's own layout (facts.padded says so).
    result.staticCapacity = facts_.staticCapacity;
    result.padded = facts_.padded;
    result.alignedRows = facts_.aligned ? kAlignedLayoutRows : 0;
    return result;
  }
  /// A dispatch-shaped operand from the first row of the space on.
  TensorView shift(const TensorView &view) const {
    TensorView result = view;
    if (baseRow() > 0 && view.isPresent())
      result.data = static_cast<char *>(view.data) +
                    baseRow() * view.desc->shape.back() *
                        static_cast<int64_t>(dtypeSize(view.desc->dtype));
    return result;
  }
  /// A gathered A's row map from the first row of the space on.
  RowGather shift(RowGather gather) const {
    if (gather.rowTokens)
      gather.rowTokens += baseRow();
    return gather;
  }
  /// space(shift(view)).
  cuda::ExpertRowSpace shiftedSpace(const TensorView &view) const {
    return space(shift(view));
  }

private:
  int64_t baseRow() const {
    return facts_.segments.isValid() ? facts_.segments.baseRow : 0;
  }
  const StepFacts &facts_;
  const Routing &routing_;
  int64_t groups_;
};

/// shard_routing: k * s choices over E * s virtual experts.
Status runShardRouting(cuda::KernelContext &ctx, const Step &step,
                       const StepOperands &ops, const Routing &routing) {
  const int64_t s = step.attrs.shards;
  const TensorView &indices = ops.out(R::Indices);
  const TensorView &offsets = ops.out(R::ExpertOffsets);
  // The kernel writes k * s choices and E * s + 1 offsets: buffers of
  // other shapes would be overrun (the loader rejects such plans).
  if (s < 1 || indices.desc->shape[1] != routing.topK * s ||
      offsets.desc->shape[0] != routing.experts * s + 1)
    return Status(StatusCode::InvalidArgument,
                  "shard_routing with shards = " + std::to_string(s) +
                      " over k = " + std::to_string(routing.topK) +
                      " choices and E = " + std::to_string(routing.experts) +
                      " experts needs '" + indices.desc->name +
                      "' [T, k*s] and '" + offsets.desc->name +
                      "' [E*s + 1]; got " +
                      std::to_string(indices.desc->shape[1]) + " and " +
                      std::to_string(offsets.desc->shape[0]));
  // New offsets for the later steps (as after sync_capacity): a host copy
  // of earlier ones is stale.
  ++ctx.generation;
  return cuda::shardRouting(ctx, routing, s, writeAs<int32_t>(indices),
                            writeAs<int32_t>(ops.out(R::Locations)),
                            writeAs<float>(ops.out(R::Gates)),
                            writeAs<int32_t>(offsets),
                            writeAs<int32_t>(ops.out(R::ExpertRows)));
}
/// What the kernels of a step over dispatch-shaped rows take besides its
/// operands: the layer's sizes, the routing and the rows it works on.
struct RowArgs : step_views::LayerArgs {
  RowSpaces rows;

  RowArgs(const Plan &plan, const Step &step, const StepOperands &ops)
      : LayerArgs(plan, ops), rows(step.facts, ops, routing) {}
  TensorView shift(const TensorView &view) const { return rows.shift(view); }
};

bool hasDeviceCommunicator(const std::shared_ptr<Communicator> &comm) {
  return comm && comm->memory() == CommMemory::Device;
}

/// A grouped GEMM step as the device-sized kernel sees it: the rows of its
/// product (c's, grad_c's; also when a is gathered), its groups (the
/// weights' first dimension) and a (K its last dimension).
struct GemmStepShape {
  const BufferDesc *rows = nullptr;
  const BufferDesc *a = nullptr;
  int64_t groups = 1;
};

/// The shape of a grouped_gemm, grouped_gemm_wgrad, grouped_gemm_glu or
/// grouped_gemm_activation_backward step; nothing for another kind.
std::optional<GemmStepShape> gemmStepShape(const Plan &plan, const Step &step) {
  if (getStepKind(step.op).cost != StepCost::ExpertGemm &&
      getStepKind(step.op).cost != StepCost::ExpertWgrad)
    return std::nullopt;
  const bool forward = step.op != StepOp::GroupedGemmWgrad;
  GemmStepShape shape;
  shape.a = &plan.getBuffer(step.in(OperandRole::A));
  shape.rows = &plan.getBuffer(forward ? step.out(gemmProductRole(step.op))
                                       : step.in(OperandRole::GradC));
  const std::vector<int64_t> &weights =
      plan.getBuffer(forward ? step.in(OperandRole::B)
                             : step.out(OperandRole::GradB))
          .shape;
  shape.groups = weights.size() >= 3 ? weights.front() : 1;
  return shape;
}

/// Whether every grouped GEMM of `variant` fits the device-sized kernel's
/// grid at its buffers' declared rows (else the pass would need the host
/// read, which a graph cannot record).
bool gemmGridsFit(const Plan &plan, const Variant &variant) {
  for (const std::vector<Step> *steps : {&variant.forward, &variant.backward})
    for (const Step &step : *steps) {
      std::optional<GemmStepShape> gemm = gemmStepShape(plan, step);
      if (!gemm)
        continue;
      if (gemm->a->shape.size() < 2 || gemm->rows->shape.empty() ||
          !cuda::detail::deviceGroupedGemmGridFits(
              gemm->rows->shape.front(), gemm->groups, gemm->a->shape.back()))
        return false;
    }
  return true;
}

/// Whether grouped_gemm=auto sends every dynamic grouped GEMM of `variant`
/// to the device-sized kernel when it runs eagerly (Core/GroupedGemmRule.h:
/// few rows per expert, gathered A or not, the glu-fused step, and with
/// `wgmma` forward and input-gradient GEMMs up to its bound), so that a
/// recorded pass runs the kernels the eager calls ran.
bool autoTakesDeviceKernels(const Plan &plan, const Variant &variant,
                            bool wgmma) {
  for (const std::vector<Step> *steps : {&variant.forward, &variant.backward})
    for (const Step &step : *steps) {
      std::optional<GemmStepShape> gemm = gemmStepShape(plan, step);
      // grouped_gemm_glu runs the device kernel where it fits, whatever the
      // rows. The fused backwards (their store applies the backward) and a
      // gathered GEMM follow the rule (a gathered A its own bound; the
      // fused backwards' store bound is below the forward's).
      if (!gemm || step.op == StepOp::GroupedGemmGlu)
        continue;
      const SegmentFacts &seg = step.facts.segments;
      const bool dynamic =
          seg.isValid() ? seg.rows < 0 : step.facts.staticCapacity < 0;
      if (!dynamic)
        continue;
      const int64_t declared =
          gemm->rows->shape.empty() ? 0 : gemm->rows->shape.front();
      const int64_t rowBound =
          std::max<int64_t>(0, declared - (seg.isValid() ? seg.baseRow : 0));
      if (!prefersDeviceGemm(GroupedGemmImpl::Auto, rowBound, gemm->groups,
                             /*capturing=*/false,
                             step.op == StepOp::GroupedGemmWgrad, wgmma,
                             step.gathersA()))
        return false;
    }
  return true;
}

} // namespace

CudaBackend::CudaBackend(int device,
                         std::unique_ptr<cuda::KernelContext> context,
                         const RuntimeOptions &options)
    : device_(device), ctx_(std::move(context)), overlap_(options.cudaOverlap),
      exchangeStaging_(options.a2aStaging),
      collectiveTimeoutSeconds_(options.collectiveTimeoutSeconds) {
  ctx_->groupedGemm = options.groupedGemm;
  ctx_->reluInGemm = options.reluInGemm;
  ctx_->wgmma = options.wgmma;
  ctx_->wgmmaTile = options.wgmmaTile;
  ctx_->gemmStreams = options.gemmStreams;
  setRowKernels();
  setRoutingKernels();
  setCollectiveKernels();
}

void CudaBackend::setRowKernels() {
  // Each kernel sees the rows of its step (RowArgs) on the compute stream.
  auto rowKernel = [this](StepOp op, auto kernel) {
    setKernel(op, [this, kernel](const Plan &plan, const Step &step,
                                 const StepOperands &ops) {
      RowArgs x(plan, step, ops);
      return kernel(*ctx_, step, ops, x);
    });
  };
  using Ctx = cuda::KernelContext;
  using Ops = StepOperands;
  rowKernel(StepOp::Dispatch,
            [](Ctx &ctx, const Step &, const Ops &ops, RowArgs &x) {
              return cuda::dispatch(ctx, read(ops.in(R::X)), x.d, x.routing,
                                    x.rows.space(ops.out(R::Dispatched)),
                                    write(ops.out(R::Dispatched)));
            });
  rowKernel(StepOp::DispatchRows, [](Ctx &ctx, const Step &, const Ops &ops,
                                     RowArgs &x) {
    const TensorView &rowTokens = ops.out(R::RowTokens);
    const cuda::ExpertRowSpace space = x.rows.space(rowTokens);
    return cuda::dispatchRows(ctx, x.routing, rowTokens.desc->shape.front(),
                              space.isStatic() || space.padded,
                              writeAs<int32_t>(rowTokens));
  });
  // A gathered A (row_tokens) is x, not dispatch-shaped: the rows are c's.
  rowKernel(StepOp::GroupedGemm,
            [](Ctx &ctx, const Step &step, const Ops &ops, RowArgs &x) {
              const RowGather gather = x.rows.shift(rowGather(ops, x));
              const TensorView a =
                  gather.rowTokens ? ops.in(R::A) : x.shift(ops.in(R::A));
              const TensorView c = x.shift(ops.out(R::C));
              return cuda::groupedGemm(ctx, read(a), read(ops.in(R::B)),
                                       read(ops.in(R::Bias)), write(c), cols(a),
                                       cols(c), x.rows.space(c),
                                       step_views::gemmOptions(step.attrs),
                                       write(x.shift(ops.out(R::Pre))), gather);
            });
  rowKernel(StepOp::GroupedGemmGlu, [](Ctx &ctx, const Step &, const Ops &ops,
                                       RowArgs &x) {
    const RowGather gather = x.rows.shift(rowGather(ops, x));
    const TensorView a =
        gather.rowTokens ? ops.in(R::A) : x.shift(ops.in(R::A));
    const TensorView c = x.shift(ops.out(R::C));
    return cuda::groupedGemmGlu(
        ctx, read(a), read(ops.in(R::B)), read(ops.in(R::BUp)), write(c),
        cols(a), cols(c), x.rows.space(c), write(x.shift(ops.out(R::GateIn))),
        write(x.shift(ops.out(R::UpIn))), gather);
  });
  rowKernel(
      StepOp::Glu, [](Ctx &ctx, const Step &, const Ops &ops, RowArgs &x) {
        return cuda::glu(ctx, read(x.shift(ops.in(R::GateIn))),
                         read(x.shift(ops.in(R::UpIn))),
                         write(x.shift(ops.out(R::C))), cols(ops.out(R::C)),
                         x.rows.shiftedSpace(ops.out(R::C)));
      });
  rowKernel(StepOp::Combine,
            [](Ctx &ctx, const Step &, const Ops &ops, RowArgs &x) {
              return cuda::combine(ctx, read(ops.in(R::ExpertOut)), x.d,
                                   x.routing, write(ops.out(R::Out)));
            });
  // Not chunked (--moert-fuse-combine fuses one GEMM over every row): the
  // combine reads the whole product.
  rowKernel(StepOp::GroupedGemmCombine, [](Ctx &ctx, const Step &step,
                                           const Ops &ops, RowArgs &x) {
    const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
    return cuda::groupedGemmCombine(
        ctx, read(a), read(ops.in(R::B)), read(ops.in(R::Bias)), write(c),
        cols(a), cols(c), x.rows.space(c), step_views::gemmOptions(step.attrs),
        x.routing, readAs<int32_t>(ops.in(R::RowTokens)),
        write(ops.out(R::Out)));
  });
  rowKernel(StepOp::CombineBackward, [](Ctx &ctx, const Step &, const Ops &ops,
                                        RowArgs &x) {
    return cuda::combineBackward(ctx, read(ops.in(R::GradOut)),
                                 read(ops.in(R::ExpertOut)), x.d, x.routing,
                                 x.rows.space(ops.out(R::GradExpertOut)),
                                 write(ops.out(R::GradExpertOut)),
                                 writeAs<float>(ops.out(R::GradGates)));
  });
  rowKernel(StepOp::GroupedGemmWgrad,
            [](Ctx &ctx, const Step &step, const Ops &ops, RowArgs &x) {
              const RowGather gather = x.rows.shift(rowGather(ops, x));
              const TensorView a =
                  gather.rowTokens ? ops.in(R::A) : x.shift(ops.in(R::A));
              const TensorView gradC = x.shift(ops.in(R::GradC));
              return cuda::groupedGemmWgrad(
                  ctx, read(a), read(gradC), cols(a), cols(gradC),
                  x.rows.space(gradC), write(ops.out(R::GradB)),
                  write(ops.out(R::GradBias)), step.attrs.accumulate, gather);
            });
  rowKernel(StepOp::GroupedGemmActivationBackward,
            [](Ctx &ctx, const Step &step, const Ops &ops, RowArgs &x) {
              const TensorView a = x.shift(ops.in(R::A));
              const TensorView c = x.shift(ops.out(R::C));
              return cuda::groupedGemmActivationBackward(
                  ctx, read(a), read(ops.in(R::B)),
                  read(x.shift(ops.in(R::Pre))), write(c), cols(a), cols(c),
                  x.rows.space(c), step.attrs.transB, step.attrs.activation);
            });
  rowKernel(StepOp::GroupedGemmGluBackward, [](Ctx &ctx, const Step &step,
                                               const Ops &ops, RowArgs &x) {
    const TensorView a = x.shift(ops.in(R::A));
    const TensorView gradGate = x.shift(ops.out(R::GradGateIn));
    return cuda::groupedGemmGluBackward(
        ctx, read(a), read(ops.in(R::B)), read(x.shift(ops.in(R::GateIn))),
        read(x.shift(ops.in(R::UpIn))), write(gradGate),
        write(x.shift(ops.out(R::GradUpIn))), cols(a), cols(gradGate),
        x.rows.space(gradGate), step.attrs.transB);
  });
  rowKernel(StepOp::ActivationBackward, [](Ctx &ctx, const Step &step,
                                           const Ops &ops, RowArgs &x) {
    return cuda::activationBackward(
        ctx, read(x.shift(ops.in(R::Pre))), read(x.shift(ops.in(R::Grad))),
        write(x.shift(ops.out(R::GradPre))), cols(ops.out(R::GradPre)),
        x.rows.shiftedSpace(ops.out(R::GradPre)), step.attrs.activation);
  });
  rowKernel(StepOp::GluBackward, [](Ctx &ctx, const Step &, const Ops &ops,
                                    RowArgs &x) {
    return cuda::gluBackward(
        ctx, read(x.shift(ops.in(R::GateIn))), read(x.shift(ops.in(R::UpIn))),
        read(x.shift(ops.in(R::Grad))), write(x.shift(ops.out(R::GradGateIn))),
        write(x.shift(ops.out(R::GradUpIn))), cols(ops.in(R::Grad)),
        x.rows.shiftedSpace(ops.in(R::Grad)));
  });
  rowKernel(StepOp::DispatchBackward, [](Ctx &ctx, const Step &, const Ops &ops,
                                         RowArgs &x) {
    return cuda::dispatchBackward(ctx, read(ops.in(R::GradDispatched)), x.d,
                                  x.routing, write(ops.out(R::GradX)));
  });
}

void CudaBackend::setRoutingKernels() {
  // Each kernel sees the layer's sizes and the routing its step reads.
  auto routingKernel = [this](StepOp op, auto kernel) {
    setKernel(op, [this, kernel](const Plan &plan, const Step &step,
                                 const StepOperands &ops) {
      step_views::LayerArgs x(plan, ops);
      return kernel(*ctx_, step, ops, x);
    });
  };
  using Ctx = cuda::KernelContext;
  using Ops = StepOperands;
  using Args = step_views::LayerArgs;
  routingKernel(
      StepOp::Router, [](Ctx &ctx, const Step &, const Ops &ops, Args &x) {
        return cuda::router(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                            writeAs<float>(ops.out(R::Logits)), x.T, x.d, x.E);
      });
  routingKernel(StepOp::Gate,
                [this](Ctx &ctx, const Step &step, const Ops &ops, Args &x) {
                  GateOutputs out = step_views::gateOutputs(ops);
                  // A new device capacity: a host copy of the earlier one is
                  // stale.
                  ++capacityEpoch_;
                  // The capacity stays on the device; by [cap-1] it never
                  // exceeds the static bound the plan sized its buffers for
                  // (the CPU backend checks).
                  return cuda::gate(ctx, readAs<float>(ops.in(R::Logits)), x.T,
                                    x.E, step.attrs, out);
                });
  routingKernel(StepOp::GateBackward, [](Ctx &ctx, const Step &step,
                                         const Ops &ops, Args &x) {
    return cuda::gateBackward(ctx, readAs<float>(ops.in(R::GradGates)),
                              readAs<float>(ops.in(R::GradLAux)),
                              readAs<float>(ops.in(R::Scores)), x.routing,
                              step_views::gateBackwardAttrs(step.attrs),
                              writeAs<float>(ops.out(R::GradLogits)));
  });
  routingKernel(StepOp::RouterBackward, [](Ctx &ctx, const Step &,
                                           const Ops &ops, Args &x) {
    return cuda::routerBackward(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                                readAs<float>(ops.in(R::GradLogits)), x.T, x.d,
                                x.E, write(ops.out(R::GradX)),
                                write(ops.out(R::GradWg)));
  });
  routingKernel(StepOp::UniformSegments, [](Ctx &ctx, const Step &step,
                                            const Ops &ops, Args &x) {
    const StepAttrs &a = step.attrs;
    // New offsets in the same buffer: the GEMMs' host copy is stale.
    ++ctx.generation;
    return cuda::uniformSegments(ctx, x.routing.capacity, a.groups, a.ranks,
                                 a.chunks, a.chunk,
                                 writeAs<int32_t>(ops.out(R::ExpertOffsets)),
                                 writeAs<int32_t>(ops.out(R::ExpertRows)));
  });
  routingKernel(StepOp::ShardRouting,
                [](Ctx &ctx, const Step &step, const Ops &ops, Args &x) {
                  return runShardRouting(ctx, step, ops, x.routing);
                });
  routingKernel(StepOp::ShardRoutingBackward, [](Ctx &ctx, const Step &step,
                                                 const Ops &ops, Args &x) {
    const int64_t s = step.attrs.shards, k = x.k;
    const TensorView &in = ops.in(R::GradGates), &out = ops.out(R::GradGates);
    if (s < 1 || in.desc->shape[1] != k * s || out.desc->shape[1] != k)
      return Status(
          StatusCode::InvalidArgument,
          "shard_routing_backward with shards = " + std::to_string(s) +
              " and k = " + std::to_string(k) + " needs '" + in.desc->name +
              "' [T, k*s] and '" + out.desc->name + "' [T, k]; got " +
              std::to_string(in.desc->shape[1]) + " and " +
              std::to_string(out.desc->shape[1]) + " columns");
    return cuda::shardRoutingBackward(ctx, readAs<float>(in), x.T, k, s,
                                      writeAs<float>(out));
  });
}

void CudaBackend::setCollectiveKernels() {
  // CudaExchange.cpp; each runs through collectiveCommunicator: a device
  // communicator, on the compute stream.
  setCollectiveKernel(StepOp::SyncCapacity, &CudaBackend::syncCapacity);
  setCollectiveKernel(StepOp::AllToAll, &CudaBackend::allToAll);
  setGatherScatterKernels();
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  // Queued collectives may still read the staging blocks. A stream that
  // waits for a peer which is gone may never drain: wait at most the
  // collective timeout, then leave the staging allocated rather than free
  // it under a transfer.
  double timeout = collectiveTimeoutSeconds_;
  auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(timeout));
  auto drain = [&](cudaStream_t stream) {
    while (cudaStreamQuery(stream) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() >= deadline)
        return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    cudaGetLastError();
    return true;
  };
  bool drained = drain(ctx_->stream());
  if (exchangeStream_) {
    drained = drain(exchangeStream_) && drained;
    cudaStreamDestroy(exchangeStream_);
  }
  for (cudaEvent_t event : pendingEvents_)
    freeEvents_.push_back(event);
  for (cudaEvent_t event : freeEvents_)
    cudaEventDestroy(event);
  if (computeReady_)
    cudaEventDestroy(computeReady_);
  for (auto &[key, exec] : graphs_)
    cudaGraphExecDestroy(exec);
  for (cudaEvent_t event : events_)
    cudaEventDestroy(event);
  if (!drained)
    return;
  for (Staging &area : staging_)
    if (area.data)
      cudaFree(area.data);
  if (pinnedCapacity_)
    cudaFreeHost(pinnedCapacity_);
}

Status CudaBackend::synchronize() {
  if (Status s = joinExchanges(); !s)
    return s;
  // A device communicator bounds the wait: a dead peer fails the call with
  // CommunicationError instead of hanging here.
  if (hasDeviceCommunicator(communicator_))
    return communicator_->synchronizeStream(ctx_->stream(),
                                            "waiting for the stream");
  return cuda::checkCuda(cudaStreamSynchronize(ctx_->stream()),
                         "waiting for the stream (an earlier kernel may have "
                         "failed)");
}

Status CudaBackend::setCommunicator(std::shared_ptr<Communicator> comm) {
  ctx_->streamWaiter = nullptr;
  if (hasDeviceCommunicator(comm)) {
    Communicator *raw = comm.get();
    ctx_->streamWaiter = [raw](cuda::Stream stream) {
      return raw->synchronizeStream(stream, "waiting for the stream");
    };
  }
  communicator_ = std::move(comm);
  return Status::ok();
}

Status CudaBackend::setStream(void *stream) {
  return ctx_->setStream(static_cast<cudaStream_t>(stream));
}

void *CudaBackend::allocate(int64_t bytes, int64_t alignment) {
  // cudaMalloc aligns to at least 256 bytes.
  if (alignment > 256 || !makeCurrent())
    return nullptr;
  void *data = nullptr;
  if (cudaMalloc(&data, static_cast<size_t>(std::max<int64_t>(bytes, 1))) !=
      cudaSuccess) {
    cudaGetLastError(); // an allocation failure is not sticky; clear it
    return nullptr;
  }
  return data;
}

void CudaBackend::deallocate(void *data) {
  if (data)
    cudaFree(data);
}

Status CudaBackend::copyToHost(void *hostDst, const void *src, int64_t bytes) {
  return cuda::checkCuda(cudaMemcpy(hostDst, src, static_cast<size_t>(bytes),
                                    cudaMemcpyDeviceToHost),
                         "copying a buffer to the host");
}

Status CudaBackend::copyFromHost(void *dst, const void *hostSrc,
                                 int64_t bytes) {
  // On the compute stream, so what is queued there next reads it (the
  // caller's stream may be a non-blocking one).
  return cuda::checkCuda(cudaMemcpyAsync(dst, hostSrc,
                                         static_cast<size_t>(bytes),
                                         cudaMemcpyHostToDevice,
                                         ctx_->stream()),
                         "copying a buffer from the host");
}

void *CudaBackend::currentStream() const { return ctx_->stream(); }

bool CudaBackend::groupedGemmRunsWgmma() const {
  return cuda::detail::hopperGroupedGemmRuns(*ctx_);
}

bool CudaBackend::isRecording() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(ctx_->stream(), &status) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

Status CudaBackend::recordTimestamp(int32_t marker) {
  while (static_cast<int32_t>(events_.size()) <= marker) {
    cudaEvent_t event = nullptr;
    if (Status s = cuda::checkCuda(cudaEventCreate(&event), "cudaEventCreate");
        !s)
      return s;
    events_.push_back(event);
  }
  return cuda::checkCuda(cudaEventRecord(events_[marker], ctx_->stream()),
                         "cudaEventRecord");
}

Status CudaBackend::elapsedMicros(int32_t from, int32_t to, double &micros) {
  micros = 0;
  if (from < 0 || to >= static_cast<int32_t>(events_.size()))
    return Status(StatusCode::Internal,
                  "timing marker " + std::to_string(to) + " was not recorded");
  float ms = 0;
  if (Status s =
          cuda::checkCuda(cudaEventElapsedTime(&ms, events_[from], events_[to]),
                          "cudaEventElapsedTime");
      !s)
    return s;
  micros = 1000.0 * ms;
  return Status::ok();
}

bool CudaBackend::canCapturePass(const Plan &plan, int64_t variant,
                                 bool backward) const {
  // Backward reads the forward's routing: both are static when every gate of
  // the forward is.
  const Variant &v = plan.variants[variant];
  // Passes with collective steps run eagerly: the communicator's bounded
  // waits poll on the host, which a graph cannot record.
  for (const std::vector<Step> *steps : {&v.forward, &v.backward})
    for (const Step &step : *steps)
      if (isCollective(step.op) || step.op == StepOp::UniformSegments)
        return false;
  // A dynamic routing records too where its grouped GEMMs size themselves
  // on the device (grouped_gemm=device, or auto where its rule takes the
  // device kernel for every one of them - decode; 16-bit experts, rows
  // 16-byte aligned).
  const int64_t hiddenPerRank = plan.layer.hiddenDim / plan.shards();
  const bool deviceSized =
      (ctx_->groupedGemm == GroupedGemmImpl::Device ||
       (ctx_->groupedGemm == GroupedGemmImpl::Auto &&
        autoTakesDeviceKernels(plan, v,
                               cuda::detail::hopperGroupedGemmRuns(*ctx_)))) &&
      deviceGemmShapeFits(plan.layer.dtype, plan.layer.modelDim,
                          hiddenPerRank) &&
      cuda::detail::deviceGroupedGemmRuns(*ctx_) && gemmGridsFit(plan, v);
  // An aligned layout's forward GEMMs size themselves on the device on
  // cuBLAS too (one batched call over its row blocks), where every dynamic
  // GEMM of the forward reads the aligned routing; its weight gradients
  // still read the counts back.
  bool anyGate = false, dynamicGate = false, forwardOnBlocks = !backward;
  for (const Step &step : v.forward) {
    if (step.op == StepOp::Gate) {
      anyGate = true;
      dynamicGate = dynamicGate || step.facts.staticCapacity < 0;
    }
    if (getStepKind(step.op).cost == StepCost::ExpertGemm &&
        step.facts.staticCapacity < 0 && !step.facts.aligned)
      forwardOnBlocks = false;
  }
  return anyGate && (!dynamicGate || deviceSized || forwardOnBlocks);
}

Status CudaBackend::beginGraphCapture() {
  if (Status s = makeCurrent(); !s)
    return s;
  if (Status s = cuda::checkCuda(
          cudaStreamBeginCapture(ctx_->stream(),
                                 cudaStreamCaptureModeThreadLocal),
          "cudaStreamBeginCapture (the legacy default stream cannot be "
          "recorded; pass a created stream)");
      !s)
    return s;
  ctx_->capturing = true;
  return Status::ok();
}

Status CudaBackend::endGraphCapture(const std::string &key) {
  ctx_->capturing = false;
  cudaGraph_t graph = nullptr;
  Status status = cuda::checkCuda(cudaStreamEndCapture(ctx_->stream(), &graph),
                                  "cudaStreamEndCapture");
  if (!status || key.empty()) {
    if (graph)
      cudaGraphDestroy(graph);
    return status;
  }
  cudaGraphExec_t exec = nullptr;
  status = cuda::checkCuda(cudaGraphInstantiate(&exec, graph, 0),
                           "cudaGraphInstantiate");
  cudaGraphDestroy(graph);
  if (!status)
    return status;
  auto [it, inserted] = graphs_.emplace(key, exec);
  if (!inserted) {
    cudaGraphExecDestroy(it->second);
    it->second = exec;
  }
  return Status::ok();
}

Status CudaBackend::launchGraph(const std::string &key, bool &launched) {
  launched = false;
  auto it = graphs_.find(key);
  if (it == graphs_.end())
    return Status::ok();
  if (Status s = makeCurrent(); !s)
    return s;
  if (Status s = cuda::checkCuda(cudaGraphLaunch(it->second, ctx_->stream()),
                                 "cudaGraphLaunch");
      !s)
    return s;
  // The replay's gates write new counts in place: a host copy of the old
  // ones must not be reused.
  ++ctx_->generation;
  launched = true;
  return Status::ok();
}

Status CudaBackend::runStep(const Plan &plan, const Step &step,
                            const StepOperands &ops) {
  if (Status s = makeCurrent(); !s)
    return s;
  if (Status s = orderAfterExchanges(step, ops); !s)
    return s;
  return runKernel(plan, step, ops);
}

Status createCudaBackend(std::unique_ptr<Backend> &backend,
                         const RuntimeOptions &runtime,
                         const CudaBackendOptions &options) {
  backend.reset();
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    std::string reason = error != cudaSuccess
                             ? std::string(cudaGetErrorName(error)) + ": " +
                                   cudaGetErrorString(error)
                             : "no CUDA device is visible";
    cudaGetLastError();
    return Status(StatusCode::Unavailable,
                  "the CUDA backend cannot run: " + reason);
  }
  int device = options.device;
  if (device < 0) {
    if (Status s = cuda::checkCuda(cudaGetDevice(&device), "cudaGetDevice"); !s)
      return Status(StatusCode::Unavailable, s.message());
  }
  if (device >= count)
    return Status(StatusCode::InvalidArgument,
                  "CUDA device " + std::to_string(device) +
                      " does not exist; this machine has " +
                      std::to_string(count) + " (0 to " +
                      std::to_string(count - 1) + ")");
  if (Status s = cuda::checkCuda(cudaSetDevice(device), "cudaSetDevice"); !s)
    return Status(StatusCode::Unavailable, s.message());
  std::unique_ptr<cuda::KernelContext> context;
  if (Status s = cuda::KernelContext::create(context); !s)
    return s;
  backend = std::make_unique<CudaBackend>(device, std::move(context), runtime);
  return Status::ok();
}

bool isCudaBackendUsable(std::string *reason) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    if (reason)
      *reason = error != cudaSuccess ? std::string(cudaGetErrorName(error)) +
                                           ": " + cudaGetErrorString(error)
                                     : "no CUDA device is visible";
    cudaGetLastError();
    return false;
  }
  return true;
}

} // namespace flex
