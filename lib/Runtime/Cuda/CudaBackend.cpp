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
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Cuda/CudaBackend.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace flex {
namespace {

using R = OperandRole;

cpu::ReadBuffer read(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

cpu::WriteBuffer write(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

template <typename T> const T *readAs(const TensorView &view) {
  return static_cast<const T *>(view.data);
}
template <typename T> T *writeAs(const TensorView &view) {
  return static_cast<T *>(view.data);
}

cpu::Epilogue toKernel(Epilogue epilogue) {
  switch (epilogue) {
  case Epilogue::None: return cpu::Epilogue::None;
  case Epilogue::Relu: return cpu::Epilogue::Relu;
  case Epilogue::Gelu: return cpu::Epilogue::Gelu;
  case Epilogue::Silu: return cpu::Epilogue::Silu;
  }
  return cpu::Epilogue::None;
}

/// The gate step that writes the routing buffer `offsets`, in any variant.
const Step *findGate(const Plan &plan, const BufferRef &offsets) {
  for (const Variant &variant : plan.variants)
    for (const Step &step : variant.forward)
      if (step.op == StepOp::Gate && step.out(R::ExpertOffsets) == offsets)
        return &step;
  return nullptr;
}

/// C when the gate lays rows out padded with a fixed capacity (known on the
/// host before gating); -1 when the rows are only known on the device.
int64_t staticCapacity(const Plan &plan, const Step *gate) {
  if (!gate || gate->attrs.layout != DispatchLayout::Padded ||
      gate->attrs.capacityMode != CapacityMode::Fixed)
    return -1;
  const LayerConfig &layer = plan.layer;
  return cpu::computeCapacity(
      CapacityMode::Fixed, gate->attrs.capacityFactor, layer.tokens,
      layer.experts, std::clamp<int64_t>(gate->attrs.topK, 1, layer.experts),
      0, gate->attrs.capacityAlignment);
}

class CudaBackend final : public Backend {
public:
  CudaBackend(int device, std::unique_ptr<cuda::KernelContext> context)
      : device_(device), ctx_(std::move(context)) {}
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

private:
  Status makeCurrent() {
    return cuda::checkCuda(cudaSetDevice(device_), "cudaSetDevice");
  }

  int device_;
  std::unique_ptr<cuda::KernelContext> ctx_;
  /// The gate that wrote the current routing. Variants may share routing
  /// buffer names with different layouts, so later steps (and the backward
  /// after this forward) take the layout from the gate that actually ran.
  const Step *lastGate_ = nullptr;
  std::vector<cudaEvent_t> events_;
  std::map<std::string, cudaGraphExec_t> graphs_;
};

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  for (auto &[key, exec] : graphs_)
    cudaGraphExecDestroy(exec);
  for (cudaEvent_t event : events_)
    cudaEventDestroy(event);
}

Status CudaBackend::synchronize() {
  return cuda::checkCuda(cudaStreamSynchronize(ctx_->stream()),
                         "waiting for the stream (an earlier kernel may have "
                         "failed)");
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
  return cuda::checkCuda(
      cudaMemcpy(hostDst, src, static_cast<size_t>(bytes),
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
  if (Status s = cuda::checkCuda(
          cudaEventElapsedTime(&ms, events_[from], events_[to]),
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
  bool anyGate = false;
  for (const Step &step : v.forward)
    if (step.op == StepOp::Gate) {
      anyGate = true;
      if (staticCapacity(plan, &step) < 0)
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

Status CudaBackend::runStep(const Plan &plan, const Step &step,
                            const StepOperands &ops) {
  if (Status s = makeCurrent(); !s)
    return s;
  cuda::KernelContext &ctx = *ctx_;
  const LayerConfig &layer = plan.layer;
  const int64_t T = layer.tokens, d = layer.modelDim, E = layer.experts;
  const int64_t k = std::min(layer.topK, layer.experts);
  cpu::Routing routing;
  routing.indices = readAs<int32_t>(ops.in(R::Indices));
  routing.locations = readAs<int32_t>(ops.in(R::Locations));
  routing.gates = readAs<float>(ops.in(R::Gates));
  routing.capacity = readAs<int32_t>(ops.in(R::Capacity));
  routing.expertOffsets = readAs<int32_t>(ops.in(R::ExpertOffsets));
  routing.expertRows = readAs<int32_t>(ops.in(R::ExpertRows));
  routing.tokens = T;
  routing.topK = k;
  routing.experts = E;
  // The rows of the dispatch-shaped operand `view`.
  auto space = [&](const TensorView &view) {
    cuda::ExpertRowSpace result;
    result.offsets = routing.expertOffsets;
    result.rows = routing.expertRows;
    result.experts = E;
    result.rowBound = view.desc->shape.front();
    const Step *gate =
        lastGate_ && lastGate_->out(R::ExpertOffsets) == step.in(R::ExpertOffsets)
            ? lastGate_
            : findGate(plan, step.in(R::ExpertOffsets));
    result.staticCapacity = staticCapacity(plan, gate);
    return result;
  };
  auto cols = [](const TensorView &view) { return view.desc->shape.back(); };

  switch (step.op) {
  case StepOp::Router:
    return cuda::router(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                        writeAs<float>(ops.out(R::Logits)), T, d, E);
  case StepOp::Gate: {
    const StepAttrs &a = step.attrs;
    cpu::GateAttrs attrs;
    attrs.topK = a.topK;
    attrs.capacityMode = a.capacityMode;
    attrs.capacityFactor = a.capacityFactor;
    attrs.normalize = a.normalize;
    attrs.batchPrioritized = a.batchPrioritized;
    attrs.noise = a.noise;
    attrs.seed = a.seed;
    attrs.layout = a.layout == DispatchLayout::Padded ? cpu::Layout::Padded
                                                      : cpu::Layout::Ragged;
    attrs.capacityAlignment = a.capacityAlignment;
    cpu::GateOutputs out;
    out.scores = writeAs<float>(ops.out(R::Scores));
    out.indices = writeAs<int32_t>(ops.out(R::Indices));
    out.locations = writeAs<int32_t>(ops.out(R::Locations));
    out.gates = writeAs<float>(ops.out(R::Gates));
    out.capacity = writeAs<int32_t>(ops.out(R::Capacity));
    out.expertOffsets = writeAs<int32_t>(ops.out(R::ExpertOffsets));
    out.expertRows = writeAs<int32_t>(ops.out(R::ExpertRows));
    out.lAux = writeAs<float>(ops.out(R::LAux));
    lastGate_ = &step;
    // The capacity stays on the device; by [cap-1] it never exceeds the
    // static bound the plan sized its buffers for (the CPU backend checks).
    return cuda::gate(ctx, readAs<float>(ops.in(R::Logits)), T, E, attrs,
                      out);
  }
  case StepOp::Dispatch:
    return cuda::dispatch(ctx, read(ops.in(R::X)), d, routing,
                          space(ops.out(R::Dispatched)),
                          write(ops.out(R::Dispatched)));
  case StepOp::GroupedGemm: {
    const TensorView &a = ops.in(R::A), &c = ops.out(R::C);
    cpu::GroupedGemmOptions options;
    options.transB = step.attrs.transB;
    options.accumulate = step.attrs.accumulate;
    options.epilogue = toKernel(step.attrs.epilogue);
    return cuda::groupedGemm(ctx, read(a), read(ops.in(R::B)),
                             read(ops.in(R::Bias)), write(c), cols(a), cols(c),
                             space(a), options, write(ops.out(R::Pre)));
  }
  case StepOp::Glu:
    return cuda::glu(ctx, read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
                     write(ops.out(R::C)), cols(ops.out(R::C)),
                     space(ops.out(R::C)));
  case StepOp::Combine:
    return cuda::combine(ctx, read(ops.in(R::ExpertOut)), d, routing,
                         write(ops.out(R::Out)));
  case StepOp::CombineBackward:
    return cuda::combineBackward(
        ctx, read(ops.in(R::GradOut)), read(ops.in(R::ExpertOut)), d, routing,
        space(ops.out(R::GradExpertOut)), write(ops.out(R::GradExpertOut)),
        writeAs<float>(ops.out(R::GradGates)));
  case StepOp::GroupedGemmWgrad: {
    const TensorView &a = ops.in(R::A), &gradC = ops.in(R::GradC);
    return cuda::groupedGemmWgrad(ctx, read(a), read(gradC), cols(a),
                                  cols(gradC), space(a),
                                  write(ops.out(R::GradB)),
                                  write(ops.out(R::GradBias)),
                                  step.attrs.accumulate);
  }
  case StepOp::ActivationBackward:
    return cuda::activationBackward(
        ctx, read(ops.in(R::Pre)), read(ops.in(R::Grad)),
        write(ops.out(R::GradPre)), cols(ops.out(R::GradPre)),
        space(ops.out(R::GradPre)), step.attrs.activation);
  case StepOp::GluBackward:
    return cuda::gluBackward(
        ctx, read(ops.in(R::GateIn)), read(ops.in(R::UpIn)),
        read(ops.in(R::Grad)), write(ops.out(R::GradGateIn)),
        write(ops.out(R::GradUpIn)), cols(ops.in(R::Grad)),
        space(ops.in(R::Grad)));
  case StepOp::DispatchBackward:
    return cuda::dispatchBackward(ctx, read(ops.in(R::GradDispatched)), d,
                                  routing, write(ops.out(R::GradX)));
  case StepOp::GateBackward: {
    cpu::GateBackwardAttrs attrs;
    attrs.topK = step.attrs.topK;
    attrs.normalize = step.attrs.normalize;
    return cuda::gateBackward(ctx, readAs<float>(ops.in(R::GradGates)),
                              readAs<float>(ops.in(R::GradLAux)),
                              readAs<float>(ops.in(R::Scores)), routing,
                              attrs, writeAs<float>(ops.out(R::GradLogits)));
  }
  case StepOp::RouterBackward:
    return cuda::routerBackward(ctx, read(ops.in(R::X)), read(ops.in(R::Wg)),
                                readAs<float>(ops.in(R::GradLogits)), T, d, E,
                                write(ops.out(R::GradX)),
                                write(ops.out(R::GradWg)));
  case StepOp::SyncCapacity:
  case StepOp::AllToAll:
  case StepOp::UniformSegments:
  case StepOp::AllGather:
  case StepOp::ReduceScatter:
    return Status(StatusCode::Unavailable,
                  std::string("step '") + std::string(toString(step.op)) +
                      "' of a multi-rank plan needs the NCCL communicator, "
                      "which the CUDA backend does not have yet; run "
                      "multi-rank plans on CPU ranks (mpirun moe-run)");
  }
  return Status(StatusCode::Internal, "unknown step op");
}

} // namespace

Status createCudaBackend(std::unique_ptr<Backend> &backend,
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
    if (Status s = cuda::checkCuda(cudaGetDevice(&device), "cudaGetDevice");
        !s)
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
  backend = std::make_unique<CudaBackend>(device, std::move(context));
  return Status::ok();
}

bool isCudaBackendUsable(std::string *reason) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    if (reason)
      *reason = error != cudaSuccess
                    ? std::string(cudaGetErrorName(error)) + ": " +
                          cudaGetErrorString(error)
                    : "no CUDA device is visible";
    cudaGetLastError();
    return false;
  }
  return true;
}

} // namespace flex
