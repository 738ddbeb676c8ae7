//===- CudaBackendImpl.h - The CUDA backend's class -------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the CUDA backend's class, private to lib/Runtime/Cuda:
// CudaBackend.cpp registers its step kernels and implements memory, timers
// and graphs; CudaExchange.cpp the collectives, the exchange stream and the
// ordering of compute steps after pending exchanges.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_LIB_RUNTIME_CUDA_CUDABACKENDIMPL_H
#define FLEX_LIB_RUNTIME_CUDA_CUDABACKENDIMPL_H

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Cuda/CudaBackend.h"
#include "flex/Runtime/Cuda/CudaKernels.h"
#include "flex/Runtime/StepBytes.h"

#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace flex {

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

class CudaBackend final : public Backend {
public:
  /// Registers a kernel for every step kind (CudaBackend.cpp).
  CudaBackend(int device, std::unique_ptr<cuda::KernelContext> context,
              const RuntimeOptions &options);
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
  Status copyFromHost(void *dst, const void *hostSrc, int64_t bytes) override;
  void *currentStream() const override;
  bool isRecording() const override;

  bool hasDeviceTimer() const override { return true; }
  bool groupedGemmRunsWgmma() const override;
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
  /// The kernels of the per-expert steps over dispatch-shaped rows
  /// (RowSpaces), of the steps that make, transform or differentiate a
  /// routing (and the router), and of the collectives.
  void setRowKernels();
  void setRoutingKernels();
  void setCollectiveKernels();
  /// The communicator a collective step runs through (the world's or its
  /// group's), checked to be a device one and set to the compute stream.
  Status collectiveCommunicator(const Step &step, Communicator *&comm) override;
  Status syncCapacity(const Plan &plan, const Step &step,
                      const StepOperands &ops, Communicator &comm);
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
  /// (re)writes a capacity: gate, sync_capacity. The key is the capacity
  /// buffer's address, inside the pass's workspace: a backward after a
  /// forward on another workspace misses and reads its own C back
  /// (docs/Runtime.md, "Per-call workspaces").
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

} // namespace flex

#endif // FLEX_LIB_RUNTIME_CUDA_CUDABACKENDIMPL_H
