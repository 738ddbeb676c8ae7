//===- CalibrateCpu.cpp - Measure the CPU backend's profile ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements calibrateCpu: the CPU kernels' grouped GEMM on a few
// shapes, a copy loop, one small kernel call, and the host communicator's
// collectives at two message sizes (alpha and beta fitted through them).
// Each figure is the best of a few repetitions on each rank, then the
// slowest rank's, so every rank writes the same profile.
//
// The only part of the cost model that includes a backend's kernels and the
// communicators (lib/Runtime/CheckLayering.cmake allows it here only).
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/Calibrate.h"

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Cpu/CpuKernels.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <limits>
#include <vector>

namespace flex {

void fitCollectivePoint(double bytes0, double t0, double bytes1, double t1,
                        CollectivePoint &point) {
  if (t1 > t0 && bytes1 > bytes0) {
    point.betaBytesPerSecond = (bytes1 - bytes0) / (t1 - t0);
    point.alphaSeconds = std::max(0.0, t0 - bytes0 / point.betaBytesPerSecond);
  } else {
    // Noise made the large message no slower: all latency.
    point.alphaSeconds = t0;
    point.betaBytesPerSecond = bytes1 / std::max(t1, 1e-9);
  }
}

namespace {

using Clock = std::chrono::steady_clock;

/// The best (smallest) seconds of `body` over repetitions: at least
/// `minReps`, then more until `budget` seconds have passed (at most 1000).
double bestSeconds(const std::function<void()> &body, int minReps,
                   double budget) {
  body(); // warm-up: first-touch pages, OpenMP threads
  double best = std::numeric_limits<double>::infinity();
  const auto begin = Clock::now();
  for (int rep = 0; rep < 1000; ++rep) {
    auto t0 = Clock::now();
    body();
    auto t1 = Clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    if (rep + 1 >= minReps &&
        std::chrono::duration<double>(t1 - begin).count() >= budget)
      break;
  }
  return std::max(best, 1e-9);
}

/// The slowest rank's figures, on every rank (element-wise max).
Status slowestRank(Communicator *comm, std::vector<double> &values) {
  if (!comm || comm->size() <= 1 || values.empty())
    return Status::ok();
  const int size = comm->size();
  std::vector<double> all(values.size() * size);
  if (Status s = comm->allGather(
          values.data(), static_cast<int64_t>(values.size() * sizeof(double)),
          all.data(), "calibration results");
      !s)
    return s;
  for (int r = 0; r < size; ++r)
    for (size_t i = 0; i < values.size(); ++i)
      values[i] = std::max(values[i], all[r * values.size() + i]);
  return Status::ok();
}

/// Seconds of one grouped GEMM of `groups` groups of [m, k] x [k, n].
double timeGemm(int64_t groups, int64_t m, int64_t k, int64_t n, DType dtype,
                double budget) {
  const size_t elem = dtypeSize(dtype);
  std::vector<uint8_t> a(groups * m * k * elem), b(groups * k * n * elem),
      c(groups * m * n * elem);
  // Small finite values in either type (0x3c00 bf16 = 0.0078125).
  if (dtype == DType::F32) {
    std::fill(reinterpret_cast<float *>(a.data()),
              reinterpret_cast<float *>(a.data()) + a.size() / 4, 0.01f);
    std::fill(reinterpret_cast<float *>(b.data()),
              reinterpret_cast<float *>(b.data()) + b.size() / 4, 0.01f);
  } else {
    const uint16_t bits = floatToBf16(0.01f);
    std::fill(reinterpret_cast<uint16_t *>(a.data()),
              reinterpret_cast<uint16_t *>(a.data()) + a.size() / 2, bits);
    std::fill(reinterpret_cast<uint16_t *>(b.data()),
              reinterpret_cast<uint16_t *>(b.data()) + b.size() / 2, bits);
  }
  std::vector<int32_t> offsets(groups + 1), rows(groups, int32_t(m));
  for (int64_t g = 0; g <= groups; ++g)
    offsets[g] = static_cast<int32_t>(g * m);
  ExpertSegments segments{offsets.data(), rows.data(), groups};
  return bestSeconds(
      [&] {
        cpu::groupedGemm({a.data(), dtype}, {b.data(), dtype}, {},
                         {c.data(), dtype}, k, n, segments,
                         GroupedGemmOptions{});
      },
      3, budget);
}

/// Seconds of one call of each collective at `perPeer` bytes per peer, in
/// the order all_to_all, all_gather, reduce_scatter, all_reduce.
Status timeCollectives(Communicator &comm, int64_t perPeer, double budget,
                       std::vector<double> &seconds) {
  const int size = comm.size();
  perPeer = std::max<int64_t>(4, perPeer / 4 * 4);
  std::vector<uint8_t> send(perPeer * size, 1), recv(perPeer * size);
  std::vector<int64_t> offsets(size), bytes(size, perPeer);
  for (int p = 0; p < size; ++p)
    offsets[p] = p * perPeer;
  Status failed;
  auto guard = [&](Status s) {
    if (!s && failed)
      failed = s;
  };
  // Every rank runs the same number of calls: a fixed count, no budget
  // check that could differ between ranks.
  auto time = [&](const std::function<void()> &call) {
    (void)budget;
    guard(comm.barrier("calibration"));
    call(); // warm-up
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = Clock::now();
      call();
      best = std::min(best,
                      std::chrono::duration<double>(Clock::now() - t0).count());
    }
    seconds.push_back(best);
  };
  time([&] {
    guard(comm.allToAll(send.data(), offsets.data(), bytes.data(), recv.data(),
                        offsets.data(), bytes.data(),
                        "calibration all_to_all"));
  });
  time([&] {
    guard(comm.allGather(send.data(), perPeer, recv.data(),
                         "calibration all_gather"));
  });
  time([&] {
    guard(comm.reduceScatterSum(send.data(), recv.data(), perPeer / 4,
                                DType::F32, "calibration reduce_scatter"));
  });
  std::vector<int32_t> values(perPeer / 4, 1);
  time([&] {
    guard(comm.allReduceMaxInt32(values.data(),
                                 static_cast<int64_t>(values.size()),
                                 "calibration all_reduce"));
  });
  return failed;
}

/// The collectives' alpha-beta points for `comm`'s W ranks.
Status calibrateCollectives(Communicator &comm, bool quick,
                            DeviceProfile &profile) {
  const int64_t small = 64, large = quick ? (64 << 10) : (1 << 20);
  std::vector<double> seconds;
  if (Status s = timeCollectives(comm, small, 0, seconds); !s)
    return s;
  if (Status s = timeCollectives(comm, large, 0, seconds); !s)
    return s;
  if (Status s = slowestRank(&comm, seconds); !s)
    return s;
  const double others = comm.size() - 1;
  // The bytes that leave this rank, as getStepWork counts them; all_reduce
  // (sync_capacity) counts its values once.
  const double scale[] = {others, others, others, 1.0};
  for (int kind = 0; kind < 4; ++kind) {
    CollectivePoint point;
    point.kind = static_cast<CollectiveKind>(kind);
    point.worldSize = point.groupSize = comm.size();
    point.transport = std::string(comm.name());
    fitCollectivePoint(double(small) * scale[kind], seconds[kind],
                       double(large) * scale[kind], seconds[4 + kind], point);
    profile.collectives.push_back(point);
  }
  return Status::ok();
}

std::string cpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      size_t colon = line.find(':');
      if (colon != std::string::npos) {
        size_t begin = line.find_first_not_of(" \t", colon + 1);
        if (begin != std::string::npos)
          return line.substr(begin);
      }
    }
  return "cpu";
}

} // namespace

