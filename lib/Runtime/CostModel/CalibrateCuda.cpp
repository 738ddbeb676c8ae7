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
// built-in figures (the profile's notes say so); on W ranks with a device
// communicator CalibrateCudaExchange.cpp times them.
//
//===----------------------------------------------------------------------===//

#include "CalibrateCudaSupport.h"

#include "flex/Runtime/CostModel/Calibrate.h"

#include "flex/Runtime/Core/Half.h"

#if FLEX_HAVE_NCCL
#include <nccl.h>
#endif

#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <memory>
#include <random>

namespace flex::calibrate_cuda {

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

} // namespace flex::calibrate_cuda

namespace flex {

using namespace calibrate_cuda;

namespace {

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
    axes = {{DType::BF16, {64, 512}, {512, 2048}}, {DType::F32, {64}, {512}}};
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
///  - 1024 rows per expert of 8 large experts (the large tile, or on
///    Hopper the wgmma kernel): its rate;
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
  // On Hopper the large problem runs the wgmma kernel (its figure); the
  // mma.sync large tile's keeps its default there.
  if (largeS > launchS)
    (cuda::wgmmaGroupedGemmAvailable(ctx) ? figures.wgmmaFlopsPerSecond
                                          : figures.largeFlopsPerSecond) =
        flops(large) / (largeS - launchS);
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
