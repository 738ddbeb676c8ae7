//===- CudaBenchSupport.h - What the CUDA benchmark tools share -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The pieces flex-gate-bench and flex-gemm-bench share: a CUDA call that
// must succeed (the tool stops with exit 2 naming the call's place), and the
// median of timings, and NVTX ranges naming what is timed.
//
//===----------------------------------------------------------------------===//

#ifndef TOOLS_BENCHSUPPORT_CUDABENCHSUPPORT_H
#define TOOLS_BENCHSUPPORT_CUDABENCHSUPPORT_H

#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define FLEX_BENCH_CHECK(call)                                                 \
  do {                                                                         \
    cudaError_t err_ = (call);                                                 \
    if (err_ != cudaSuccess) {                                                 \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__,                  \
                   cudaGetErrorString(err_));                                  \
      std::exit(2);                                                            \
    }                                                                          \
  } while (0)

namespace flex::bench {

/// The median of `values` (0 when empty).
inline double median(std::vector<double> values) {
  if (values.empty())
    return 0.0;
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// An NVTX range around one timed configuration, so a profiler can pick it
/// out of the run (ncu --nvtx --nvtx-include "c3.fc1.batched/").
class ProfileRange {
public:
  explicit ProfileRange(const std::string &name) {
    nvtxRangePushA(name.c_str());
  }
  ~ProfileRange() { nvtxRangePop(); }
  ProfileRange(const ProfileRange &) = delete;
  ProfileRange &operator=(const ProfileRange &) = delete;
};

} // namespace flex::bench

#endif // TOOLS_BENCHSUPPORT_CUDABENCHSUPPORT_H
