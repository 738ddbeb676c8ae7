//===- CudaTestSupport.h - Device buffers for the CUDA tests ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines what the CUDA tests share: the skip when no device is
// usable, device buffers filled from and read back to host vectors, and
// typed conversions of host values.
//
//===----------------------------------------------------------------------===//

#ifndef UNITTESTS_CUDA_CUDATESTSUPPORT_H
#define UNITTESTS_CUDA_CUDATESTSUPPORT_H

#include "MultiRankTestSupport.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Cuda/CudaBackend.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace flex::cudatest {

#define FLEX_SKIP_WITHOUT_CUDA()                                               \
  do {                                                                         \
    std::string reason;                                                        \
    if (!::flex::isCudaBackendUsable(&reason))                                 \
      GTEST_SKIP() << "no CUDA device: " << reason;                            \
  } while (0)

// Host element conversions, shared with the CPU tests.
using test::loadValue;
using test::storeValue;

/// `count` draws of N(0, scale^2).
inline std::vector<double> normals(std::mt19937_64 &rng, int64_t count,
                                   double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> values(static_cast<size_t>(count));
  for (double &v : values)
    v = dist(rng);
  return values;
}

/// A typed buffer with a host copy and a device copy.
struct Buffer {
  DType type = DType::F32;
  size_t count = 0;
  std::vector<uint8_t> host;
  void *device = nullptr;

  Buffer() = default;
  Buffer(DType type, size_t count) : type(type), count(count) {
    host.assign(count * dtypeSize(type), 0);
    EXPECT_EQ(cudaMalloc(&device, std::max<size_t>(host.size(), 1)),
              cudaSuccess);
  }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  Buffer(Buffer &&other) noexcept { *this = std::move(other); }
  Buffer &operator=(Buffer &&other) noexcept {
    std::swap(type, other.type);
    std::swap(count, other.count);
    std::swap(host, other.host);
    std::swap(device, other.device);
    return *this;
  }
  ~Buffer() {
    if (device)
      cudaFree(device);
  }

  void set(const std::vector<double> &values) {
    for (size_t i = 0; i < values.size() && i < count; ++i)
      storeValue(host, type, i, values[i]);
    upload();
  }
  /// All bits set: NaN in f32, bf16 and f16, -1 in i32.
  void poison() {
    std::fill(host.begin(), host.end(), 0xff);
    upload();
  }
  void upload() {
    EXPECT_EQ(
        cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice),
        cudaSuccess);
  }
  /// Device to host (waits for the device).
  void download() {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(
        cudaMemcpy(host.data(), device, host.size(), cudaMemcpyDeviceToHost),
        cudaSuccess);
  }
  double at(size_t i) const { return loadValue(host, type, i); }
  template <typename T> T *as() { return static_cast<T *>(device); }
  template <typename T> T *hostAs() {
    return reinterpret_cast<T *>(host.data());
  }
};

/// The CPU gate's outputs for `logits` [T, E]: the reference the CUDA gate
/// tests compare with.
struct CpuGateResult {
  std::vector<float> scores, gates;
  std::vector<int32_t> indices, locations, offsets, rows;
  int32_t capacity = 0;
  float lAux = 0;

  CpuGateResult(const float *logits, int64_t T, int64_t E, int64_t k,
                const GateAttrs &attrs)
      : scores(T * E), gates(T * k), indices(T * k), locations(T * k),
        offsets(E + 1), rows(E) {
    cpu::gate(logits, T, E, attrs,
              {scores.data(), indices.data(), locations.data(), gates.data(),
               &capacity, offsets.data(), rows.data(), &lAux});
  }
};

} // namespace flex::cudatest

#endif // UNITTESTS_CUDA_CUDATESTSUPPORT_H
