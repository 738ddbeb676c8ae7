//===- DependentLaunch.cuh - Programmatic dependent launches -----*- CUDA
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines programmatic dependent launches (sm_90): a kernel
// launched with launchDependent may start - its CTAs placed, its prologue
// run - while the kernel before it on the stream still finishes, and waits
// for that kernel's completion and memory at waitForPrerequisiteGrids. At
// decode sizes a layer is a chain of short kernels (router, gate, slot map,
// two GEMMs, combine), and each one's launch and ramp-up sits on the
// critical path after the one before it drains.
//
// The contract, for every kernel launched with launchDependent: it calls
// waitForPrerequisiteGrids() before it reads or writes any global memory
// (in every thread that does, and at least once in every CTA, so that the
// grid cannot complete before the one it depends on), then
// allowDependentGrids() so that the next kernel may launch. A kernel that
// calls neither may not be launched with it. Below sm_90, where the
// context's dependentLaunches is off, and for a kernel whose image was
// compiled for an older architecture (JIT from its PTX: the calls compiled
// out), launchDependent is a plain launch and both calls do nothing.
//
// Inputs the previous kernel writes should not be `const __restrict__`
// where the compiler could hoist their loads (ld.global.nc) above the
// wait; the converted kernels' PTX has every global access after it
// (checked with nvcc -ptx for compute_90 when they were converted).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_DEPENDENTLAUNCH_CUH
#define LIB_RUNTIME_CUDA_DEPENDENTLAUNCH_CUH

#include "flex/Runtime/Cuda/CudaKernels.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace flex::cuda::detail {

/// Waits until the grids this one depends on have completed and their
/// memory operations are visible (griddepcontrol.wait; returns at once for
/// a plain launch).
__device__ __forceinline__ void waitForPrerequisiteGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/// Lets the next kernel on the stream launch once every CTA of this grid
/// has called it or exited (griddepcontrol.launch_dependents).
__device__ __forceinline__ void allowDependentGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/// Whether the image the current device runs of `kernel` was compiled for
/// sm_90 or later (cudaFuncAttributes::ptxVersion): one JIT-compiled from
/// older PTX has no griddepcontrol.wait, and launching it as a dependent
/// would let it read what the kernel before it still writes. Asked once per
/// device and kernel; a failed query is not kept (its error stays pending
/// for the launch's check).
inline bool waitsForPrerequisites(const void *kernel) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess)
    return false;
  static std::mutex mutex;
  static std::map<std::pair<int, const void *>, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  if (auto found = known.find(key); found != known.end())
    return found->second;
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess)
    return false;
  return known[key] = attributes.ptxVersion >= 90;
}

/// The launch attribute of a programmatic dependent launch of `kernel`, in
/// `attribute`; false where the context does not use them or the kernel's
/// image cannot wait.
inline bool dependentLaunchAttribute(const KernelContext &ctx,
                                     const void *kernel,
                                     cudaLaunchAttribute &attribute) {
  if (!ctx.dependentLaunches || ctx.computeCapability() < 90 ||
      !waitsForPrerequisites(kernel))
    return false;
  attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return true;
}

/// kernel<<<grid, block, bytes, ctx.stream()>>>(args...), as a programmatic
/// dependent launch where ctx.dependentLaunches (the file comment's
/// contract). A failed launch is reported by cudaGetLastError, as with <<<>>>.
template <typename... Params, typename... Args>
void launchDependent(const KernelContext &ctx, void (*kernel)(Params...),
                     dim3 grid, dim3 block, size_t bytes, Args &&...args) {
  cudaLaunchAttribute attribute;
  if (!dependentLaunchAttribute(ctx, reinterpret_cast<const void *>(kernel),
                                attribute)) {
    kernel<<<grid, block, bytes, ctx.stream()>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = bytes;
  config.stream = static_cast<cudaStream_t>(ctx.stream());
  config.attrs = &attribute;
  config.numAttrs = 1;
  // (Its error is also the thread's last error, which checkLaunch reads.)
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_DEPENDENTLAUNCH_CUH
