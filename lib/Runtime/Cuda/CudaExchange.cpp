//===- CudaExchange.cpp - The CUDA backend's collectives ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the collective steps of the CUDA backend and the
// ordering of compute steps after the exchanges they depend on.
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
//===----------------------------------------------------------------------===//

#include "CudaBackendImpl.h"
#include "flex/Runtime/Comm/AllToAllLayout.h"
#include "flex/Runtime/Comm/HierarchicalAllToAll.h"
#include "flex/Runtime/StepViews.h"

#include <algorithm>
#include <string>
#include <vector>

namespace flex {

using R = OperandRole;
using step_views::writeAs;

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
    // The cached C is this pass's: exchanges are pending only after an
    // all_to_all of this pass, which read its own workspace's C.
    if (n < 0 && segments.chunks > 0 && capacityKeyEpoch_ == capacityEpoch_)
      n = segments.rowsFor(cachedCapacity_);
    if (n >= 0)
      chunk = {segments.chunk, segments.groups * n};
  }
  return waitForOverlappingExchanges(ops, chunk);
}

Status CudaBackend::collectiveCommunicator(const Step &step,
                                           Communicator *&comm) {
  // All W ranks, or the sub-communicator of a grouped step (experts
  // sharded over ranks with 1 <= r < s).
  if (Status status = communicatorFor(step, comm); !status)
    return status;
  if (comm->memory() != CommMemory::Device)
    return Status(StatusCode::InvalidArgument,
                  "step '" + std::string(toString(step.op)) +
                      "' on the CUDA backend needs a device communicator "
                      "(NCCL); communicator '" +
                      std::string(comm->name()) + "' works on host memory");
  return comm->setStream(ctx_->stream());
}

Status CudaBackend::syncCapacity(const Plan &plan, const Step &step,
                                 const StepOperands &ops, Communicator &comm) {
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
  run.what = describeAllToAll(step, ops);
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
  if (Status s = checkAllToAllRows(run.what, E, shape.capacity, step, ops); !s)
    return s;
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

} // namespace flex
