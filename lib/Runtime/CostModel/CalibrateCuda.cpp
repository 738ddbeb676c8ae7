//===- CalibrateCuda.cpp - Measure the CUDA backend's profile -------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements calibrateCuda: the CUDA kernels' grouped GEMM
// (cuda::groupedGemm, the executor's own path: cuBLAS strided batches for a
// padded layout, one GEMM per group for a ragged one) over a grid of shapes,
// a large device-to-device copy and the cost of one tiny step, all timed
// with CUDA events after a warm-up, each figure the median of its
// repetitions. Built only with CUDA (FLEX_HAVE_CUDA); the only part of the
// cost model that includes the CUDA backend (CheckLayering.cmake).
//
// One GPU: the collectives and the slowdowns beside an exchange keep the
// built-in figures (the profile's notes say so). On W ranks with a device
// (NCCL) communicator it also times, on an exchange stream of the highest
// priority as the backend's: Flex's own exchange (allToAllBlocks, a block
// per peer and local expert), all_gather, reduce_scatter and all_reduce at
// two sizes (alpha and beta), and the two slowdowns (a GEMM loop beside an
// exchange loop, each timed alone and together); every figure is the
// slowest rank's.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/Calibrate.h"

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cuda_runtime.h>
#if FLEX_HAVE_NCCL
#include <nccl.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

