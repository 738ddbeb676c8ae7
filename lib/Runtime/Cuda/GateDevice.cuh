//===- GateDevice.cuh - Device pieces the gate kernels share ----*- CUDA
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines what Gate.cu and GateFewTokens.cu share on the device:
// the CPU's gate noise and expf operation for operation, the CPU's ranking
// of logits, the [loc-1] chunk size and the [cap-1] parameters. Each
// including file gets its own copies (anonymous namespace; no relocatable
// device code).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_GATEDEVICE_CUH
#define LIB_RUNTIME_CUDA_GATEDEVICE_CUH

#include "CudaSupport.cuh"

namespace flex::cuda {
namespace {

/// Pairs of the [loc-1] sequence per location chunk.
constexpr int kLocationChunk = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The CPU gateNoiseSample (Cpu/CpuKernels.h), operation for operation.
__device__ double noiseSample(uint64_t seed, int64_t token, int64_t expert) {
  uint64_t cell = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ull +
                  static_cast<uint64_t>(expert);
  uint64_t h = splitmix64(seed ^ splitmix64(cell));
  constexpr double kTwoPow53 = 0x1p-53;
  double u1 =
      __dmul_rn(static_cast<double>(splitmix64(h) >> 11) + 0.5, kTwoPow53);
  double u2 =
      __dmul_rn(static_cast<double>(splitmix64(h + 1) >> 11) + 0.5, kTwoPow53);
  return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))),
                   cos(__dmul_rn(6.283185307179586476925, u2)));
}

/// 2^(i/32) as doubles, minus i << 47: the table of the exp2f/expf
/// algorithm of ARM's optimized-routines that glibc ships as expf.
__constant__ uint64_t kExp2Table[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f,
    0x3fef9301d0125b51, 0x3fef72b83c7d517b, 0x3fef54873168b9aa,
    0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74,
    0x3feea11473eb0187, 0x3feea589994cce13, 0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c,
    0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};

/// expf as the CPU kernel's std::exp computes it: glibc's expf in its FMA
/// build (x86-64 hosts with FMA select it), operation for operation. It is
/// not correctly rounded (about 1 result in 10^6 differs from exp in fp64
/// rounded once), and the gate needs the CPU's bits: the batch-prioritized
/// order compares scores across tokens. Checked on the host against glibc on
/// 5 * 10^7 arguments: no difference. `table(i)` reads kExp2Table[i] (from
/// constant memory, or from a shared copy where lanes index it divergently).
template <typename Table>
__device__ __forceinline__ float glibcExpfWith(float x, Table table) {
  const uint32_t bits = __float_as_uint(x);
  const uint32_t abstop = (bits >> 20) & 0x7ff;
  if (abstop >= (__float_as_uint(88.0f) >> 20)) {
    if (bits == __float_as_uint(-INFINITY))
      return 0.0f;
    if (abstop >= (__float_as_uint(INFINITY) >> 20))
      return x + x;
    if (x > 0x1.62e42ep6f)
      return INFINITY;
    if (x < -0x1.9fe368p6f)
      return 0.0f;
  }
  constexpr double kInvLn2N = 0x1.71547652b82fep+0 * 32, kShift = 0x1.8p+52;
  constexpr double c0 = 0x1.c6af84b912394p-5 / 32 / 32 / 32;
  constexpr double c1 = 0x1.ebfce50fac4f3p-3 / 32 / 32;
  constexpr double c2 = 0x1.62e42ff0c52d6p-1 / 32;
  const double xd = static_cast<double>(x);
  double kd = __fma_rn(kInvLn2N, xd, kShift);
  const uint64_t ki = static_cast<uint64_t>(__double_as_longlong(kd));
  kd = __dsub_rn(kd, kShift);
  const double r = __fma_rn(kInvLn2N, xd, -kd);
  const double s = __longlong_as_double(static_cast<long long>(
      table(static_cast<uint32_t>(ki % 32)) + (ki << 47)));
  const double z = __fma_rn(c0, r, c1);
  const double r2 = __dmul_rn(r, r);
  double y = __fma_rn(c2, r, 1.0);
  y = __fma_rn(z, r2, y);
  return static_cast<float>(__dmul_rn(y, s));
}

struct ConstantExp2Table {
  __device__ __forceinline__ uint64_t operator()(uint32_t i) const {
    return kExp2Table[i];
  }
};

struct SharedExp2Table {
  const uint64_t *values;
  __device__ __forceinline__ uint64_t operator()(uint32_t i) const {
    return values[i];
  }
};

__device__ float glibcExpf(float x) {
  return glibcExpfWith(x, ConstantExp2Table{});
}

/// ranksAbove of the CPU kernel: NaN loses to every number.
__device__ __forceinline__ bool ranksAbove(float a, float b) {
  if (isnan(a))
    return false;
  return isnan(b) || a > b;
}

struct CapacityParams {
  CapacityMode mode;
  double factor;
  int64_t tokens;
  int32_t experts;
  int32_t k;
  int64_t alignment;
  bool padded;
  /// What a ragged expert's first row is a multiple of: 1, or
  /// kAlignedLayoutRows for the aligned layout (each expert's rows rounded up
  /// in the offsets' scan).
  int32_t rowAlign;

  __device__ __forceinline__ int64_t alignRows(int64_t rows) const {
    return (rows + rowAlign - 1) / rowAlign * rowAlign;
  }
};

} // namespace
} // namespace flex::cuda

#endif // LIB_RUNTIME_CUDA_GATEDEVICE_CUH