Status calibrateCpu(const CalibrationOptions &options,
                    Communicator *communicator, DeviceProfile &profile) {
  DeviceProfile result;
  result.backend = "cpu";
  result.deviceName =
      options.deviceName.empty() ? cpuModelName() : options.deviceName;
  result.worldSize = communicator ? communicator->size() : 1;
  // Host communicators run their ranks on one host.
  result.ranksPerNode = result.worldSize;
  result.created = utcTimestamp();

  // GEMMs: 4 groups of [m, k] x [k, n]; M in the table counts all rows.
  struct Shape {
    int64_t m, k, n;
    DType dtype;
  };
  std::vector<Shape> shapes =
      options.quick ? std::vector<Shape>{{8, 32, 32, DType::F32},
                                         {64, 64, 64, DType::F32},
                                         {32, 64, 64, DType::BF16}}
                    : std::vector<Shape>{{16, 64, 64, DType::F32},
                                         {128, 256, 256, DType::F32},
                                         {512, 512, 512, DType::F32},
                                         {64, 128, 128, DType::BF16},
                                         {256, 512, 512, DType::BF16}};
  const double budget = options.quick ? 0.01 : 0.2;
  const int64_t groups = 4;
  std::vector<double> seconds;
  for (const Shape &s : shapes)
    seconds.push_back(timeGemm(groups, s.m, s.k, s.n, s.dtype, budget));

  // Memory: a copy reads and writes its bytes (getStepWork counts both).
  const size_t copyBytes = options.quick ? (4u << 20) : (64u << 20);
  std::vector<char> src(copyBytes, 1), dst(copyBytes);
  seconds.push_back(bestSeconds(
      [&] { std::memcpy(dst.data(), src.data(), copyBytes); }, 3, budget));
  // Launch: one kernel call on one element.
  float pre = 0.5f, out = 0;
  int32_t offset[2] = {0, 1}, rows[1] = {1};
  ExpertSegments one{offset, rows, 1};
  seconds.push_back(bestSeconds(
      [&] {
        cpu::activation({&pre, DType::F32}, {&out, DType::F32}, 1, one,
                        Activation::Relu);
      },
      20, budget / 4));
  if (Status s = slowestRank(communicator, seconds); !s)
    return s;

  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape &s = shapes[i];
    const double flops = 2.0 * groups * s.m * s.k * s.n;
    result.gemm.push_back(
        {s.m, s.n, s.k, s.dtype, false, flops / seconds[i], groups});
  }
  result.memoryBandwidth = 2.0 * copyBytes / seconds[shapes.size()];
  result.launchSeconds = seconds[shapes.size() + 1];
  // The CPU backend's exchanges block: nothing runs beside them.
  result.overlapSlowdown = 1.0;
  if (communicator && communicator->size() > 1)
    if (Status s = calibrateCollectives(*communicator, options.quick, result);
        !s)
      return s;
  profile = std::move(result);
  return Status::ok();
}

#if !FLEX_HAVE_CUDA
Status calibrateCuda(const CalibrationOptions &, DeviceProfile &) {
  return Status(StatusCode::Unavailable,
                "CUDA calibration: this build has no CUDA backend");
}

Status calibrateCuda(const CalibrationOptions &, Communicator *,
                     DeviceProfile &) {
  return Status(StatusCode::Unavailable,
                "CUDA calibration: this build has no CUDA backend");
}
#endif

} // namespace flex