namespace flex {

namespace {

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
Status fillRandom(void *data, size_t bytes) {
  const size_t chunk = std::min<size_t>(bytes, size_t(64) << 20) & ~size_t(3);
  std::vector<uint16_t> host(chunk / 2);
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (uint16_t &v : host)
    v = floatToBf16(dist(rng));
  FLEX_CAL_CHECK(cudaMemcpy(data, host.data(), chunk, cudaMemcpyHostToDevice),
                 "calibration fill");
  char *base = static_cast<char *>(data);
  for (size_t done = chunk; done < bytes;) {
    const size_t n = std::min(done, bytes - done);
    FLEX_CAL_CHECK(cudaMemcpy(base + done, base, n, cudaMemcpyDeviceToDevice),
                   "calibration fill");
    done += n;
  }
  return Status::ok();
}

/// One GEMM shape of the grid: `groups` groups of [m, k] x [k, n].
struct Shape {
  int64_t groups, m, k, n;
  DType dtype;
  bool ragged;
};

/// The grid: 8 and 64 groups of [m, k] x [k, n], m from 32 to 2048 rows per
/// group, k and n each from 1024 to 8192 (bf16; f32 to 4096 and fewer m),
/// padded and ragged. f16 runs the same tensor cores as bf16 and reads its
/// points. Bounded so a weight tensor stays <= 2 GiB and an f32 (no TF32)
/// point under a few TFLOP.
std::vector<Shape> gemmGrid(bool quick) {
  struct Axes {
    DType dtype;
    std::vector<int64_t> rows, sizes;
  };
  std::vector<Axes> axes = {
      {DType::BF16, {32, 128, 512, 2048}, {1024, 2048, 4096, 8192}},
      {DType::F32, {32, 256, 2048}, {1024, 2048, 4096}}};
  std::vector<int64_t> groupCounts = {8, 64};
  if (quick)
    axes = {{DType::BF16, {64, 512}, {512, 2048}},
            {DType::F32, {64}, {512}}};
  std::vector<Shape> grid;
  for (const Axes &axis : axes)
    for (bool ragged : {false, true})
      for (int64_t groups : groupCounts)
        for (int64_t m : axis.rows)
          for (int64_t k : axis.sizes)
            for (int64_t n : axis.sizes) {
              const double weightBytes =
                  double(groups) * k * n * dtypeSize(axis.dtype);
              const double flops = 2.0 * groups * m * k * n;
              if (weightBytes > double(2ll << 30))
                continue;
              if (axis.dtype == DType::F32 && flops > 4e12)
                continue;
              grid.push_back({groups, m, k, n, axis.dtype, ragged});
            }
  return grid;
}

/// The rows per group of a ragged layout: skewed (1.5x and 0.5x of the mean,
/// alternating), as a dropless routing is, the same total.
std::vector<int32_t> raggedRows(const Shape &shape) {
  std::vector<int32_t> rows(shape.groups);
  for (int64_t g = 0; g < shape.groups; ++g)
    rows[g] = static_cast<int32_t>(g % 2 == 0 ? shape.m + shape.m / 2
                                              : shape.m - shape.m / 2);
  if (shape.groups % 2)
    rows.back() = static_cast<int32_t>(shape.m);
  return rows;
}

/// Seconds of one grouped GEMM of `shape` through cuda::groupedGemm.
Status timeGemm(cuda::KernelContext &ctx, Timer &timer, const Shape &shape,
                void *a, void *b, void *c, int32_t *segments, double &seconds) {
  std::vector<int32_t> rows(shape.groups, static_cast<int32_t>(shape.m));
  if (shape.ragged)
    rows = raggedRows(shape);
  std::vector<int32_t> host(2 * shape.groups + 1);
  for (int64_t g = 0; g < shape.groups; ++g) {
    host[g + 1] = host[g] + rows[g];
    host[shape.groups + 1 + g] = rows[g];
  }
  FLEX_CAL_CHECK(cudaMemcpy(segments, host.data(),
                            host.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice),
                 "calibration segments");
  cuda::ExpertRowSpace space;
  space.offsets = segments;
  space.rows = segments + shape.groups + 1;
  space.experts = shape.groups;
  space.rowBound = shape.groups * shape.m;
  space.staticCapacity = shape.ragged ? -1 : shape.m;
  space.padded = !shape.ragged;
  // A new routing: the ragged path reads the counts again, once.
  ++ctx.generation;
  // About 30 ms per shape; small shapes at most 30 repetitions.
  return timer.adaptive(
      [&] {
        return cuda::groupedGemm(ctx, {a, shape.dtype}, {b, shape.dtype}, {},
                                 {c, shape.dtype}, shape.k, shape.n, space,
                                 GroupedGemmOptions{});
      },
      0.03, 30, seconds);
}

/// The GEMM table: one point per shape of the grid.
Status calibrateGemm(cuda::KernelContext &ctx, Timer &timer, bool quick,
                     DeviceProfile &profile) {
  const std::vector<Shape> grid = gemmGrid(quick);
  size_t aBytes = 0, bBytes = 0, cBytes = 0;
  for (const Shape &s : grid) {
    const size_t elem = dtypeSize(s.dtype);
    const size_t rows = size_t(s.groups) * (s.m + s.m / 2); // ragged bound
    aBytes = std::max(aBytes, rows * s.k * elem);
    bBytes = std::max(bBytes, size_t(s.groups) * s.k * s.n * elem);
    cBytes = std::max(cBytes, rows * s.n * elem);
  }
  DeviceBuffer a, b, c, segments;
  FLEX_CAL_CHECK(cudaMalloc(&a.data, aBytes), "calibration A");
  FLEX_CAL_CHECK(cudaMalloc(&b.data, bBytes), "calibration B");
  FLEX_CAL_CHECK(cudaMalloc(&c.data, cBytes), "calibration C");
  FLEX_CAL_CHECK(cudaMalloc(&segments.data, (2 * 64 + 1) * sizeof(int32_t) * 4),
                 "calibration segments");
  if (Status s = fillRandom(a.data, aBytes); !s)
    return s;
  if (Status s = fillRandom(b.data, bBytes); !s)
    return s;
  for (const Shape &s : grid) {
    double seconds = 0;
    if (Status st = timeGemm(ctx, timer, s, a.data, b.data, c.data,
                             static_cast<int32_t *>(segments.data), seconds);
        !st)
      return st;
    const double flops = 2.0 * s.groups * s.m * s.k * s.n;
    profile.gemm.push_back(
        {s.m, s.n, s.k, s.dtype, s.ragged, flops / seconds, s.groups});
  }
  return Status::ok();
}

/// The device-sized grouped GEMM's figures (DeviceProfile::deviceGemm), from
/// five bf16 problems through the grouped GEMMs with grouped_gemm=device,
/// each time = launch + max(FLOPs / tile rate, weight bytes / (efficiency x
/// bandwidth)) (docs/CostModel.md, "Which path a grouped GEMM takes"):
///  - one row per expert of small weights: the launch;
///  - 4 rows per expert of 64 decode-sized experts: the weight-read rate;
///  - 32 rows per expert of the same (the small tile): its FLOP rate;
///  - 1024 rows per expert of 8 large experts (the large tile): its rate;
///  - the weight gradient of 64 experts of 32 rows, 1024 x 1024: its time
///    per output tile (wgradTileSeconds; one reduction step per tile).
/// The device's bandwidth must be measured first (calibrateMemory).
Status calibrateDeviceGemm(cuda::KernelContext &ctx, Timer &timer,
                           DeviceProfile &profile) {
  DeviceGemmFigures figures;
  std::string why;
  if (!cuda::deviceGroupedGemmAvailable(ctx, &why)) {
    figures.available = false;
    figures.source = "moe-run --calibrate: " + why;
    profile.deviceGemm = figures;
    return Status::ok();
  }
  struct Problem {
    int64_t groups, rows, k, n;
  };
  const Problem launch{8, 1, 256, 256}, decode{64, 4, 2048, 1408},
      small{64, 32, 2048, 1408}, large{8, 1024, 2048, 2048},
      wgrad{64, 32, 1024, 1024};
  size_t aBytes = 0, bBytes = 0, cBytes = 0;
  for (const Problem &p : {launch, decode, small, large, wgrad}) {
    aBytes = std::max(aBytes, size_t(p.groups * p.rows * p.k) * 2);
    bBytes = std::max(bBytes, size_t(p.groups * p.k * p.n) * 2);
    cBytes = std::max(cBytes, size_t(p.groups * p.rows * p.n) * 2);
  }
  DeviceBuffer a, b, c, segments;
  FLEX_CAL_CHECK(cudaMalloc(&a.data, aBytes), "calibration A");
  FLEX_CAL_CHECK(cudaMalloc(&b.data, bBytes), "calibration B");
  FLEX_CAL_CHECK(cudaMalloc(&c.data, cBytes), "calibration C");
  FLEX_CAL_CHECK(cudaMalloc(&segments.data, (2 * 64 + 1) * sizeof(int32_t)),
                 "calibration segments");
  if (Status s = fillRandom(a.data, aBytes); !s)
    return s;
  if (Status s = fillRandom(b.data, bBytes); !s)
    return s;
  const GroupedGemmImpl saved = ctx.groupedGemm;
  ctx.groupedGemm = GroupedGemmImpl::Device;
  auto time = [&](const Problem &p, bool weightGradient,
                  double &seconds) -> Status {
    std::vector<int32_t> host(2 * p.groups + 1);
    for (int64_t g = 0; g < p.groups; ++g) {
      host[g + 1] = host[g] + static_cast<int32_t>(p.rows);
      host[p.groups + 1 + g] = static_cast<int32_t>(p.rows);
    }
    FLEX_CAL_CHECK(cudaMemcpy(segments.data, host.data(),
                              host.size() * sizeof(int32_t),
                              cudaMemcpyHostToDevice),
                   "calibration segments");
    cuda::ExpertRowSpace space;
    space.offsets = static_cast<const int32_t *>(segments.data);
    space.rows = space.offsets + p.groups + 1;
    space.experts = p.groups;
    space.rowBound = p.groups * p.rows;
    // New counts at the same address: no host copy of old ones is reused.
    ++ctx.generation;
    return timer.adaptive(
        [&] {
          // gradB [E, k, n] = A[rows of e]^T gradC[rows of e]: b holds
          // gradB, c the [rows, n] gradC.
          if (weightGradient)
            return cuda::groupedGemmWgrad(
                ctx, {a.data, DType::BF16}, {c.data, DType::BF16}, p.k, p.n,
                space, {b.data, DType::BF16}, {}, false);
          return cuda::groupedGemm(ctx, {a.data, DType::BF16},
                                   {b.data, DType::BF16}, {},
                                   {c.data, DType::BF16}, p.k, p.n, space,
                                   GroupedGemmOptions{});
        },
        0.02, 50, seconds);
  };
  double launchS = 0, decodeS = 0, smallS = 0, largeS = 0, wgradS = 0;
  Status status = time(launch, false, launchS);
  if (status)
    status = time(decode, false, decodeS);
  if (status)
    status = time(small, false, smallS);
  if (status)
    status = time(large, false, largeS);
  if (status)
    status = time(wgrad, true, wgradS);
  ctx.groupedGemm = saved;
  if (!status)
    return status;
  auto flops = [](const Problem &p) {
    return 2.0 * double(p.groups * p.rows) * double(p.k) * double(p.n);
  };
  auto weightBytes = [](const Problem &p) {
    return 2.0 * double(p.groups) * double(p.k) * double(p.n);
  };
  // Each figure from the part of its problem's time above the launch; a
  // time at or below it keeps the default (it says nothing new).
  figures.launchSeconds = launchS;
  if (decodeS > launchS && profile.memoryBandwidth > 0)
    figures.weightReadEfficiency = std::min(
        1.0, weightBytes(decode) / ((decodeS - launchS) *
                                    profile.memoryBandwidth));
  if (smallS > launchS)
    figures.smallFlopsPerSecond = flops(small) / (smallS - launchS);
  if (largeS > launchS)
    figures.largeFlopsPerSecond = flops(large) / (largeS - launchS);
  if (wgradS > launchS)
    figures.wgradTileSeconds =
        (wgradS - launchS) /
        (double(wgrad.groups) * double(wgrad.k / 128) * double(wgrad.n / 128));
  figures.source = "moe-run --calibrate: five bf16 problems through the "
                   "device-sized kernel (launch, weight read, small and "
                   "large tile, weight-gradient tile)";
  profile.deviceGemm = figures;
  return Status::ok();
}

/// Copy bandwidth (bytes read plus written, as getStepWork counts them) and
/// the cost of one tiny step queued back to back (uniform_segments on one
/// group): what an eager memory-bound step pays besides its bytes.
Status calibrateMemory(cuda::KernelContext &ctx, Timer &timer, bool quick,
                       DeviceProfile &profile) {
  const size_t bytes = quick ? (size_t(64) << 20) : (size_t(1) << 30);
  DeviceBuffer src, dst, small;
  FLEX_CAL_CHECK(cudaMalloc(&src.data, bytes), "calibration copy");
  FLEX_CAL_CHECK(cudaMalloc(&dst.data, bytes), "calibration copy");
  if (Status s = fillRandom(src.data, bytes); !s)
    return s;
  cudaStream_t stream = ctx.stream();
  double seconds = 0;
  if (Status s = timer.median(
          [&] {
            return cuda::checkCuda(static_cast<int>(cudaMemcpyAsync(
                                       dst.data, src.data, bytes,
                                       cudaMemcpyDeviceToDevice, stream)),
                                   "calibration copy");
          },
          quick ? 5 : 11, seconds);
      !s)
    return s;
  profile.memoryBandwidth = 2.0 * double(bytes) / seconds;

  FLEX_CAL_CHECK(cudaMalloc(&small.data, 64), "calibration launch");
  const int32_t one = 1;
  FLEX_CAL_CHECK(
      cudaMemcpy(small.data, &one, sizeof one, cudaMemcpyHostToDevice),
      "calibration launch");
  auto *capacity = static_cast<int32_t *>(small.data);
  const int batch = 200;
  if (Status s = timer.median(
          [&]() -> Status {
            for (int i = 0; i < batch; ++i)
              if (Status st = cuda::uniformSegments(ctx, capacity, 1, 1, 1, 0,
                                                    capacity + 4, capacity + 8);
                  !st)
                return st;
            return Status::ok();
          },
          quick ? 3 : 7, seconds);
      !s)
    return s;
  profile.launchSeconds = seconds / batch;
  return Status::ok();
}

std::string versionText(int version) {
  // CUDA encodes 1000 * major + 10 * minor.
  return std::to_string(version / 1000) + "." +
         std::to_string((version % 1000) / 10);
}

/// The kernel module's version ("570.86.15") when /proc says it.
std::string kernelDriverVersion() {
  std::ifstream in("/proc/driver/nvidia/version");
  std::string word, previous;
  while (in >> word) {
    if (previous == "Module" && !word.empty() &&
        std::isdigit(static_cast<unsigned char>(word[0])))
      return word;
    previous = word;
  }
  return "";
}

/// Device name and the driver, runtime and NCCL versions.
Status describeDevice(const CalibrationOptions &options,
                      DeviceProfile &profile) {
  int device = 0;
  FLEX_CAL_CHECK(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  FLEX_CAL_CHECK(cudaGetDeviceProperties(&prop, device),
                 "cudaGetDeviceProperties");
  profile.deviceName =
      options.deviceName.empty() ? std::string(prop.name) : options.deviceName;
  int driver = 0, runtime = 0;
  FLEX_CAL_CHECK(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  FLEX_CAL_CHECK(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  const std::string module = kernelDriverVersion();
  profile.driverVersion = (module.empty() ? "" : module + " ") + "(CUDA " +
                          versionText(driver) + ")";
  profile.cudaVersion = versionText(runtime);
#if FLEX_HAVE_NCCL
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess)
    profile.ncclVersion = std::to_string(nccl / 10000) + "." +
                          std::to_string((nccl / 100) % 100) + "." +
                          std::to_string(nccl % 100);
#endif
  return Status::ok();
}

//===----------------------------------------------------------------------===//
// Several ranks: collectives and the slowdowns
//===----------------------------------------------------------------------===//

/// Blocks per peer in the timed exchange: a run per (peer, local expert), as
/// Flex sends them in place (AllToAllLayout::blocks).
constexpr int64_t kBlocksPerPeer = 8;

/// A stream destroyed on scope exit.
struct OwnedStream {
  cudaStream_t stream = nullptr;
  ~OwnedStream() {
    if (stream)
      cudaStreamDestroy(stream);
  }
};

/// Times collectives queued on `stream` through `comm`: a warm-up, then
/// `reps` calls between two events, waited for through the communicator
/// (bounded: a dead peer fails the calibration instead of hanging it).
class CollectiveTimer {
public:
  CollectiveTimer(Communicator &comm, cudaStream_t stream)
      : comm_(comm), stream_(stream) {}
  ~CollectiveTimer() {
    for (cudaEvent_t event : {begin_, end_})
      if (event)
        cudaEventDestroy(event);
  }

  /// Seconds of one `body` (a mean over `reps`, the ranks met first).
  Status time(const std::function<Status()> &body, int reps,
              std::string_view what, double &seconds) {
    if (!begin_) {
      FLEX_CAL_CHECK(cudaEventCreate(&begin_), "event create");
      FLEX_CAL_CHECK(cudaEventCreate(&end_), "event create");
    }
    if (Status s = comm_.barrier(what); !s)
      return s;
    if (Status s = body(); !s) // warm-up
      return s;
    FLEX_CAL_CHECK(cudaEventRecord(begin_, stream_), "event");
    for (int rep = 0; rep < reps; ++rep)
      if (Status s = body(); !s)
        return s;
    FLEX_CAL_CHECK(cudaEventRecord(end_, stream_), "event");
    if (Status s = comm_.synchronizeStream(stream_, what); !s)
      return s;
    float ms = 0;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, begin_, end_), "event time");
    seconds = std::max(1e-9, ms * 1e-3 / reps);
    return Status::ok();
  }

private:
  Communicator &comm_;
  cudaStream_t stream_;
  cudaEvent_t begin_ = nullptr, end_ = nullptr;
};

/// Every rank's `values` replaced by the element-wise largest (the slowest
/// rank's), through a device buffer (the communicator moves device memory);
/// every wait bounded by the communicator's.
Status slowestRankOnDevice(Communicator &comm, cudaStream_t stream,
                           std::vector<double> &values) {
  const int W = comm.size();
  const int64_t bytes = static_cast<int64_t>(values.size() * sizeof(double));
  DeviceBuffer send, recv;
  FLEX_CAL_CHECK(cudaMalloc(&send.data, bytes), "calibration gather");
  FLEX_CAL_CHECK(cudaMalloc(&recv.data, bytes * W), "calibration gather");
  FLEX_CAL_CHECK(
      cudaMemcpy(send.data, values.data(), bytes, cudaMemcpyHostToDevice),
      "calibration gather");
  if (Status s =
          comm.allGather(send.data, bytes, recv.data, "calibration results");
      !s)
    return s;
  // Wait through the communicator first (a dead peer fails it, bounded);
  // then the copy back has nothing left to wait for.
  if (Status s = comm.synchronizeStream(stream, "calibration results"); !s)
    return s;
  std::vector<double> all(values.size() * W);
  FLEX_CAL_CHECK(
      cudaMemcpy(all.data(), recv.data, bytes * W, cudaMemcpyDeviceToHost),
      "calibration gather");
  for (int r = 0; r < W; ++r)
    for (size_t i = 0; i < values.size(); ++i)
      values[i] = std::max(values[i], all[r * values.size() + i]);
  return Status::ok();
}

/// The device memory of calibrateExchanges, owned by its caller so that a
/// failure aborts the communicator (its kernels stop waiting for peers)
/// before the memory is freed (cudaFree waits for the device).
struct ExchangeBuffers {
  DeviceBuffer send, recv, a, b, c, segments;
};

/// Two points of the exchange as the backend runs it: small runs packed
/// into one block per peer (the auto staging packs runs under 8 MiB), large
/// ones in place, a block of 8 MiB per peer and local expert.
struct ExchangeSizes {
  int64_t small = int64_t(64) << 10; ///< bytes per peer, one block
  int64_t largeBlocks = kBlocksPerPeer;
  int64_t large = kBlocksPerPeer * (int64_t(8) << 20); ///< bytes per peer
  int reps = 20;                                       ///< calls per timing
};

/// Flex's exchange of `perPeer` bytes to each of W peers in `blocks` blocks
/// each, in place (allToAllBlocks).
std::function<Status()> exchangeCall(Communicator &comm, void *send, void *recv,
                                     int64_t perPeer, int64_t blocks) {
  auto list = std::make_shared<std::vector<Communicator::Block>>();
  const int64_t block = perPeer / blocks;
  for (int p = 0; p < comm.size(); ++p)
    for (int64_t l = 0; l < blocks; ++l)
      list->push_back({p, (p * blocks + l) * block, block});
  return [&comm, send, recv, list]() {
    return comm.allToAllBlocks(send, *list, recv, *list,
                               "calibration all_to_all");
  };
}

/// seconds = [all_to_all, all_gather, reduce_scatter, all_reduce] at the
/// small size, then at the large one.
Status timeCollectives(Communicator &comm, CollectiveTimer &timer, void *send,
                       void *recv, const ExchangeSizes &sizes,
                       std::vector<double> &seconds) {
  seconds.assign(8, 0.0);
  for (int size = 0; size < 2; ++size) {
    const int64_t perPeer = size == 0 ? sizes.small : sizes.large;
    const int64_t count = perPeer / 4;
    // all_reduce: sync_capacity's, a few values (its time is its alpha).
    const int64_t values = size == 0 ? 1 : count;
    const std::pair<const char *, std::function<Status()>> calls[] = {
        {"calibration a2a", exchangeCall(comm, send, recv, perPeer,
                                         size == 0 ? 1 : sizes.largeBlocks)},
        {"calibration all_gather",
         [&] {
           return comm.allGather(send, perPeer, recv, "calibration all_gather");
         }},
        {"calibration reduce_scatter",
         [&] {
           return comm.reduceScatterSum(send, recv, count, DType::F32,
                                        "calibration reduce_scatter");
         }},
        {"calibration all_reduce", [&] {
           return comm.allReduceMaxInt32(static_cast<int32_t *>(recv), values,
                                         "calibration all_reduce");
         }}};
    for (int kind = 0; kind < 4; ++kind)
      if (Status s = timer.time(calls[kind].second, sizes.reps,
                                calls[kind].first, seconds[4 * size + kind]);
          !s)
        return s;
  }
  return Status::ok();
}

/// CUDA events destroyed on scope exit.
struct OwnedEvents {
  cudaEvent_t events[4] = {};
  ~OwnedEvents() {
    for (cudaEvent_t event : events)
      if (event)
        cudaEventDestroy(event);
  }
};

/// A loop of GEMMs on the compute stream beside a loop of exchanges on the
/// exchange stream, each timed from its first item's start to its last
/// one's end.
class OverlapRun {
public:
  OverlapRun(Communicator &comm, cudaStream_t compute, cudaStream_t exchange,
             std::function<Status()> gemm, std::function<Status()> oneExchange)
      : comm_(comm), compute_(compute), exchange_(exchange),
        gemm_(std::move(gemm)), exchangeCall_(std::move(oneExchange)) {}

