//===- GroupTiles.cuh - Expert groups' rows and M tiles on the device -*- CUDA
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// What a device-sized grouped GEMM reads of a row space on the device: each
// group's first row and rows, and which group's M tiles hold a given tile.
// HopperGemmKernel.cuh's wgmma kernels call it; DeviceGroupedGemm.cu's
// mma.sync kernel keeps an inlined copy of the same rules (its comment says
// why: registers). CUDA headers only.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_GROUPTILES_CUH
#define LIB_RUNTIME_CUDA_GROUPTILES_CUH

#include <cstdint>

namespace flex::cuda::detail {

/// Group g's first row: a static row space's g * C (no device counts), else
/// the device's offset.
__device__ __forceinline__ int64_t groupFirst(const int32_t *offsets,
                                              int64_t staticCapacity,
                                              int64_t g) {
  return staticCapacity >= 0 ? g * staticCapacity : offsets[g];
}

/// Group g's rows as the kernels use them: C for a static row space, else
/// the device count, clamped to the buffer's declared rows, so inconsistent
/// counts never reach past it.
__device__ __forceinline__ int64_t groupRows(const int32_t *offsets,
                                             const int32_t *rows,
                                             int64_t staticCapacity, int64_t g,
                                             int64_t rowBound) {
  const bool dynamic = staticCapacity < 0;
  const int64_t first = dynamic ? offsets[g] : g * staticCapacity;
  const int64_t count = dynamic ? rows[g] : staticCapacity;
  if (first < 0 || count <= 0)
    return 0;
  return min(count, max(rowBound - first, int64_t{0}));
}

/// The group whose M tiles hold `tile` (every group's rows in tiles of
/// TileRows, the groups in order), by one warp-wide scan of the groups'
/// tile counts, and in firstTile the index of that group's first tile; -1
/// past the last tile. Every lane of the warp calls it (no barrier).
template <int TileRows>
__device__ __forceinline__ int32_t findGroupTile(
    const int32_t *offsets, const int32_t *rows, int64_t staticCapacity,
    int32_t groups, int64_t rowBound, int64_t tile, int64_t &firstTile) {
  const int lane = threadIdx.x % 32;
  int32_t group = -1;
  int64_t seen = 0;
  for (int32_t base = 0; base < groups; base += 32) {
    int32_t g = base + lane;
    int64_t count =
        g < groups ? groupRows(offsets, rows, staticCapacity, g, rowBound) : 0;
    count = (count + TileRows - 1) / TileRows;
    int64_t inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      int64_t other = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d)
        inclusive += other;
    }
    int64_t total = __shfl_sync(0xffffffffu, inclusive, 31);
    if (tile < seen + total) {
      unsigned hit = __ballot_sync(0xffffffffu, seen + inclusive > tile);
      int first = __ffs(hit) - 1;
      group = base + first;
      firstTile = seen + __shfl_sync(0xffffffffu, inclusive - count, first);
      break;
    }
    seen += total;
  }
  return group;
}

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_GROUPTILES_CUH
