//===- CudaBackend.h - The CUDA backend of the runtime ----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the factory of the CUDA backend: plan steps as CUDA
// kernels and cuBLAS GEMMs queued on one stream, device memory from
// cudaMalloc, per-step times from CUDA events and whole passes captured as
// CUDA graphs. It needs no CUDA header: a build without CUDA still links, and
// the factory then says the backend is not built (StatusCode::Unavailable).
// docs/Runtime.md ("The CUDA backend") describes the design.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CUDA_CUDABACKEND_H
#define FLEX_RUNTIME_CUDA_CUDABACKEND_H

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/Status.h"

#include <memory>
#include <string>

namespace flex {

struct CudaBackendOptions {
  /// The device the backend runs on; -1 = the calling thread's current one.
  int device = -1;
};

/// Creates the CUDA backend with the runtime options as given (it takes
/// cuda_overlap, a2a_staging and collective_timeout_s). Unavailable when
/// this build has no CUDA or no device can be used (the message says which,
/// with the CUDA error).
Status createCudaBackend(std::unique_ptr<Backend> &backend,
                         const RuntimeOptions &runtime,
                         const CudaBackendOptions &options = {});

/// The same with the default runtime options and the environment's
/// overrides (RuntimeOptions::fromEnvironment).
inline Status createCudaBackend(std::unique_ptr<Backend> &backend,
                                const CudaBackendOptions &options = {}) {
  backend.reset();
  RuntimeOptions runtime;
  if (Status status = RuntimeOptions::fromEnvironment({}, runtime); !status)
    return status;
  return createCudaBackend(backend, runtime, options);
}

/// True when this build has the CUDA backend and a device is usable; else
/// false with the reason in *reason (when not null).
bool isCudaBackendUsable(std::string *reason = nullptr);

} // namespace flex

#endif // FLEX_RUNTIME_CUDA_CUDABACKEND_H