  /// `gemms` GEMMs beside `exchanges` exchanges: interleaved (one of each
  /// while both last) so that each starts beside the other, or, with
  /// `gemmsFirst`, every GEMM queued before the first exchange.
  Status run(int gemms, int exchanges, bool gemmsFirst, double &gemmSeconds,
             double &exchangeSeconds) {
    cudaEvent_t *e = events_.events;
    if (!e[0])
      for (int i = 0; i < 4; ++i)
        FLEX_CAL_CHECK(cudaEventCreate(&e[i]), "event create");
    if (Status s = comm_.barrier("calibration overlap"); !s)
      return s;
    FLEX_CAL_CHECK(cudaEventRecord(e[0], compute_), "event");
    FLEX_CAL_CHECK(cudaEventRecord(e[2], exchange_), "event");
    if (gemmsFirst)
      for (int i = 0; i < gemms; ++i)
        if (Status s = gemm_(); !s)
          return s;
    for (int i = 0; i < std::max(gemms, exchanges); ++i) {
      if (i < exchanges)
        if (Status s = exchangeCall_(); !s)
          return s;
      if (!gemmsFirst && i < gemms)
        if (Status s = gemm_(); !s)
          return s;
    }
    FLEX_CAL_CHECK(cudaEventRecord(e[1], compute_), "event");
    FLEX_CAL_CHECK(cudaEventRecord(e[3], exchange_), "event");
    if (Status s = comm_.synchronizeStream(exchange_, "calibration overlap");
        !s)
      return s;
    FLEX_CAL_CHECK(cudaStreamSynchronize(compute_), "calibration overlap");
    float ms = 0;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, e[0], e[1]), "event");
    gemmSeconds = ms * 1e-3;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, e[2], e[3]), "event");
    exchangeSeconds = ms * 1e-3;
    return Status::ok();
  }

