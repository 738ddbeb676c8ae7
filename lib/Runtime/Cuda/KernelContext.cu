//===- KernelContext.cu - Stream, cuBLAS handle and scratch ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the state the CUDA kernels share and the translation
// of CUDA errors into Status.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

namespace flex::cuda {

Status checkCuda(int error, const char *what) {
  if (error == cudaSuccess)
    return Status::ok();
  auto code = static_cast<cudaError_t>(error);
  // Clear a non-sticky error (a failed allocation), so the next launch check
  // does not report it again.
  cudaGetLastError();
  StatusCode status = code == cudaErrorMemoryAllocation
                          ? StatusCode::OutOfRange
                          : StatusCode::Internal;
  std::string message = std::string(what) + " failed: " +
                        cudaGetErrorName(code) + " (" +
                        cudaGetErrorString(code) + ")";
  if (code == cudaErrorMemoryAllocation)
    message += "; the device is out of memory";
  return Status(status, message);
}

Status checkLaunch(const char *what) {
  return checkCuda(cudaGetLastError(), what);
}

namespace {
constexpr int64_t kCublasWorkspaceBytes = int64_t{32} << 20;
}

Status KernelContext::create(std::unique_ptr<KernelContext> &context) {
  std::unique_ptr<KernelContext> result(new KernelContext());
  int device = 0;
  if (Status s = checkCuda(cudaGetDevice(&device), "cudaGetDevice"); !s)
    return Status(StatusCode::Unavailable, s.message());
  if (Status s = checkCuda(
          cudaDeviceGetAttribute(&result->multiprocessors_,
                                 cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
      !s)
    return Status(StatusCode::Unavailable, s.message());
  int major = 0, minor = 0;
  if (Status s = checkCuda(
          cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                 device),
          "cudaDeviceGetAttribute");
      !s)
    return Status(StatusCode::Unavailable, s.message());
  if (Status s = checkCuda(
          cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                 device),
          "cudaDeviceGetAttribute");
      !s)
    return Status(StatusCode::Unavailable, s.message());
  result->computeCapability_ = major * 10 + minor;
  if (const char *pdl = std::getenv("FLEX_PDL"))
    result->dependentLaunches =
        std::string_view(pdl) == "1" && result->computeCapability_ >= 90;
  // A blocking stream: it waits for work the caller queued on the legacy
  // default stream (cudaMemcpy of the inputs) without an explicit event.
  if (Status s = checkCuda(cudaStreamCreate(&result->ownStream_),
                           "cudaStreamCreate");
      !s)
    return s;
  result->stream_ = result->ownStream_;
  cublasHandle_t handle = nullptr;
  cublasStatus_t status = cublasCreate(&handle);
  if (status != CUBLAS_STATUS_SUCCESS)
    return Status(StatusCode::Unavailable,
                  std::string("cublasCreate failed: ") +
                      cublasGetStatusName(status));
  result->cublas_ = handle;
  cublasLtHandle_t lt = nullptr;
  status = cublasLtCreate(&lt);
  if (status != CUBLAS_STATUS_SUCCESS)
    return Status(StatusCode::Unavailable,
                  std::string("cublasLtCreate failed: ") +
                      cublasGetStatusName(status));
  result->cublasLt_ = lt;
  // cuBLAS gets its own workspace, so it allocates nothing while a graph
  // is recorded.
  if (Status s = checkCuda(cudaMalloc(&result->cublasWorkspace_,
                                      kCublasWorkspaceBytes),
                           "cudaMalloc of the cuBLAS workspace");
      !s)
    return s;
  result->cublasWorkspaceBytes_ = kCublasWorkspaceBytes;
  cublasSetWorkspace(handle, result->cublasWorkspace_, kCublasWorkspaceBytes);
  cublasSetStream(handle, result->stream_);
  // fp32 GEMMs stay fp32 ([num-1] allows 1e-5): no TF32.
  cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH);
  context = std::move(result);
  return Status::ok();
}

KernelContext::~KernelContext() {
  for (ScratchArea &area : scratch_)
    if (area.data)
      cudaFree(area.data);
  for (void *data : retiredScratch_)
    cudaFree(data);
  if (pinned_)
    cudaFreeHost(pinned_);
  if (cublas_)
    cublasDestroy(static_cast<cublasHandle_t>(cublas_));
  if (cublasLt_)
    cublasLtDestroy(static_cast<cublasLtHandle_t>(cublasLt_));
  if (cublasWorkspace_)
    cudaFree(cublasWorkspace_);
  for (SideStream &side : sideStreams_)
    destroySideStream(side);
  if (sideStart_)
    cudaEventDestroy(static_cast<cudaEvent_t>(sideStart_));
  if (ownStream_)
    cudaStreamDestroy(ownStream_);
}

