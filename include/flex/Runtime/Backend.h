//===- Backend.h - The interface an executor runs steps through -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares Backend, the abstract device an Executor runs plan steps
// on. The executor resolves every operand of a step to a pointer and hands the
// step over; a backend maps it to its kernels. The CPU backend runs each step
// to completion; the CUDA backend (Cuda/CudaBackend.h) queues them on a
// stream, times them with device events and can record a pass as a graph.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_BACKEND_H
#define FLEX_RUNTIME_BACKEND_H

#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

class Communicator;

/// The operands of one step, resolved to memory. `data` is null where the
/// step has no operand in that role; `desc` gives dtype and shape.
struct TensorView {
  void *data = nullptr;
  const BufferDesc *desc = nullptr;

  bool isPresent() const { return data != nullptr; }
};

struct StepOperands {
  std::array<TensorView, kNumOperandRoles> inputs{};
  std::array<TensorView, kNumOperandRoles> outputs{};

  const TensorView &in(OperandRole role) const {
    return inputs[static_cast<int>(role)];
  }
  const TensorView &out(OperandRole role) const {
    return outputs[static_cast<int>(role)];
  }
};

/// A backend's kernel for one step kind: runs (or queues) the step.
using StepKernel =
    std::function<Status(const Plan &, const Step &, const StepOperands &)>;

class Backend {
public:
  virtual ~Backend();

  /// "cpu", "cuda", ...
  virtual std::string_view name() const = 0;

  /// Runs (or queues) one step. The plan has been verified: every required
  /// operand is present with the dtype and shape its op needs. The default
  /// runs the kernel registered for the step's kind (setKernel); a kind
  /// StepKinds.def declares but this backend has no kernel for is refused
  /// with Unavailable, naming both.
  virtual Status runStep(const Plan &plan, const Step &step,
                         const StepOperands &operands);

  /// Whether this backend has a kernel for `op`.
  bool implements(StepOp op) const {
    return static_cast<bool>(kernels_[static_cast<int>(op)]);
  }
  /// Unavailable, naming the first step (variant, pass, index) whose kind
  /// this backend has no kernel for; ok when it runs every step of `plan`.
  Status checkRuns(const Plan &plan) const;

  /// Waits until every queued step has finished. The CPU backend runs steps
  /// synchronously and returns at once.
  virtual Status synchronize() { return Status::ok(); }

  /// Called after the last step of a pass: work the backend queued on
  /// streams of its own joins the caller's stream here, so the pass is
  /// complete in stream order when run() returns.
  virtual Status endPass() { return Status::ok(); }

  /// The stream the next steps go to (a cudaStream_t on CUDA). The CPU
  /// backend accepts only null.
  virtual Status setStream(void *stream);
  /// That stream (null: the backend has none, or its own default).
  virtual void *currentStream() const { return nullptr; }
  /// Whether work queued now would be recorded into a graph rather than run
  /// (a caller's CUDA graph capture on the backend's stream): host round
  /// trips (allocation, copies, waits) must wait for a later call then.
  virtual bool isRecording() const { return false; }

  /// Memory for the workspace, in the backend's memory space.
  virtual void *allocate(int64_t bytes, int64_t alignment);
  virtual void deallocate(void *data);

  /// Whether buffers of this backend (the caller's and the workspace) can be
  /// read by the host. When not, the executor's NaN check reads them through
  /// copyToHost, after synchronize().
  virtual bool isHostMemory() const { return true; }
  virtual Status copyToHost(void *hostDst, const void *src, int64_t bytes);
  /// The other way: `bytes` from the host into the backend's memory (the
  /// ranks' agreements through a device communicator).
  virtual Status copyFromHost(void *dst, const void *hostSrc, int64_t bytes);

  /// Device timers (CUDA events): recordTimestamp(i) queues marker i on the
  /// stream; after synchronize(), elapsedMicros(a, b) is the device time
  /// between markers a and b. Backends without them time on the host.
  virtual bool hasDeviceTimer() const { return false; }
  virtual Status recordTimestamp(int32_t marker);
  virtual Status elapsedMicros(int32_t from, int32_t to, double &micros);

  /// Whether the backend's device-sized grouped GEMM has the wgmma kernel
  /// (CUDA on Hopper): the grouped-GEMM rule then sends forward and
  /// input-gradient GEMMs of any size to it (Core/GroupedGemmRule.h), and
  /// the cost model prices them so.
  virtual bool groupedGemmRunsWgmma() const { return false; }