private:
  Communicator &comm_;
  cudaStream_t compute_, exchange_;
  std::function<Status()> gemm_, exchangeCall_;
  OwnedEvents events_;
};

/// The two slowdowns, appended to `seconds` (the slowest rank's reduction
/// follows): compute beside an exchange, an exchange beside compute, then 1
/// for each whose measured loop outlasted the loop meant to cover it.
Status measureSlowdowns(cuda::KernelContext &ctx, Communicator &comm,
                        cudaStream_t exchange, CollectiveTimer &timer,
                        ExchangeBuffers &buffers, const ExchangeSizes &sizes,
                        bool quick, std::vector<double> &seconds) {
  // A loop of one large bf16 grouped GEMM on the compute stream beside a
  // loop of large exchanges, each long enough to cover the other; each
  // side's time together over its time alone.
  Shape gemm{8, quick ? 1024 : 2048, 4096, 4096, DType::BF16, false};
  const size_t elem = dtypeSize(gemm.dtype);
  const size_t aBytes = gemm.groups * gemm.m * gemm.k * elem;
  const size_t bBytes = gemm.groups * gemm.k * gemm.n * elem;
  FLEX_CAL_CHECK(cudaMalloc(&buffers.a.data, aBytes), "calibration A");
  FLEX_CAL_CHECK(cudaMalloc(&buffers.b.data, bBytes), "calibration B");
  FLEX_CAL_CHECK(
      cudaMalloc(&buffers.c.data, gemm.groups * gemm.m * gemm.n * elem),
      "calibration C");
  FLEX_CAL_CHECK(
      cudaMalloc(&buffers.segments.data, (2 * 64 + 1) * sizeof(int32_t)),
      "calibration segments");
  if (Status s = fillRandom(buffers.a.data, aBytes); !s)
    return s;
  if (Status s = fillRandom(buffers.b.data, bBytes); !s)
    return s;
  auto *segments = static_cast<int32_t *>(buffers.segments.data);
  Timer computeTimer(ctx.stream());
  double gemmAlone = 0;
  if (Status s = timeGemm(ctx, computeTimer, gemm, buffers.a.data,
                          buffers.b.data, buffers.c.data, segments, gemmAlone);
      !s)
    return s;
  cuda::ExpertRowSpace space; // over the segments timeGemm wrote
  space.offsets = segments;
  space.rows = segments + gemm.groups + 1;
  space.experts = gemm.groups;
  space.rowBound = gemm.groups * gemm.m;
  space.staticCapacity = gemm.m;
  space.padded = true;
  auto oneGemm = [&ctx, &buffers, gemm, space] {
    return cuda::groupedGemm(ctx, {buffers.a.data, gemm.dtype},
                             {buffers.b.data, gemm.dtype}, {},
                             {buffers.c.data, gemm.dtype}, gemm.k, gemm.n,
                             space, GroupedGemmOptions{});
  };
  auto bigExchange = exchangeCall(comm, buffers.send.data, buffers.recv.data,
                                  sizes.large, sizes.largeBlocks);
  double exchangeAlone = 0;
  if (Status s =
          timer.time(bigExchange, sizes.reps, "calibration a2a", exchangeAlone);
      !s)
    return s;
  // The loop counts below come from these: the slowest rank's, on every
  // rank alike (a rank with one exchange more would wait for a peer that
  // never sends).
  std::vector<double> alone{gemmAlone, exchangeAlone};
  if (Status s = slowestRankOnDevice(comm, exchange, alone); !s)
    return s;
  gemmAlone = alone[0];
  exchangeAlone = alone[1];
  OverlapRun overlap(comm, ctx.stream(), exchange, oneGemm, bigExchange);
  // Compute beside an exchange: exchanges for three times the GEMMs' time.
  const int gemms = quick ? 3 : 10;
  const int cover =
      static_cast<int>(std::ceil(3.0 * gemms * gemmAlone / exchangeAlone)) + 1;
  double gemmBeside = 0, exchangeLoop = 0;
  if (Status s = overlap.run(gemms, cover, /*gemmsFirst=*/false, gemmBeside,
                             exchangeLoop);
      !s)
    return s;
  // An exchange beside compute: GEMMs for twelve times the exchanges' time
  // alone (slowed up to 12x, they stay covered; checked below).
  const int exchanges = quick ? 2 : 5;
  const int gemmCover = static_cast<int>(std::ceil(12.0 * exchanges *
                                                   exchangeAlone / gemmAlone)) +
                        1;
  double gemmLoop = 0, exchangeBeside = 0;
  if (Status s = overlap.run(gemmCover, exchanges, /*gemmsFirst=*/true,
                             gemmLoop, exchangeBeside);
      !s)
    return s;
  seconds.push_back(gemmBeside / (gemms * gemmAlone));
  seconds.push_back(exchangeBeside / (exchanges * exchangeAlone));
  seconds.push_back(exchangeLoop >= gemmBeside ? 0.0 : 1.0);
  seconds.push_back(gemmLoop >= exchangeBeside ? 0.0 : 1.0);
  return Status::ok();
}

