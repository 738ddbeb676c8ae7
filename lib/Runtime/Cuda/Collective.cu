//===- Collective.cu - The device side of the collective steps ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the kernels the collective steps need around the
// communicator: the expert offsets of sync_capacity and uniform_segments
// (computed from the capacity where it lives, on the device) and the
// pack/unpack of all_to_all rows between a layout and the per-peer staging
// blocks, the same mapping as AllToAllLayout::pack/unpack on the CPU.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

namespace flex::cuda {

namespace {

__global__ void capacityOffsetsKernel(const int32_t *__restrict__ capacity,
                                      int64_t experts,
                                      int32_t *__restrict__ offsets) {
  int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e <= experts)
    offsets[e] = static_cast<int32_t>(e * *capacity);
}

__global__ void uniformSegmentsKernel(const int32_t *__restrict__ capacity,
                                      int64_t groups, int64_t ranks,
                                      int64_t chunks, int64_t chunk,
                                      int32_t *__restrict__ offsets,
                                      int32_t *__restrict__ rows) {
  int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t n = ranks * (*capacity / chunks);
  if (g <= groups)
    offsets[g] = static_cast<int32_t>(chunk * groups * n + g * n);
  if (g < groups)
    rows[g] = static_cast<int32_t>(n);
}

/// One thread per unit U (16 or 1 bytes) of the staging buffer: unit u is
/// in run (p, l) = (run / L, run % L), whose rows start at the layout row
/// of (p, l).
template <typename U>
__global__ void allToAllCopyKernel(U *layoutBuffer, U *staging,
                                   int64_t runUnits, int64_t totalUnits,
                                   int64_t rowUnits, AllToAllShape shape,
                                   bool dispatchLayout, bool pack) {
  const int64_t L = shape.localExperts, W = shape.ranks;
  const int64_t Cq = shape.capacity / shape.chunks, q = shape.chunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       u < totalUnits; u += stride) {
    const int64_t run = u / runUnits, within = u - run * runUnits;
    const int64_t peer = run / L, local = run - peer * L;
    const int64_t row = dispatchLayout
                            ? (peer * L + local) * shape.capacity + q * Cq
                            : ((q * L + local) * W + peer) * Cq;
    U *at = layoutBuffer + row * rowUnits + within;
    if (pack)
      staging[u] = *at;
    else
      *at = staging[u];
  }
}

} // namespace

Status writeCapacityOffsets(KernelContext &ctx, const int32_t *capacity,
                            int64_t experts, int32_t *offsets) {
  capacityOffsetsKernel<<<detail::gridFor(experts + 1, 256), 256, 0,
                          ctx.stream()>>>(capacity, experts, offsets);
  return checkLaunch("sync_capacity offsets kernel");
}

Status uniformSegments(KernelContext &ctx, const int32_t *capacity,
                       int64_t groups, int64_t ranks, int64_t chunks,
                       int64_t chunk, int32_t *offsets, int32_t *rows) {
  if (chunks < 1)
    return Status(StatusCode::Internal, "uniform_segments: chunks < 1");
  uniformSegmentsKernel<<<detail::gridFor(groups + 1, 256), 256, 0,
                          ctx.stream()>>>(capacity, groups, ranks, chunks,
                                          chunk, offsets, rows);
  return checkLaunch("uniform_segments kernel");
}

Status allToAllCopy(KernelContext &ctx, const AllToAllShape &shape,
                    bool dispatchLayout, bool pack, void *layoutBuffer,
                    void *staging, int64_t rowBytes) {
  const int64_t Cq = shape.capacity / shape.chunks;
  const int64_t runBytes = Cq * rowBytes;
  const int64_t totalBytes = shape.ranks * shape.localExperts * runBytes;
  if (totalBytes == 0)
    return Status::ok();
  const int64_t cap = static_cast<int64_t>(ctx.multiprocessors()) * 8;
  auto launch = [&](auto unit) {
    using U = decltype(unit);
    const int64_t size = sizeof(U);
    const int64_t total = totalBytes / size;
    allToAllCopyKernel<U><<<detail::gridFor(total, 256, cap), 256, 0,
                            ctx.stream()>>>(
        static_cast<U *>(layoutBuffer), static_cast<U *>(staging),
        runBytes / size, total, rowBytes / size, shape, dispatchLayout, pack);
  };
  if (detail::vectorizable(rowBytes, 1, {layoutBuffer, staging}))
    launch(uint4{});
  else
    launch(uint8_t{});
  return checkLaunch(pack ? "all_to_all pack kernel"
                          : "all_to_all unpack kernel");
}

} // namespace flex::cuda