  /// Whole-pass graphs (CUDA graphs). canCapturePass says whether the pass
  /// (forward or backward of a variant) queues the same work on every call
  /// with no host synchronization, so that it can be recorded once and
  /// replayed. The executor brackets the steps of one pass with
  /// beginGraphCapture / endGraphCapture(key) (steps are recorded, not run)
  /// and runs a recorded pass with launchGraph(key). `key` names the pass and
  /// every pointer it was recorded with.
  virtual bool canCapturePass(const Plan &plan, int64_t variant,
                              bool backward) const;
  virtual Status beginGraphCapture();
  virtual Status endGraphCapture(const std::string &key);
  /// Runs the pass recorded under `key`; *launched is false when none is.
  virtual Status launchGraph(const std::string &key, bool &launched);

  /// The communicator collective steps (isCollective) run through; the
  /// executor sets it (Executor::setCommunicator) and has checked its size
  /// and memory space. The default keeps it in communicator_.
  virtual Status setCommunicator(std::shared_ptr<Communicator> communicator);

  /// The sub-communicator of grouped collective steps (`group_size` =
  /// `size`, `group_stride` = `stride`; PlanFormat.md, "Groups of ranks"),
  /// or why the executor could not make it (`made` fails).
  void setGroupCommunicator(int64_t size, int64_t stride,
                            std::shared_ptr<Communicator> communicator,
                            Status made);

protected:
  /// Registers the kernel of one step kind (adding a step kind: one
  /// declaration in StepKinds.def and one setKernel per backend).
  void setKernel(StepOp op, StepKernel kernel) {
    kernels_[static_cast<int>(op)] = std::move(kernel);
  }
  /// Runs the registered kernel of `step`'s kind, or refuses the step.
  Status runKernel(const Plan &plan, const Step &step,
                   const StepOperands &operands) const;

  /// The communicator a collective step runs through: the whole world's,
  /// or its group's. Fails, naming the step, when there is none.
  Status communicatorFor(const Step &step, Communicator *&communicator) const;

  /// The communicator a collective step's kernel runs through:
  /// communicatorFor by default. A backend may check or prepare it first
  /// (the CUDA backend: a device communicator, on its compute stream).
  virtual Status collectiveCommunicator(const Step &step,
                                        Communicator *&communicator);

  /// Registers `method` of backend `B` as the kernel of the collective kind
  /// `op`: it runs with the step's collectiveCommunicator.
  template <typename B>
  void setCollectiveKernel(StepOp op,
                           Status (B::*method)(const Plan &, const Step &,
                                               const StepOperands &,
                                               Communicator &)) {
    setKernel(op, [this, method](const Plan &plan, const Step &step,
                                 const StepOperands &operands) {
      Communicator *communicator = nullptr;
      if (Status status = collectiveCommunicator(step, communicator); !status)
        return status;
      return (static_cast<B *>(this)->*method)(plan, step, operands,
                                               *communicator);
    });
  }

  /// Registers all_gather and reduce_scatter: gatherOrScatter through the
  /// step's collectiveCommunicator.
  void setGatherScatterKernels();

  /// all_gather and reduce_scatter, the same on every backend: the
  /// communicator moves the bytes in its own memory space.
  static Status gatherOrScatter(Communicator &comm, const Step &step,
                                const StepOperands &operands);

  /// How messages name an all_to_all step: its direction, its buffers and
  /// its chunk.
  static std::string describeAllToAll(const Step &step,
                                      const StepOperands &operands);
  /// Checks, on every backend alike, that an all_to_all's capacity splits
  /// into its chunks and that `experts` blocks of it fit both buffers;
  /// `what` (describeAllToAll) names the step.
  static Status checkAllToAllRows(const std::string &what, int64_t experts,
                                  int64_t capacity, const Step &step,
                                  const StepOperands &operands);

  std::shared_ptr<Communicator> communicator_;
  struct GroupCommunicator {
    int64_t size = 0, stride = 1;
    std::shared_ptr<Communicator> communicator;
    Status made;
  };
  std::vector<GroupCommunicator> groupCommunicators_;

private:
  std::array<StepKernel, kNumStepOps> kernels_{};
};

/// The CPU backend (lib/Runtime/Cpu/CpuBackend.cpp): R1's kernels of
/// include/flex/Runtime/Cpu/CpuKernels.h, run in step order.
std::unique_ptr<Backend> createCpuBackend();

} // namespace flex

#endif // FLEX_RUNTIME_BACKEND_H
