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
// and replayed. Every CUDA and cuBLAS error comes back as a Status.
//
// Collective steps run through a device communicator (NCCL). all_to_all
// sends and receives its rows in place, one run of Cq rows per (peer, local
// expert) (AllToAllLayout::blocks), on an exchange stream of its own: it
// waits for the compute queued before it, and a later compute step waits
// for a pending exchange only when their bytes overlap (the rows of one
// chunk, for the segment ops of a pipelined variant). So chunk q + 1 moves
// while chunk q's experts run. RuntimeOptions::cudaOverlap false
// (FLEX_CUDA_OVERLAP=0) queues exchanges on the compute stream instead. Runs
// smaller than kMinInPlaceRunBytes are packed into one staging block per peer
// with a kernel first (a2aStaging, FLEX_A2A_STAGING: always or never instead;
// the 2DH exchange always packs). The other collectives
// run on the compute stream after every pending exchange. sync_capacity and
// uniform_segments compute offsets from the capacity on the device;
// all_to_all needs C on the host for its byte counts: known there for a
// fixed capacity, else read back once per routing (one bounded wait, as the
// grouped GEMMs of a dynamic routing).
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

#include "flex/Runtime/Cuda/CudaBackend.h"
#include "flex/Runtime/Comm/AllToAllLayout.h"
#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Comm/HierarchicalAllToAll.h"
#include "flex/Runtime/Cuda/CudaKernels.h"
#include "flex/Runtime/StepBytes.h"
#include "flex/Runtime/StepViews.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace flex {
namespace {

using R = OperandRole;

using step_views::read;
using step_views::readAs;
using step_views::write;
using step_views::writeAs;

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

int64_t cols(const TensorView &view) { return view.desc->shape.back(); }

/// One flat all_to_all, as the exchange functions need it.
struct AllToAllRun {
  cuda::AllToAllShape shape;
  const TensorView *input = nullptr, *output = nullptr;
  /// The sending side is in the dispatch layout (`dispatch`), else in the
  /// received layout (`combine`); the receiving side the other one.
  bool sendDispatchLayout = true;
  int64_t rowBytes = 0;
  int64_t rowsPerChunk = 0; ///< Cq = C / D
  int64_t blockBytes = 0;   ///< L * Cq rows: what one peer gets
  std::vector<Communicator::Block> sendBlocks, recvBlocks;
  std::string what;

  /// A side whose rows per peer are contiguous (dispatch layout with one
  /// chunk; received layout with one local expert) needs no staging.
  bool contiguous(bool dispatchLayout) const {
    return dispatchLayout ? shape.chunks == 1 : shape.localExperts == 1;
  }
  /// The first row of peer `peer`'s rows on a contiguous side.
  int64_t firstRow(bool dispatchLayout, int64_t peer) const {
    return dispatchLayout
               ? peer * shape.localExperts * shape.capacity +
                     shape.chunk * rowsPerChunk
               : (shape.chunk * shape.ranks + peer) * rowsPerChunk; // L == 1
  }
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

class CudaBackend final : public Backend {
public:
  CudaBackend(int device, std::unique_ptr<cuda::KernelContext> context,
              const RuntimeOptions &options)
      : device_(device), ctx_(std::move(context)),
        overlap_(options.cudaOverlap), exchangeStaging_(options.a2aStaging),
        collectiveTimeoutSeconds_(options.collectiveTimeoutSeconds) {}
  ~CudaBackend() override;

  std::string_view name() const override { return "cuda"; }
  Status runStep(const Plan &plan, const Step &step,
                 const StepOperands &operands) override;
  Status synchronize() override;
  Status setStream(void *stream) override;
  void *allocate(int64_t bytes, int64_t alignment) override;
  void deallocate(void *data) override;

  bool isHostMemory() const override { return false; }
  Status copyToHost(void *hostDst, const void *src, int64_t bytes) override;

  bool hasDeviceTimer() const override { return true; }
  Status recordTimestamp(int32_t marker) override;
  Status elapsedMicros(int32_t from, int32_t to, double &micros) override;

  bool canCapturePass(const Plan &plan, int64_t variant,
                      bool backward) const override;
  Status beginGraphCapture() override;
  Status endGraphCapture(const std::string &key) override;
  Status launchGraph(const std::string &key, bool &launched) override;