/// The ranks of this host: the launcher's word (torchrun, Open MPI, MPICH,
/// Slurm), else all W of them (one host, as the lent machines are).
int64_t ranksPerNodeFromLauncher(int64_t W) {
  for (const char *name : {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                           "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
    if (const char *value = std::getenv(name)) {
      const long n = std::strtol(value, nullptr, 10);
      if (n >= 1 && n <= W && W % n == 0)
        return n;
    }
  return W;
}

/// The profile's collectives, slowdowns and notes from the slowest rank's
/// `seconds` (timeCollectives' 8, then measureSlowdowns' 4).
void writeExchangeProfile(const Communicator &comm,
                          const RuntimeOptions &runtime,
                          const ExchangeSizes &sizes,
                          const std::vector<double> &seconds,
                          DeviceProfile &profile, std::string &notes) {
  const int W = comm.size();
  profile.worldSize = W;
  profile.ranksPerNode = ranksPerNodeFromLauncher(W);
  profile.collectives.clear();
  const double others = W - 1;
  // The bytes that leave this rank, as getStepWork counts them; all_reduce
  // (sync_capacity) counts its values once.
  const double small = static_cast<double>(sizes.small);
  const double large = static_cast<double>(sizes.large);
  const double bytes0[] = {small * others, small * others, small * others, 4.0};
  const double bytes1[] = {large * others, large * others, large * others,
                           large};
  const std::string transport =
      runtime.a2aTransport == AllToAllTransport::CopyEngine ? "ce" : "nccl";
  for (int kind = 0; kind < 4; ++kind) {
    CollectivePoint point;
    point.kind = static_cast<CollectiveKind>(kind);
    point.worldSize = point.groupSize = W;
    // The exchange's own transport (the copy engines or NCCL's kernels);
    // the other collectives always run through NCCL.
    point.transport = kind == 0 ? transport : std::string(comm.name());
    fitCollectivePoint(bytes0[kind], seconds[kind], bytes1[kind],
                       seconds[4 + kind], point);
    profile.collectives.push_back(point);
  }
  profile.overlapSlowdown = std::max(1.0, seconds[8]);
  profile.exchangeSlowdown = std::max(1.0, seconds[9]);
  notes = "W = " + std::to_string(W) +
          " GPUs: gemm through cuda::groupedGemm (cuBLAS, fp32 "
          "accumulation, no TF32) on rank 0's GPU; collectives timed on a "
          "highest-priority stream through the '" +
          std::string(comm.name()) + "' communicator (exchange transport " +
          transport + "), the slowest rank's mean of " +
          std::to_string(sizes.reps) +
          " calls: all_to_all at 64 KiB per peer in one block and at " +
          std::to_string(sizes.large >> 20) + " MiB per peer in " +
          std::to_string(sizes.largeBlocks) +
          " blocks of 8 MiB (as the backend packs small runs and sends large "
          "ones in place); overlap: a bf16 grouped GEMM loop beside an "
          "exchange loop, each side's time together over alone";
  if (seconds[10] > 0)
    notes += "; the exchanges ended before the GEMMs on some rank: "
             "compute_slowdown is a lower bound";
  if (seconds[11] > 0)
    notes += "; the GEMMs ended before the exchanges on some rank: "
             "exchange_slowdown is a lower bound";
}

/// The collectives' points and the two slowdowns on `comm`'s W ranks, on
/// an exchange stream of the highest priority as the backend's (its blocks
/// start as soon as SMs free up).
Status measureExchanges(cuda::KernelContext &ctx, Communicator &comm,
                        const RuntimeOptions &runtime, bool quick,
                        ExchangeBuffers &buffers, DeviceProfile &profile,
                        std::string &notes) {
  const int W = comm.size();
  if (comm.memory() != CommMemory::Device)
    return Status(StatusCode::InvalidArgument,
                  "CUDA calibration on " + std::to_string(W) +
                      " ranks needs a device (NCCL) communicator, got '" +
                      std::string(comm.name()) + "'");
  int least = 0, greatest = 0;
  FLEX_CAL_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest),
                 "stream priorities");
  OwnedStream exchange;
  FLEX_CAL_CHECK(cudaStreamCreateWithPriority(&exchange.stream,
                                              cudaStreamNonBlocking, greatest),
                 "exchange stream");
  if (Status s = comm.setStream(exchange.stream); !s)
    return s;
  // The communicator outlives this stream: it forgets it first.
  struct StreamReset {
    Communicator &comm;
    ~StreamReset() { (void)comm.setStream(nullptr); }
  } reset{comm};
  ExchangeSizes sizes;
  if (quick) {
    sizes.largeBlocks = 2;
    sizes.large = 2 * (int64_t(8) << 20);
    sizes.reps = 5;
  }
  FLEX_CAL_CHECK(cudaMalloc(&buffers.send.data, sizes.large * W),
                 "calibration send");
  FLEX_CAL_CHECK(cudaMalloc(&buffers.recv.data, sizes.large * W),
                 "calibration recv");
  if (Status s = fillRandom(buffers.send.data, sizes.large * W); !s)
    return s;
  CollectiveTimer timer(comm, exchange.stream);
  std::vector<double> seconds;
  if (Status s = timeCollectives(comm, timer, buffers.send.data,
                                 buffers.recv.data, sizes, seconds);
      !s)
    return s;
  if (Status s = measureSlowdowns(ctx, comm, exchange.stream, timer, buffers,
                                  sizes, quick, seconds);
      !s)
    return s;
  if (Status s = slowestRankOnDevice(comm, exchange.stream, seconds); !s)
    return s;
  writeExchangeProfile(comm, runtime, sizes, seconds, profile, notes);
  return Status::ok();
}

