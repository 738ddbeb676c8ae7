//===- CudaUnavailable.cpp - The CUDA backend's factory without CUDA ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the CUDA backend's factory for builds without CUDA
// (no nvcc found, or FLEX_ENABLE_CUDA=OFF): it reports the backend as not
// built, so callers link the same symbols either way.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Cuda/CudaBackend.h"

namespace flex {

namespace {
constexpr const char *kNotBuilt =
    "this build of Flex has no CUDA backend (no CUDA compiler was found, or "
    "FLEX_ENABLE_CUDA=OFF); rebuild with nvcc on the PATH or "
    "-DCMAKE_CUDA_COMPILER";
}

Status createCudaBackend(std::unique_ptr<Backend> &backend,
                         const RuntimeOptions &, const CudaBackendOptions &) {
  backend.reset();
  return Status(StatusCode::Unavailable, kNotBuilt);
}

bool isCudaBackendUsable(std::string *reason) {
  if (reason)
    *reason = kNotBuilt;
  return false;
}

} // namespace flex