  Status setCommunicator(std::shared_ptr<Communicator> communicator) override;

private:
  Status makeCurrent() {
    return cuda::checkCuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  Status runCollective(const Plan &plan, const Step &step,
                       const StepOperands &ops);
  /// The step kinds that make, transform or differentiate a routing (and
  /// the router): no dispatch-shaped rows.
  Status runRoutingStep(const Plan &plan, const Step &step,
                        const StepOperands &ops);
  /// The per-expert steps over dispatch-shaped rows (RowSpaces).
  Status runRowStep(const Plan &plan, const Step &step,
                    const StepOperands &ops);
  /// Orders `step` after the pending exchanges its facts say it waits for:
  /// all of them, or those whose bytes it touches (the rows of its chunk
  /// for a segment op). all_to_all orders itself (allToAll).
  Status orderAfterExchanges(const Step &step, const StepOperands &ops);
  Status allToAll(const Plan &plan, const Step &step, const StepOperands &ops,
                  Communicator &comm);
  /// The flat exchange of `run` on `stream`: in place, or staged.
  Status exchangeRows(const AllToAllRun &run, bool staged, Communicator &comm,
                      cudaStream_t stream);
  /// Rows packed per peer into staging blocks by a kernel, exchanged, and
  /// unpacked, on the context's stream.
  Status stagedExchange(const AllToAllRun &run, Communicator &comm);
  /// exchangeRows on the exchange stream after the compute queued so far;
  /// the exchange is left pending (pendingEvents_).
  Status exchangeOnOwnStream(const AllToAllRun &run, bool staged,
                             Communicator &comm);
  /// C on the host for the capacity buffer `view`: the static capacity of
  /// the step's facts, else read back from the device (written by the gate
  /// or sync_capacity of the current routing).
  Status hostCapacity(const StepFacts &facts, const TensorView &view,
                      int64_t &capacity);
  /// The two-phase all_to_all of ranks_per_node (HierarchicalAllToAll.h)
  /// on device staging blocks.
  Status hierarchicalAllToAll(const cuda::AllToAllShape &shape,
                              bool sendDispatchLayout, void *input,
                              void *output, int64_t rowBytes,
                              int64_t ranksPerNode, Communicator &comm,
                              const std::string &what);
  /// Grow-only device staging for all_to_all, kept between steps.
  Status staging(int slot, int64_t bytes, void *&data);

  /// Makes the compute stream wait for pending exchange `index` (and so for
  /// every one before it, in stream order) and forgets them.
  Status waitForExchange(size_t index);
  /// Waits for every pending exchange (a join of the two streams).
  Status joinExchanges() {
    return pendingEvents_.empty() ? Status::ok()
                                  : waitForExchange(pendingEvents_.size() - 1);
  }
  /// Waits for the pending exchanges whose bytes overlap what the step with
  /// operands `ops` touches (StepBytes.h).
  Status waitForOverlappingExchanges(const StepOperands &ops, ChunkRows chunk);
  Status endPass() override;
  /// The exchange stream and its events, made on first use.
  Status exchangeStream(cudaStream_t &stream);
  Status takeEvent(cudaEvent_t &event);

  int device_;
  std::unique_ptr<cuda::KernelContext> ctx_;
  std::vector<cudaEvent_t> events_;
  std::map<std::string, cudaGraphExec_t> graphs_;
  /// The read-back of a capacity known only on the device (hostCapacity).
  /// Run-time data, not plan analysis: the C a gate or sync_capacity wrote
  /// on the device this call. The epoch is bumped by every step that
  /// (re)writes a capacity: gate, sync_capacity.
  uint64_t capacityEpoch_ = 0;
  const void *capacityKey_ = nullptr;
  uint64_t capacityKeyEpoch_ = ~uint64_t{0};
  int64_t cachedCapacity_ = 0;
  int32_t *pinnedCapacity_ = nullptr;
  struct Staging {
    void *data = nullptr;
    int64_t bytes = 0;
  };
  Staging staging_[3];
  /// RuntimeOptions::cudaOverlap (default on): exchanges on their own
  /// stream.
  bool overlap_ = true;
  /// RuntimeOptions::a2aStaging: Always packs rows into staging blocks,
  /// Never sends them in place; Auto packs runs under kMinInPlaceRunBytes.
  ExchangeStaging exchangeStaging_ = ExchangeStaging::Auto;
  /// The longest the destructor waits for the streams to drain.
  double collectiveTimeoutSeconds_ = kDefaultCollectiveTimeoutSeconds;
  static constexpr int64_t kMinInPlaceRunBytes = int64_t{8} << 20;
  cudaStream_t exchangeStream_ = nullptr;
  cudaEvent_t computeReady_ = nullptr;
  /// all_to_alls queued on the exchange stream and not yet waited for,
  /// oldest first: the event each records, and the bytes it reads and writes.
  std::vector<cudaEvent_t> pendingEvents_;
  std::vector<StepBytes> pendingBytes_;
  std::vector<cudaEvent_t> freeEvents_;
};

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  // Queued collectives may still read the staging blocks. A stream that
  // waits for a peer which is gone may never drain: wait at most the
  // collective timeout, then leave the staging allocated rather than free
  // it under a transfer.
  double timeout = collectiveTimeoutSeconds_;
  auto deadline = std::chrono::steady_clock::now() +
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

bool hasDeviceCommunicator(const std::shared_ptr<Communicator> &comm) {
  return comm && comm->memory() == CommMemory::Device;
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

Status CudaBackend::staging(int slot, int64_t bytes, void *&data) {
  Staging &area = staging_[slot];
  if (area.bytes < bytes) {
    if (ctx_->capturing)
      return Status(StatusCode::Internal,
                    "all_to_all staging cannot grow while a graph records");
    if (area.data) {
      // Earlier collectives may still use it.
      if (Status s = synchronize(); !s)
        return s;
      cudaFree(area.data);
      area = {};
    }
    int64_t rounded = (bytes + (int64_t{1} << 20) - 1) >> 20 << 20;
    if (Status s = cuda::checkCuda(
            cudaMalloc(&area.data, static_cast<size_t>(rounded)),
            ("cudaMalloc of " + std::to_string(rounded) +
             " bytes of all_to_all staging")
                .c_str());
        !s)
      return s;
    area.bytes = rounded;
  }
  data = area.data;
  return Status::ok();
}

Status CudaBackend::exchangeStream(cudaStream_t &stream) {
  if (!exchangeStream_) {
    // The highest priority: exchange blocks start as soon as SMs free up,
    // ahead of the expert GEMMs' waiting blocks.
    int least = 0, greatest = 0;
    if (Status s =
            cuda::checkCuda(cudaDeviceGetStreamPriorityRange(&least, &greatest),
                            "cudaDeviceGetStreamPriorityRange");
        !s)
      return s;
    if (Status s = cuda::checkCuda(
            cudaStreamCreateWithPriority(&exchangeStream_,
                                         cudaStreamNonBlocking, greatest),
            "creating the exchange stream");
        !s)
      return s;
  }
  if (!computeReady_)
    if (Status s = cuda::checkCuda(
            cudaEventCreateWithFlags(&computeReady_, cudaEventDisableTiming),
            "cudaEventCreate");
        !s)
      return s;
  stream = exchangeStream_;
  return Status::ok();
}

Status CudaBackend::takeEvent(cudaEvent_t &event) {
  if (!freeEvents_.empty()) {
    event = freeEvents_.back();
    freeEvents_.pop_back();
    return Status::ok();
  }
  return cuda::checkCuda(
      cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
      "cudaEventCreate");
}

Status CudaBackend::waitForExchange(size_t index) {
  if (Status s = cuda::checkCuda(
          cudaStreamWaitEvent(ctx_->stream(), pendingEvents_[index], 0),
          "waiting for an all_to_all on the exchange stream");
      !s)
    return s;
  const auto count = static_cast<std::ptrdiff_t>(index + 1);
  freeEvents_.insert(freeEvents_.end(), pendingEvents_.begin(),
                     pendingEvents_.begin() + count);
  pendingEvents_.erase(pendingEvents_.begin(), pendingEvents_.begin() + count);
  pendingBytes_.erase(pendingBytes_.begin(), pendingBytes_.begin() + count);
  return Status::ok();
}

Status CudaBackend::endPass() {
  if (Status s = makeCurrent(); !s)
    return s;
  return joinExchanges();
}

Status CudaBackend::waitForOverlappingExchanges(const StepOperands &ops,
                                                ChunkRows chunk) {
  int64_t index = newestToFollow(pendingBytes_, stepBytes(ops, chunk));
  return index < 0 ? Status::ok() : waitForExchange(static_cast<size_t>(index));
}

Status CudaBackend::hostCapacity(const StepFacts &facts, const TensorView &view,
                                 int64_t &capacity) {
  // A fixed capacity is the same on every rank and known before gating.
  if (facts.staticCapacity >= 0) {
    capacity = facts.staticCapacity;
    return Status::ok();
  }
  // The C the device wrote for this routing: run-time data, read back once
  // per capacity write (capacityEpoch_) and kept for the later exchanges.
  if (capacityKey_ == view.data && capacityKeyEpoch_ == capacityEpoch_) {
    capacity = cachedCapacity_;
    return Status::ok();
  }
  if (ctx_->capturing)
    return Status(StatusCode::Internal,
                  "all_to_all of a capacity known only on the device cannot "
                  "be recorded as a graph");
  if (!pinnedCapacity_)
    if (Status s = cuda::checkCuda(cudaMallocHost(&pinnedCapacity_, 4),
                                   "cudaMallocHost of the capacity read-back");
        !s)
      return s;
  if (Status s = cuda::checkCuda(cudaMemcpyAsync(pinnedCapacity_, view.data, 4,
                                                 cudaMemcpyDeviceToHost,
                                                 ctx_->stream()),
                                 "reading the capacity");
      !s)
    return s;
  if (Status s = ctx_->waitForStream("waiting for the capacity read-back"); !s)
    return s;
  capacityKey_ = view.data;
  capacityKeyEpoch_ = capacityEpoch_;
  cachedCapacity_ = *pinnedCapacity_;
  capacity = cachedCapacity_;
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
                                 bool) const {
  // Backward reads the forward's routing: both are static when every gate of
  // the forward is.
  const Variant &v = plan.variants[variant];
  // Passes with collective steps run eagerly: the communicator's bounded
  // waits poll on the host, which a graph cannot record.
  for (const std::vector<Step> *steps : {&v.forward, &v.backward})
    for (const Step &step : *steps)
      if (isCollective(step.op) || step.op == StepOp::UniformSegments)
        return false;
  bool anyGate = false;
  for (const Step &step : v.forward)
    if (step.op == StepOp::Gate) {
      anyGate = true;
      if (step.facts.staticCapacity < 0)
        return false;
    }
  return anyGate;
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
  launched = true;
  return Status::ok();
}

Status CudaBackend::orderAfterExchanges(const Step &step,
                                        const StepOperands &ops) {
  if (pendingEvents_.empty() || step.op == StepOp::AllToAll)
    return Status::ok();
  switch (step.facts.wait) {
  case ExchangeWait::None:
    return Status::ok();
  case ExchangeWait::All:
    return joinExchanges();
  case ExchangeWait::Overlapping:
    break;
  }
  // A segment op's chunk: G groups of n = W * C / D rows, when C is on the
  // host (static, or read back for this routing).
  ChunkRows chunk;
  if (const SegmentFacts &segments = step.facts.segments; segments.isValid()) {
    int64_t n = segments.rows;
    if (n < 0 && segments.chunks > 0 && capacityKeyEpoch_ == capacityEpoch_)
      n = segments.rowsFor(cachedCapacity_);
    if (n >= 0)
      chunk = {segments.chunk, segments.groups * n};
  }
  return waitForOverlappingExchanges(ops, chunk);
}

Status CudaBackend::runStep(const Plan &plan, const Step &step,
                            const StepOperands &ops) {
  if (Status s = makeCurrent(); !s)
    return s;
  if (Status s = orderAfterExchanges(step, ops); !s)
    return s;
  switch (step.op) {
  case StepOp::Dispatch:
  case StepOp::GroupedGemm:
  case StepOp::Glu:
  case StepOp::Combine:
  case StepOp::CombineBackward:
  case StepOp::GroupedGemmWgrad:
  case StepOp::ActivationBackward:
  case StepOp::GluBackward:
  case StepOp::DispatchBackward:
    return runRowStep(plan, step, ops);
  case StepOp::SyncCapacity:
  case StepOp::AllToAll:
  case StepOp::AllGather:
  case StepOp::ReduceScatter:
    return runCollective(plan, step, ops);
  default:
    return runRoutingStep(plan, step, ops);
  }
}

Status CudaBackend::runRowStep(const Plan &plan, const Step &step,
                               const StepOperands &ops) {
  cuda::KernelContext &ctx = *ctx_;
  const int64_t d = plan.layer.modelDim;
  // Routing is read from whichever side of the step holds it.
  Routing routing = step_views::routingOf(plan.layer, ops);
  RowSpaces rows(step.facts, ops, routing);
  auto shift = [&](const TensorView &view) { return rows.shift(view); };
  switch (step.op) {
  case StepOp::Dispatch:
    return cuda::dispatch(ctx, read(ops.in(R::X)), d, routing,
                          rows.space(ops.out(R::Dispatched)),
                          write(ops.out(R::Dispatched)));
  case StepOp::GroupedGemm: {
    const TensorView a = shift(ops.in(R::A)), c = shift(ops.out(R::C));
    GroupedGemmOptions options;
    options.transB = step.attrs.transB;
    options.accumulate = step.attrs.accumulate;
    options.epilogue = step.attrs.epilogue;
    // 1 / s in fc2 of a sharded expert: the s partial outputs add b2 once.
    options.biasScale = static_cast<float>(step.attrs.biasScale);
    return cuda::groupedGemm(ctx, read(a), read(ops.in(R::B)),
                             read(ops.in(R::Bias)), write(c), cols(a), cols(c),
                             rows.space(a), options,
                             write(shift(ops.out(R::Pre))));
  }
  case StepOp::Glu:
    return cuda::glu(ctx, read(shift(ops.in(R::GateIn))),
                     read(shift(ops.in(R::UpIn))), write(shift(ops.out(R::C))),
                     cols(ops.out(R::C)), rows.shiftedSpace(ops.out(R::C)));
  case StepOp::Combine:
    return cuda::combine(ctx, read(ops.in(R::ExpertOut)), d, routing,
                         write(ops.out(R::Out)));
  case StepOp::CombineBackward:
    return cuda::combineBackward(
        ctx, read(ops.in(R::GradOut)), read(ops.in(R::ExpertOut)), d, routing,
        rows.space(ops.out(R::GradExpertOut)), write(ops.out(R::GradExpertOut)),
        writeAs<float>(ops.out(R::GradGates)));
  case StepOp::GroupedGemmWgrad: {
    const TensorView a = shift(ops.in(R::A)), gradC = shift(ops.in(R::GradC));
    return cuda::groupedGemmWgrad(
        ctx, read(a), read(gradC), cols(a), cols(gradC), rows.space(a),
        write(ops.out(R::GradB)), write(ops.out(R::GradBias)),
        step.attrs.accumulate);
  }
  case StepOp::ActivationBackward:
    return cuda::activationBackward(
        ctx, read(shift(ops.in(R::Pre))), read(shift(ops.in(R::Grad))),
        write(shift(ops.out(R::GradPre))), cols(ops.out(R::GradPre)),
        rows.shiftedSpace(ops.out(R::GradPre)), step.attrs.activation);
  case StepOp::GluBackward:
    return cuda::gluBackward(
        ctx, read(shift(ops.in(R::GateIn))), read(shift(ops.in(R::UpIn))),
        read(shift(ops.in(R::Grad))), write(shift(ops.out(R::GradGateIn))),
        write(shift(ops.out(R::GradUpIn))), cols(ops.in(R::Grad)),
        rows.shiftedSpace(ops.in(R::Grad)));
  case StepOp::DispatchBackward:
    return cuda::dispatchBackward(ctx, read(ops.in(R::GradDispatched)), d,
                                  routing, write(ops.out(R::GradX)));
  default:
    return Status(StatusCode::Internal,
                  "op '" + std::string(toString(step.op)) +
                      "' does not run over dispatch rows");
  }
}

Status CudaBackend::runRoutingStep(const Plan &plan, const Step &step,
                                   const StepOperands &ops) {
  cuda::KernelContext &ctx = *ctx_;
  const LayerConfig &layer = plan.layer;
  const int64_t T = layer.tokens, d = layer.modelDim, E = layer.experts;
  const int64_t k = std::min(layer.topK, layer.experts);
  Routing routing = step_views::routingOf(layer, ops);
  switch (step.op) {
  case StepOp::Router:
    return cuda::router(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                        writeAs<float>(ops.out(R::Logits)), T, d, E);
  case StepOp::Gate: {
    GateOutputs out = step_views::gateOutputs(ops);
    // A new device capacity: a host copy of the earlier one is stale.
    ++capacityEpoch_;
    // The capacity stays on the device; by [cap-1] it never exceeds the
    // static bound the plan sized its buffers for (the CPU backend checks).
    return cuda::gate(ctx, readAs<float>(ops.in(R::Logits)), T, E, step.attrs,
                      out);
  }
  case StepOp::GateBackward: {
    GateBackwardAttrs attrs;
    attrs.topK = step.attrs.topK;
    attrs.normalize = step.attrs.normalize;
    return cuda::gateBackward(ctx, readAs<float>(ops.in(R::GradGates)),
                              readAs<float>(ops.in(R::GradLAux)),
                              readAs<float>(ops.in(R::Scores)), routing, attrs,
                              writeAs<float>(ops.out(R::GradLogits)));
  }
  case StepOp::RouterBackward:
    return cuda::routerBackward(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                                readAs<float>(ops.in(R::GradLogits)), T, d, E,
                                write(ops.out(R::GradX)),
                                write(ops.out(R::GradWg)));
  case StepOp::UniformSegments: {
    const StepAttrs &a = step.attrs;
    // New offsets in the same buffer: the GEMMs' host copy is stale.
    ++ctx.generation;
    return cuda::uniformSegments(ctx, routing.capacity, a.groups, a.ranks,
                                 a.chunks, a.chunk,
                                 writeAs<int32_t>(ops.out(R::ExpertOffsets)),
                                 writeAs<int32_t>(ops.out(R::ExpertRows)));
  }
  case StepOp::ShardRouting:
    return runShardRouting(ctx, step, ops, routing);
  case StepOp::ShardRoutingBackward: {
    const int64_t s = step.attrs.shards;
    const TensorView &in = ops.in(R::GradGates), &out = ops.out(R::GradGates);
    if (s < 1 || in.desc->shape[1] != k * s || out.desc->shape[1] != k)
      return Status(
          StatusCode::InvalidArgument,
          "shard_routing_backward with shards = " + std::to_string(s) +
              " and k = " + std::to_string(k) + " needs '" + in.desc->name +
              "' [T, k*s] and '" + out.desc->name + "' [T, k]; got " +
              std::to_string(in.desc->shape[1]) + " and " +
              std::to_string(out.desc->shape[1]) + " columns");
    return cuda::shardRoutingBackward(ctx, readAs<float>(in), T, k, s,
                                      writeAs<float>(out));
  }
  default:
    return Status(StatusCode::Internal, "unknown step op");
  }
}

std::string bufferName(const TensorView &view) {
  return "'" + view.desc->name + "'";
}

Status CudaBackend::runCollective(const Plan &plan, const Step &step,
                                  const StepOperands &ops) {
  // All W ranks, or the sub-communicator of a grouped step (experts
  // sharded over ranks with 1 <= r < s).
  Communicator *group = nullptr;
  if (Status status = communicatorFor(step, group); !status)
    return status;
  Communicator &comm = *group;
  if (comm.memory() != CommMemory::Device)
    return Status(StatusCode::InvalidArgument,
                  "step '" + std::string(toString(step.op)) +
                      "' on the CUDA backend needs a device communicator "
                      "(NCCL); communicator '" +
                      std::string(comm.name()) + "' works on host memory");
  if (Status s = comm.setStream(ctx_->stream()); !s)
    return s;
  switch (step.op) {
  case StepOp::SyncCapacity: {
    // One C on every rank, then the padded offsets e * C, on the device.
    int32_t *capacity = writeAs<int32_t>(ops.out(R::Capacity));
    if (Status s = comm.allReduceMaxInt32(capacity, 1, "sync_capacity"); !s)
      return s;
    ++capacityEpoch_;
    ++ctx_->generation;
    return cuda::writeCapacityOffsets(
        *ctx_, capacity, plan.layer.experts,
        writeAs<int32_t>(ops.out(R::ExpertOffsets)));
  }
  case StepOp::AllToAll:
    return allToAll(plan, step, ops, comm);
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

Status CudaBackend::allToAll(const Plan &plan, const Step &step,
                             const StepOperands &ops, Communicator &comm) {
  const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
  const StepAttrs &a = step.attrs;
  // Rows are in E * s blocks of C (virtual experts when experts are
  // sharded over s ranks), L = E * s / W of them per rank of the exchange's
  // W ranks (all of them, or one token class of a grouped step).
  const int64_t E = plan.virtualExperts(), W = comm.size();
  AllToAllRun run;
  run.input = &input;
  run.output = &output;
  run.what = "all_to_all " + std::string(toString(a.direction)) + " " +
             bufferName(input) + " -> " + bufferName(output) + ", chunk " +
             std::to_string(a.chunk) + " of " + std::to_string(a.chunks);
  if (W < 1 || E % W != 0)
    return Status(StatusCode::Internal,
                  run.what + ": " + std::to_string(E) +
                      " (virtual) experts do not divide over " +
                      std::to_string(W) + " ranks");
  cuda::AllToAllShape &shape = run.shape;
  shape.ranks = W;
  shape.localExperts = E / W;
  shape.chunks = a.chunks;
  shape.chunk = a.chunk;
  if (Status s = hostCapacity(step.facts, ops.in(R::Capacity), shape.capacity);
      !s)
    return s;
  if (shape.capacity % a.chunks != 0)
    return Status(StatusCode::Internal,
                  run.what + ": capacity " + std::to_string(shape.capacity) +
                      " is not a multiple of the " + std::to_string(a.chunks) +
                      " chunks");
  const int64_t rows = E * shape.capacity;
  if (rows > input.desc->shape[0] || rows > output.desc->shape[0])
    return Status(StatusCode::Internal,
                  run.what + ": E * C = " + std::to_string(rows) +
                      " rows exceed the buffers' " +
                      std::to_string(std::min(input.desc->shape[0],
                                              output.desc->shape[0])));
  run.rowBytes =
      input.desc->shape[1] * static_cast<int64_t>(dtypeSize(input.desc->dtype));
  run.rowsPerChunk = shape.capacity / a.chunks;
  run.blockBytes = shape.localExperts * run.rowsPerChunk * run.rowBytes;
  run.sendDispatchLayout = a.direction == AllToAllDirection::Dispatch;
  // 2DH (ranks_per_node N with 1 < N < W; the facts say it does not run
  // on the exchange stream) moves the same staging blocks in two phases;
  // N == 1 or N == W degenerate to the flat exchange.
  if (!step.facts.exchangeStream) {
    // Its staging kernels run on the compute stream.
    if (Status s = joinExchanges(); !s)
      return s;
    return hierarchicalAllToAll(shape, run.sendDispatchLayout, input.data,
                                output.data, run.rowBytes, a.ranksPerNode, comm,
                                run.what);
  }
  AllToAllLayout layout{W, shape.localExperts, shape.capacity, a.chunks,
                        a.chunk};
  layout.blocks(a.direction, run.rowBytes, run.sendBlocks, run.recvBlocks);
  // In place (one run of Cq rows per peer and local expert, no packing)
  // unless the runs are small: NCCL moves many small runs slower than one
  // packed block per peer (bench/RESULTS.md, Run 5: C3's 32 runs of 6 MiB).
  const bool staged = exchangeStaging_ == ExchangeStaging::Always ||
                      (exchangeStaging_ == ExchangeStaging::Auto &&
                       run.rowsPerChunk * run.rowBytes < kMinInPlaceRunBytes &&
                       layout.localExperts > 1);
  if (!overlap_)
    return exchangeRows(run, staged, comm, ctx_->stream());
  return exchangeOnOwnStream(run, staged, comm);
}

Status CudaBackend::stagedExchange(const AllToAllRun &run, Communicator &comm) {
  const int64_t W = run.shape.ranks;
  const bool sendDispatch = run.sendDispatchLayout;
  std::vector<int64_t> sendOffsets(W), recvOffsets(W), sizes(W, run.blockBytes);
  void *send = run.input->data, *recv = run.output->data;
  const bool sendDirect = run.contiguous(sendDispatch);
  const bool recvDirect = run.contiguous(!sendDispatch);
  if (!sendDirect)
    if (Status s = staging(0, W * run.blockBytes, send); !s)
      return s;
  if (!recvDirect)
    if (Status s = staging(1, W * run.blockBytes, recv); !s)
      return s;
  for (int64_t p = 0; p < W; ++p) {
    sendOffsets[p] = sendDirect ? run.firstRow(sendDispatch, p) * run.rowBytes
                                : p * run.blockBytes;
    recvOffsets[p] = recvDirect ? run.firstRow(!sendDispatch, p) * run.rowBytes
                                : p * run.blockBytes;
  }
  if (!sendDirect)
    if (Status s = cuda::allToAllCopy(*ctx_, run.shape, sendDispatch,
                                      /*pack=*/true, run.input->data, send,
                                      run.rowBytes);
        !s)
      return s;
  if (Status s = comm.allToAll(send, sendOffsets.data(), sizes.data(), recv,
                               recvOffsets.data(), sizes.data(), run.what);
      !s)
    return s;
  if (!recvDirect)
    return cuda::allToAllCopy(*ctx_, run.shape, !sendDispatch,
                              /*pack=*/false, run.output->data, recv,
                              run.rowBytes);
  return Status::ok();
}

Status CudaBackend::exchangeRows(const AllToAllRun &run, bool staged,
                                 Communicator &comm, cudaStream_t stream) {
  if (Status s = comm.setStream(stream); !s)
    return s;
  if (!staged)
    return comm.allToAllBlocks(run.input->data, run.sendBlocks,
                               run.output->data, run.recvBlocks, run.what);
  return stagedExchange(run, comm);
}

Status CudaBackend::exchangeOnOwnStream(const AllToAllRun &run, bool staged,
                                        Communicator &comm) {
  // On the exchange stream, after the compute queued so far (which wrote
  // the rows it sends and may still read the rows it overwrites). The
  // staging kernels go there too, for the duration of the exchange.
  cudaStream_t exchange = nullptr, compute = ctx_->stream();
  if (Status s = exchangeStream(exchange); !s)
    return s;
  if (Status s = cuda::checkCuda(cudaEventRecord(computeReady_, compute),
                                 "cudaEventRecord");
      !s)
    return s;
  if (Status s =
          cuda::checkCuda(cudaStreamWaitEvent(exchange, computeReady_, 0),
                          "the exchange stream waiting for compute");
      !s)
    return s;
  if (Status s = ctx_->setStream(exchange); !s)
    return s;
  Status sent = exchangeRows(run, staged, comm, exchange);
  Status back = ctx_->setStream(compute);
  if (Status s = comm.setStream(compute); !s)
    return s;
  if (!sent)
    return sent;
  if (!back)
    return back;
  cudaEvent_t done = nullptr;
  if (Status s = takeEvent(done); !s)
    return s;
  if (Status s =
          cuda::checkCuda(cudaEventRecord(done, exchange), "cudaEventRecord");
      !s) {
    freeEvents_.push_back(done);
    return s;
  }
  // The bytes it reads and writes are the runs' (staging is its own).
  pendingEvents_.push_back(done);
  pendingBytes_.push_back({byteRangesOf(run.input->data, run.sendBlocks),
                           byteRangesOf(run.output->data, run.recvBlocks)});
  return Status::ok();
}

Status CudaBackend::hierarchicalAllToAll(const cuda::AllToAllShape &shape,
                                         bool sendDispatchLayout, void *input,
                                         void *output, int64_t rowBytes,
                                         int64_t ranksPerNode,
                                         Communicator &comm,
                                         const std::string &what) {
  const int64_t W = shape.ranks;
  const int64_t blockBytes =
      shape.localExperts * (shape.capacity / shape.chunks) * rowBytes;
  void *send = nullptr, *recv = nullptr, *scratch = nullptr;
  for (auto [slot, data] : {std::pair{0, &send}, {1, &recv}, {2, &scratch}})
    if (Status s = staging(slot, W * blockBytes, *data); !s)
      return s;
  if (Status s = cuda::allToAllCopy(*ctx_, shape, sendDispatchLayout,
                                    /*pack=*/true, input, send, rowBytes);
      !s)
    return s;
  HierarchicalAllToAll h{W, ranksPerNode, comm.rank()};
  auto *sendBlocks = static_cast<char *>(send);
  auto *scratchBlocks = static_cast<char *>(scratch);
  std::vector<int64_t> offsets, sizes;
  for (int phase = 1; phase <= 2; ++phase) {
    // Reorder the blocks (phase 1 from the packed blocks, phase 2 from
    // what phase 1 received into `send`), then exchange among the peers
    // of the phase.
    for (int64_t i = 0; i < W; ++i) {
      int64_t source = phase == 1 ? h.phase1Source(i) : h.phase2Source(i);
      if (Status s = cuda::checkCuda(
              cudaMemcpyAsync(scratchBlocks + i * blockBytes,
                              sendBlocks + source * blockBytes,
                              static_cast<size_t>(blockBytes),
                              cudaMemcpyDeviceToDevice, ctx_->stream()),
              "reordering the 2DH all_to_all blocks");
          !s)
        return s;
    }
    h.phaseBlocks(phase, blockBytes, offsets, sizes);
    if (Status s = comm.allToAll(
            scratch, offsets.data(), sizes.data(), phase == 1 ? send : recv,
            offsets.data(), sizes.data(),
            what + (phase == 1 ? " (2DH intra-node)" : " (2DH inter-node)"));
        !s)
      return s;
  }
  return cuda::allToAllCopy(*ctx_, shape, !sendDispatchLayout,
                            /*pack=*/false, output, recv, rowBytes);
}

} // namespace

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