/// measureExchanges, the communicator aborted on a failure before the
/// memory goes.
Status calibrateExchanges(cuda::KernelContext &ctx, Communicator &comm,
                          const RuntimeOptions &runtime, bool quick,
                          DeviceProfile &profile, std::string &notes) {
  ExchangeBuffers buffers;
  Status status =
      measureExchanges(ctx, comm, runtime, quick, buffers, profile, notes);
  if (!status)
    comm.abort(status);
  return status;
}

} // namespace

Status calibrateCuda(const CalibrationOptions &options,
                     DeviceProfile &profile) {
  return calibrateCuda(options, nullptr, profile);
}

Status calibrateCuda(const CalibrationOptions &options,
                     Communicator *communicator, DeviceProfile &profile) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status(StatusCode::Unavailable,
                  "CUDA calibration: no CUDA device is visible");
  }
  // The built-in figures for what one GPU cannot measure.
  DeviceProfile result = defaultProfile("cuda", 1);
  result.builtin = false;
  result.gemm.clear();
  result.created = utcTimestamp();
  if (Status s = describeDevice(options, result); !s)
    return s;
  std::unique_ptr<cuda::KernelContext> ctx;
  if (Status s = cuda::KernelContext::create(ctx); !s)
    return s;
  // The table's ragged points are the per-expert cuBLAS path: under `auto`
  // their few-rows shapes would run the device-sized kernel, which the
  // profile prices from device_gemm instead (docs/CostModel.md).
  ctx->groupedGemm = GroupedGemmImpl::Cublas;
  Timer timer(ctx->stream());
  if (Status s = calibrateGemm(*ctx, timer, options.quick, result); !s)
    return s;
  if (Status s = calibrateMemory(*ctx, timer, options.quick, result); !s)
    return s;
  if (Status s = calibrateDeviceGemm(*ctx, timer, result); !s)
    return s;
  if (communicator && communicator->size() > 1) {
    RuntimeOptions runtime;
    if (Status s = RuntimeOptions::fromEnvironment(RuntimeOptions(), runtime);
        !s)
      return s;
    std::string notes;
    if (Status s = calibrateExchanges(*ctx, *communicator, runtime,
                                      options.quick, result, notes);
        !s)
      return s;
    result.notes = notes;
    profile = std::move(result);
    return Status::ok();
  }
  result.notes =
      "one GPU: gemm through cuda::groupedGemm (cuBLAS, fp32 accumulation, "
      "no TF32), 8 and 64 groups per point (ragged: skewed 1.5x/0.5x rows, "
      "one GEMM per group); memory a device copy, "
      "launch a tiny step queued back to back (eager); device_gemm four "
      "problems through the device-sized grouped GEMM; collectives and "
      "overlap.compute_slowdown are the built-in figures, not measured";
  profile = std::move(result);
  return Status::ok();
}

} // namespace flex