void KernelContext::destroySideStream(SideStream &side) {
  if (side.cublas)
    cublasDestroy(static_cast<cublasHandle_t>(side.cublas));
  if (side.workspace)
    cudaFree(side.workspace);
  if (side.done)
    cudaEventDestroy(static_cast<cudaEvent_t>(side.done));
  if (side.stream)
    cudaStreamDestroy(side.stream);
  side = SideStream{};
}

Status KernelContext::addSideStream() {
  SideStream side;
  // Each part made so far is freed when a later one fails.
  auto failed = [&](Status s) {
    destroySideStream(side);
    return s;
  };
  if (Status s = checkCuda(
          cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking),
          "creating a side stream");
      !s)
    return failed(s);
  cudaEvent_t done = nullptr;
  if (Status s =
          checkCuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming),
                    "creating a side stream's event");
      !s)
    return failed(s);
  side.done = done;
  if (Status s = checkCuda(cudaMalloc(&side.workspace, kCublasWorkspaceBytes),
                           "allocating a side stream's cuBLAS workspace");
      !s)
    return failed(s);
  cublasHandle_t handle = nullptr;
  cublasStatus_t status = cublasCreate(&handle);
  if (status != CUBLAS_STATUS_SUCCESS)
    return failed(Status(StatusCode::Unavailable,
                         std::string("cublasCreate (side stream) failed: ") +
                             cublasGetStatusName(status)));
  side.cublas = handle;
  // As the context's handle: its own workspace, fp32 GEMMs without TF32.
  cublasSetWorkspace(handle, side.workspace, kCublasWorkspaceBytes);
  cublasSetStream(handle, side.stream);
  cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH);
  sideStreams_.push_back(side);
  return Status::ok();
}

Status KernelContext::spreadOverStreams(
    const std::vector<int64_t> &weights,
    const std::function<Status(int64_t, void *)> &issue) {
  const int64_t items = static_cast<int64_t>(weights.size());
  // One stream while a graph records, ours or a caller's around the pass:
  // making a side stream's handle and workspace would break the capture.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const bool recording =
      capturing || cudaStreamIsCapturing(stream_, &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone;
  const int lanes = recording ? 1
                              : static_cast<int>(std::min<int64_t>(
                                    std::max(1, gemmStreams), items));
  if (lanes <= 1) {
    for (int64_t item = 0; item < items; ++item)
      if (Status s = issue(item, cublas_); !s)
        return s;
    return Status::ok();
  }
  if (!sideStart_) {
    cudaEvent_t start = nullptr;
    if (Status s =
            checkCuda(cudaEventCreateWithFlags(&start, cudaEventDisableTiming),
                      "creating the side streams' start event");
        !s)
      return s;
    sideStart_ = start;
  }
  while (static_cast<int>(sideStreams_.size()) < lanes - 1)
    if (Status s = addSideStream(); !s)
      return s;
  // Heaviest first, each to the lane with the least weight so far: lane 0
  // is the context's stream, lane i > 0 side stream i - 1.
  std::vector<int64_t> order(items);
  for (int64_t i = 0; i < items; ++i)
    order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return weights[x] > weights[y];
  });
  auto start = static_cast<cudaEvent_t>(sideStart_);
  if (Status s = checkCuda(cudaEventRecord(start, stream_),
                           "recording the side streams' start");
      !s)
    return s;
  // The first failure (std::optional: Status is [[nodiscard]], its
  // assignment's result would be dropped).
  std::optional<Status> failure;
  int joinable = 0; // side streams that waited for the start
  while (joinable < lanes - 1) {
    if (Status s = checkCuda(
            cudaStreamWaitEvent(sideStreams_[joinable].stream, start, 0),
            "a side stream waiting for the work before it");
        !s) {
      failure = s;
      break;
    }
    ++joinable;
  }
  std::vector<int64_t> load(lanes, 0);
  for (int64_t item : order) {
    if (failure)
      break;
    const int lane = static_cast<int>(
        std::min_element(load.begin(), load.begin() + 1 + joinable) -
        load.begin());
    load[lane] += std::max<int64_t>(weights[item], 1);
    if (Status s =
            issue(item, lane == 0 ? cublas_ : sideStreams_[lane - 1].cublas);
        !s)
      failure = s;
  }
  // Joined even after a failure, so nothing queued later races the calls
  // already queued.
  for (int i = 0; i < joinable; ++i) {
    auto done = static_cast<cudaEvent_t>(sideStreams_[i].done);
    Status joined = checkCuda(cudaEventRecord(done, sideStreams_[i].stream),
                              "recording a side stream's end");
    if (joined)
      if (Status s = checkCuda(cudaStreamWaitEvent(stream_, done, 0),
                               "the stream waiting for a side stream");
          !s && !failure)
        failure = s;
    if (!joined && !failure)
      failure = joined;
  }
  return failure ? *failure : Status::ok();
}

