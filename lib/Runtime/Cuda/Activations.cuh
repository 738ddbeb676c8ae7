//===- Activations.cuh - The activations' device formulas -------*- CUDA
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The activations and their derivatives as every CUDA kernel computes them:
// the CPU kernels' formulas in fp32 (IEEE division, no fast math), so a
// fused epilogue and the epilogue pass give the same bits. CUDA headers
// only: the wgmma kernels (HopperGemmKernel.cuh) include it too.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_ACTIVATIONS_CUH
#define LIB_RUNTIME_CUDA_ACTIVATIONS_CUH

#include <cuda_runtime.h>

namespace flex::cuda::detail {

__device__ __forceinline__ float reluForward(float v) {
  return v > 0.0f || v != v ? v : 0.0f;
}
__device__ __forceinline__ float reluDerivative(float v) {
  return v > 0.0f ? 1.0f : 0.0f;
}
__device__ __forceinline__ float geluForward(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}
__device__ __forceinline__ float geluDerivative(float v) {
  float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
  float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
  return cdf + v * pdf;
}
__device__ __forceinline__ float sigmoid(float v) {
  return 1.0f / (1.0f + expf(-v));
}
__device__ __forceinline__ float siluForward(float v) { return v * sigmoid(v); }
__device__ __forceinline__ float siluDerivative(float v) {
  float s = sigmoid(v);
  return s * (1.0f + v * (1.0f - s));
}

__device__ __forceinline__ float applyEpilogue(int epilogue, float v) {
  switch (epilogue) {
  case 1:
    return reluForward(v);
  case 2:
    return geluForward(v);
  case 3:
    return siluForward(v);
  default:
    return v;
  }
}

__device__ __forceinline__ float activationDerivative(int act, float v) {
  switch (act) {
  case 0:
    return reluDerivative(v);
  case 1:
    return geluDerivative(v);
  default:
    return siluDerivative(v);
  }
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_ACTIVATIONS_CUH
