//===- CalibrateCudaSupport.h - What the CUDA calibration's parts share ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares what the one-GPU calibration (CalibrateCuda.cpp) and
// the several-ranks one (CalibrateCudaExchange.cpp) share: the event timer,
// device buffers, the random fill and one grouped GEMM's timing.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_COSTMODEL_CALIBRATECUDASUPPORT_H
#define LIB_RUNTIME_COSTMODEL_CALIBRATECUDASUPPORT_H

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/CostModel/DeviceProfile.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

namespace flex::calibrate_cuda {

#define FLEX_CAL_CHECK(call, what)                                             \
  do {                                                                         \
    if (Status s_ = cuda::checkCuda(static_cast<int>(call), what); !s_)        \
      return s_;                                                               \
  } while (0)

/// Device memory freed on scope exit.
struct DeviceBuffer {
  void *data = nullptr;
  ~DeviceBuffer() {
    if (data)
      cudaFree(data);
  }
};

/// Events timing one queued call each; median seconds.
class Timer {
public:
  explicit Timer(cudaStream_t stream) : stream_(stream) {}
  ~Timer() {
    for (cudaEvent_t event : events_)
      cudaEventDestroy(event);
  }

  /// Median seconds of one `body` (which queues work on the stream): one
  /// warm-up call, then `reps` calls queued back to back, each between two
  /// events (no host wait between calls: eager steady state).
  Status median(const std::function<Status()> &body, int reps,
                double &seconds) {
    if (Status s = ensure(2 * reps); !s)
      return s;
    if (Status s = body(); !s)
      return s;
    for (int rep = 0; rep < reps; ++rep) {
      FLEX_CAL_CHECK(cudaEventRecord(events_[2 * rep], stream_), "event");
      if (Status s = body(); !s)
        return s;
      FLEX_CAL_CHECK(cudaEventRecord(events_[2 * rep + 1], stream_), "event");
    }
    FLEX_CAL_CHECK(cudaStreamSynchronize(stream_), "calibration sync");
    std::vector<double> times(reps);
    for (int rep = 0; rep < reps; ++rep) {
      float ms = 0;
      FLEX_CAL_CHECK(
          cudaEventElapsedTime(&ms, events_[2 * rep], events_[2 * rep + 1]),
          "event elapsed time");
      times[rep] = std::max(1e-9, ms * 1e-3);
    }
    std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
    seconds = times[reps / 2];
    return Status::ok();
  }

  /// As median, with the repetitions chosen from one probe so that the
  /// shape takes about `budget` seconds (at least 3, at most `maxReps`).
  Status adaptive(const std::function<Status()> &body, double budget,
                  int maxReps, double &seconds) {
    double probe = 0;
    if (Status s = median(body, 1, probe); !s)
      return s;
    const int reps =
        std::clamp(static_cast<int>(budget / probe), 3, std::max(3, maxReps));
    return median(body, reps, seconds);
  }

private:
  Status ensure(int count) {
    while (static_cast<int>(events_.size()) < count) {
      cudaEvent_t event;
      FLEX_CAL_CHECK(cudaEventCreate(&event), "event create");
      events_.push_back(event);
    }
    return Status::ok();
  }
  cudaStream_t stream_;
  std::vector<cudaEvent_t> events_;
};

/// Fills `bytes` of device memory with small random bf16 values (read as
/// f32, each pair is a finite number of the same size): never zeros, which
/// can run faster than real data. 64 MiB from the host, then doubled on
/// the device.
Status fillRandom(void *data, size_t bytes);

/// One GEMM shape of the grid: `groups` groups of [m, k] x [k, n].
struct Shape {
  int64_t groups, m, k, n;
  DType dtype;
  bool ragged;
};

/// Seconds of one grouped GEMM of `shape` through cuda::groupedGemm.
Status timeGemm(cuda::KernelContext &ctx, Timer &timer, const Shape &shape,
                void *a, void *b, void *c, int32_t *segments, double &seconds);

/// On W > 1 ranks with a device communicator: the exchange, the collectives
/// and the two slowdowns into `profile` (CalibrateCudaExchange.cpp), its
/// notes into `notes`; the communicator aborted on a failure.
Status calibrateExchanges(cuda::KernelContext &ctx, Communicator &comm,
                          const RuntimeOptions &runtime, bool quick,
                          DeviceProfile &profile, std::string &notes);

} // namespace flex::calibrate_cuda

#endif // LIB_RUNTIME_COSTMODEL_CALIBRATECUDASUPPORT_H