Status KernelContext::setStream(Stream stream) {
  stream_ = stream ? stream : ownStream_;
  cublasStatus_t status =
      cublasSetStream(static_cast<cublasHandle_t>(cublas_), stream_);
  if (status != CUBLAS_STATUS_SUCCESS)
    return Status(StatusCode::Internal, std::string("cublasSetStream: ") +
                                            cublasGetStatusName(status));
  return Status::ok();
}

Status KernelContext::scratch(int slot, int64_t bytes, void *&data) {
  if (slot < 0 || static_cast<size_t>(slot) >= scratch_.size())
    return Status(StatusCode::Internal,
                  "scratch area " + std::to_string(slot) + " does not exist");
  ScratchArea &area = scratch_[static_cast<size_t>(slot)];
  if (area.bytes < bytes) {
    if (capturing)
      return Status(StatusCode::Internal,
                    "scratch area " + std::to_string(slot) + " must grow to " +
                        std::to_string(bytes) +
                        " bytes while a graph is recorded; the pass should "
                        "have run eagerly first");
    // The old area stays allocated until the context goes: a CUDA graph
    // recorded with it (this backend's, or a caller's torch graph around an
    // earlier pass) still writes there when replayed, and queued work may
    // still read it. A slot grows a few times at most (sizes round up to
    // MiB), so what is kept is small.
    if (area.data) {
      retiredScratch_.push_back(area.data);
      area = {};
    }
    int64_t rounded = (bytes + (int64_t{1} << 20) - 1) >> 20 << 20;
    if (Status s = checkCuda(cudaMalloc(&area.data, rounded),
                             ("cudaMalloc of " + std::to_string(rounded) +
                              " bytes of kernel scratch")
                                 .c_str());
        !s)
      return s;
    area.bytes = rounded;
  }
  data = area.data;
  return Status::ok();
}

Status KernelContext::zeroedScratch(int slot, int64_t bytes, void *&data) {
  if (Status s = scratch(slot, bytes, data); !s)
    return s;
  ScratchArea &area = scratch_[static_cast<size_t>(slot)];
  if (area.zeroed)
    return Status::ok();
  // A new area (scratch() refuses to grow one while a graph is recorded).
  if (Status s = checkCuda(cudaMemsetAsync(area.data, 0, area.bytes, stream_),
                           "clearing zeroed kernel scratch");
      !s)
    return s;
  area.zeroed = true;
  return Status::ok();
}

Status KernelContext::waitForStream(const char *what) {
  if (streamWaiter)
    return streamWaiter(stream_);
  return checkCuda(cudaStreamSynchronize(stream_), what);
}

Status KernelContext::hostSegments(const ExpertRowSpace &space,
                                   const int32_t *&hostOffsets,
                                   const int32_t *&hostRows) {
  int64_t count = 2 * space.experts + 1;
  if (hostKeyOffsets_ != space.offsets || hostKeyGeneration_ != generation ||
      pinnedCount_ < count) {
    if (capturing)
      return Status(StatusCode::Internal,
                    "a grouped GEMM of a dynamic routing needs the row counts "
                    "on the host, which a graph cannot record");
    if (pinnedCount_ < count) {
      if (pinned_)
        cudaFreeHost(pinned_);
      pinned_ = nullptr;
      pinnedCount_ = 0;
      if (Status s = checkCuda(cudaMallocHost(&pinned_, count * 4),
                               "cudaMallocHost of the routing read-back");
          !s)
        return s;
      pinnedCount_ = count;
    }
    // The one host synchronization of a dynamic routing.
    if (Status s = checkCuda(
            cudaMemcpyAsync(pinned_, space.offsets, (space.experts + 1) * 4,
                            cudaMemcpyDeviceToHost, stream_),
            "reading the expert offsets");
        !s)
      return s;
    if (Status s = checkCuda(
            cudaMemcpyAsync(pinned_ + space.experts + 1, space.rows,
                            space.experts * 4, cudaMemcpyDeviceToHost,
                            stream_),
            "reading the expert rows");
        !s)
      return s;
    if (Status s = waitForStream("waiting for the routing read-back"); !s)
      return s;
    hostKeyOffsets_ = space.offsets;
    hostKeyGeneration_ = generation;
  }
  hostOffsets = pinned_;
  hostRows = pinned_ + space.experts + 1;
  return Status::ok();
}

} // namespace flex::cuda
