//===- Dispatch.cu - dispatch, combine and their backward on the GPU ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the sparse data movement of [dispatch-1] and
// [combine-1]: one warp per row, 16-byte vector accesses when the rows
// allow them (coalesced: a warp moves 512 contiguous bytes per step).
//
// Steps that write a dispatch-shaped buffer (dispatch, combine_backward) are
// row-driven: a slot map (row -> slot t * k + j, or -1) is built first, so
// each row is written exactly once, the padding rows of a static routing
// (or of any padded-layout routing, ExpertRowSpace::padded) with zeros.
// Steps that write token rows (combine, dispatch_backward) are
// token-driven (a warp per token and 512-byte chunk, so few tokens still
// fill the device) and sum the k choices in choice order in fp32, as the
// CPU.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "DependentLaunch.cuh"

namespace flex::cuda {

using detail::keptRow;
using detail::kVector;
using detail::RowSpace;

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

/// V elements of T: a 16-byte vector (V = kVector<T>) or one element.
template <typename T, int V> struct Unit {
  __device__ static void load(const T *p, float *out) {
    if constexpr (V == kVector<T>) {
      detail::loadVector(p, out);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        out[i] = detail::toFloat(p[i]);
    }
  }
  __device__ static void store(T *p, const float *in) {
    if constexpr (V == kVector<T>) {
      detail::storeVector(p, in);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        p[i] = detail::fromFloat<T>(in[i]);
    }
  }
};

/// rowMap[row of each kept slot] = slot / perEntry: the slot (1) or its
/// token (topK, dispatch_rows), for the rows below rowCount.
__global__ void slotMapKernel(Routing routing, int64_t rowCount,
                              int32_t perEntry, int32_t *__restrict__ rowMap) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (slot >= routing.tokens * routing.topK)
    return;
  int64_t row = keptRow(routing, slot);
  if (row >= 0 && row < rowCount)
    rowMap[row] = static_cast<int32_t>(slot / perEntry);
}

/// Builds rowSlot[rows] for the routing in scratch slot 1.
Status buildSlotMap(KernelContext &ctx, const Routing &routing, int64_t rows,
                    int32_t *&rowSlot) {
  void *data = nullptr;
  if (Status s = ctx.scratch(1, std::max<int64_t>(4 * rows, 4), data); !s)
    return s;
  rowSlot = static_cast<int32_t *>(data);
  if (Status s = checkCuda(cudaMemsetAsync(rowSlot, 0xff, 4 * rows,
                                           ctx.stream()),
                           "clearing the slot map");
      !s)
    return s;
  int64_t slots = routing.tokens * routing.topK;
  if (slots == 0)
    return Status::ok();
  detail::launchDependent(ctx, slotMapKernel, detail::gridFor(slots, 256), 256,
                          0, routing, rows, int32_t{1}, rowSlot);
  return checkLaunch("slot map kernel");
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    dispatchKernel(const T *__restrict__ x, int64_t width, int32_t topK,
                   const int32_t *__restrict__ rowSlot, int64_t rows,
                   const int32_t *__restrict__ rowsEnd, bool zeroUnused,
                   T *__restrict__ dispatched) {
  const int lane = threadIdx.x & 31;
  int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) +
                  threadIdx.x) >> 5;
  int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  rows = detail::usedRows(rows, rowsEnd);
  for (int64_t row = warp; row < rows; row += warps) {
    int32_t slot = rowSlot[row];
    T *target = dispatched + row * width;
    if (slot < 0) {
      if (!zeroUnused)
        continue;
      float zeros[V] = {};
      for (int64_t i = lane * V; i < width; i += 32 * V)
        Unit<T, V>::store(target + i, zeros);
      continue;
    }
    const T *source = x + (slot / topK) * width;
    if constexpr (V == kVector<T>) {
      // Same type: a plain 16-byte copy.
      for (int64_t i = lane * V; i < width; i += 32 * V)
        *reinterpret_cast<uint4 *>(target + i) =
            *reinterpret_cast<const uint4 *>(source + i);
    } else {
      for (int64_t i = lane; i < width; i += 32)
        target[i] = source[i];
    }
  }
}

/// out[t] = sum over t's kept choices j, in choice order, of (gate(t, j) x)
/// rows[row(t, j)], in fp32 as the CPU: combine (Gated) and
/// dispatch_backward. A warp takes one (token, 32 x V-element chunk) at a
/// time, so few tokens still fill the device, and reads the k choices' rows
/// and gates once per chunk, lane j holding choice j, instead of once per
/// vector step (each is two dependent reads: location, then the expert's
/// offset); the rows' loads of the unrolled choices then overlap.
template <typename T, int V, bool Gated>
__global__ void __launch_bounds__(kThreads)
    sumChoicesKernel(const T *__restrict__ rows, int64_t width, Routing routing,
                     T *__restrict__ out) {
  detail::waitForPrerequisiteGrids();
  detail::allowDependentGrids();
  const int lane = threadIdx.x & 31;
  int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) +
                  threadIdx.x) >> 5;
  int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int32_t k = static_cast<int32_t>(routing.topK);
  const int64_t span = 32 * V;
  const int64_t chunks = (width + span - 1) / span;
  auto choice = [&](int64_t t, int32_t j, int64_t &row, float &gate) {
    row = keptRow(routing, t * k + j);
    gate = Gated && row >= 0 ? routing.gates[t * k + j] : 0.0f;
  };
  for (int64_t item = warp; item < routing.tokens * chunks; item += warps) {
    const int64_t t = item / chunks;
    const int64_t i = (item % chunks) * span + lane * V;
    int64_t laneRow = -1;
    float laneGate = 0.0f;
    if (lane < k)
      choice(t, lane, laneRow, laneGate);
    float sum[V] = {};
#pragma unroll 4
    for (int32_t j = 0; j < k; ++j) {
      int64_t row;
      float gate;
      if (j < 32) {
        row = __shfl_sync(0xffffffffu, laneRow, j);
        gate = __shfl_sync(0xffffffffu, laneGate, j);
      } else {
        choice(t, j, row, gate);
      }
      if (row < 0 || i >= width)
        continue;
      float values[V];
      Unit<T, V>::load(rows + row * width + i, values);
#pragma unroll
      for (int v = 0; v < V; ++v)
        sum[v] = Gated ? __fadd_rn(sum[v], __fmul_rn(gate, values[v]))
                       : __fadd_rn(sum[v], values[v]);
    }
    if (i < width)
      Unit<T, V>::store(out + t * width + i, sum);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    combineBackwardKernel(const T *__restrict__ gradOut,
                          const T *__restrict__ expertOut, int64_t width,
                          const float *__restrict__ gates, int32_t topK,
                          const int32_t *__restrict__ rowSlot, int64_t rows,
                          const int32_t *__restrict__ rowsEnd,
                          bool zeroUnused, T *__restrict__ gradExpertOut,
                          float *__restrict__ gradGates) {
  const int lane = threadIdx.x & 31;
  int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) +
                  threadIdx.x) >> 5;
  int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  rows = detail::usedRows(rows, rowsEnd);
  for (int64_t row = warp; row < rows; row += warps) {
    int32_t slot = rowSlot[row];
    T *target = gradExpertOut + row * width;
    if (slot < 0) {
      if (!zeroUnused)
        continue;
      float zeros[V] = {};
      for (int64_t i = lane * V; i < width; i += 32 * V)
        Unit<T, V>::store(target + i, zeros);
      continue;
    }
    const T *grad = gradOut + (slot / topK) * width;
    const T *values = expertOut + row * width;
    float gate = gates[slot];
    // The dot product in fp64, as the CPU kernel (cancellation).
    double dot = 0.0;
    for (int64_t i = lane * V; i < width; i += 32 * V) {
      float g[V], e[V], scaled[V];
      Unit<T, V>::load(grad + i, g);
      Unit<T, V>::load(values + i, e);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(g[v]),
                                       static_cast<double>(e[v])));
        scaled[v] = __fmul_rn(gate, g[v]);
      }
      Unit<T, V>::store(target + i, scaled);
    }
    for (int offset = 16; offset > 0; offset >>= 1)
      dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (lane == 0)
      gradGates[slot] = static_cast<float>(dot);
  }
}

/// Blocks for `items` independent warp-sized items, at most 16 blocks per
/// multiprocessor (the rest grid-stride).
unsigned warpGrid(KernelContext &ctx, int64_t items) {
  int64_t cap = static_cast<int64_t>(ctx.multiprocessors()) * 16;
  return detail::gridFor(items, kWarpsPerBlock, std::max<int64_t>(cap, 1));
}

Status sameType(DType a, DType b, const char *what) {
  if (a == b)
    return Status::ok();
  return Status(StatusCode::Unavailable,
                std::string(what) + " on CUDA needs operands of one dtype; got " +
                    std::string(toString(a)) + " and " +
                    std::string(toString(b)));
}

/// Launches sumChoicesKernel over the routing's tokens.
template <bool Gated>
Status sumChoices(KernelContext &ctx, ReadBuffer rows, int64_t width,
                  const Routing &routing, WriteBuffer out, const char *what) {
  if (routing.tokens == 0)
    return Status::ok();
  return detail::withType(out.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(width, sizeof(T), {rows.data, out.data});
    auto launch = [&](auto kernel, int64_t span) {
      int64_t chunks = (width + span - 1) / span;
      detail::launchDependent(ctx, kernel,
                              warpGrid(ctx, routing.tokens * chunks), kThreads,
                              0, static_cast<const T *>(rows.data), width,
                              routing, static_cast<T *>(out.data));
    };
    if (vector)
      launch(sumChoicesKernel<T, kVector<T>, Gated>, 32 * kVector<T>);
    else
      launch(sumChoicesKernel<T, 1, Gated>, 32);
    return checkLaunch(what);
  });
}

/// offsets[E] on the device for a dynamic row space (usedRows), else null.
const int32_t *segmentsEnd(const ExpertRowSpace &space) {
  return space.isStatic() || !space.offsets ? nullptr
                                            : space.offsets + space.experts;
}

} // namespace

Status dispatch(KernelContext &ctx, ReadBuffer x, int64_t modelDim,
                const Routing &routing, const ExpertRowSpace &space,
                WriteBuffer dispatched) {
  if (Status s = sameType(x.type, dispatched.type, "dispatch"); !s)
    return s;
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0)
    return Status::ok();
  int32_t *rowSlot = nullptr;
  if (Status s = buildSlotMap(ctx, routing, rows, rowSlot); !s)
    return s;
  return detail::withType(x.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(modelDim, sizeof(T),
                                       {x.data, dispatched.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(x.data), modelDim,
          static_cast<int32_t>(routing.topK), rowSlot, rows,
          segmentsEnd(space), space.isStatic() || space.padded,
          static_cast<T *>(dispatched.data));
    };
    if (vector)
      launch(dispatchKernel<T, kVector<T>>);
    else
      launch(dispatchKernel<T, 1>);
    return checkLaunch("dispatch kernel");
  });
}

Status dispatchRows(KernelContext &ctx, const Routing &routing,
                    int64_t rowCount, bool padded, int32_t *rowTokens) {
  if (rowCount == 0)
    return Status::ok();
  // A padded layout's padding rows, which no slot maps to, read as zeros.
  // A ragged layout has none: its rows up to offsets[E] are all kept, and no
  // kernel reads past them. (An aligned layout's rows between experts keep
  // stale entries: only its GEMMs' blocks read those rows, into rows no step
  // reads, and gatherRows bounds every token it reads.)
  if (padded)
    if (Status s = checkCuda(
            cudaMemsetAsync(rowTokens, 0xff, 4 * rowCount, ctx.stream()),
            "clearing row_tokens");
        !s)
      return s;
  int64_t slots = routing.tokens * routing.topK;
  if (slots == 0)
    return Status::ok();
  detail::launchDependent(ctx, slotMapKernel, detail::gridFor(slots, 256), 256,
                          0, routing, rowCount,
                          static_cast<int32_t>(routing.topK), rowTokens);
  return checkLaunch("dispatch_rows kernel");
}

Status combine(KernelContext &ctx, ReadBuffer expertOut, int64_t modelDim,
               const Routing &routing, WriteBuffer out) {
  if (Status s = sameType(expertOut.type, out.type, "combine"); !s)
    return s;
  return sumChoices<true>(ctx, expertOut, modelDim, routing, out,
                          "combine kernel");
}

Status dispatchBackward(KernelContext &ctx, ReadBuffer gradDispatched,
                        int64_t modelDim, const Routing &routing,
                        WriteBuffer gradX) {
  if (Status s = sameType(gradDispatched.type, gradX.type,
                          "dispatch_backward");
      !s)
    return s;
  return sumChoices<false>(ctx, gradDispatched, modelDim, routing, gradX,
                           "dispatch backward kernel");
}

Status combineBackward(KernelContext &ctx, ReadBuffer gradOut,
                       ReadBuffer expertOut, int64_t modelDim,
                       const Routing &routing, const ExpertRowSpace &space,
                       WriteBuffer gradExpertOut, float *gradGates) {
  if (Status s = sameType(gradOut.type, expertOut.type, "combine_backward");
      !s)
    return s;
  if (Status s = sameType(gradOut.type, gradExpertOut.type,
                          "combine_backward");
      !s)
    return s;
  int64_t slots = routing.tokens * routing.topK;
  // Dropped slots get 0; kept ones are written by their row below.
  if (slots > 0)
    if (Status s = checkCuda(cudaMemsetAsync(gradGates, 0, 4 * slots,
                                             ctx.stream()),
                             "clearing grad_gates");
        !s)
      return s;
  int64_t rows = RowSpace::launchRows(space);
  if (rows == 0)
    return Status::ok();
  int32_t *rowSlot = nullptr;
  if (Status s = buildSlotMap(ctx, routing, rows, rowSlot); !s)
    return s;
  return detail::withType(gradOut.type, [&](auto tag) -> Status {
    using T = decltype(tag);
    bool vector = detail::vectorizable(
        modelDim, sizeof(T),
        {gradOut.data, expertOut.data, gradExpertOut.data});
    auto launch = [&](auto kernel) {
      kernel<<<warpGrid(ctx, rows), kThreads, 0, ctx.stream()>>>(
          static_cast<const T *>(gradOut.data),
          static_cast<const T *>(expertOut.data), modelDim, routing.gates,
          static_cast<int32_t>(routing.topK), rowSlot, rows,
          segmentsEnd(space), space.isStatic() || space.padded,
          static_cast<T *>(gradExpertOut.data), gradGates);
    };
    if (vector)
      launch(combineBackwardKernel<T, kVector<T>>);
    else
      launch(combineBackwardKernel<T, 1>);
    return checkLaunch("combine backward kernel");
  });
}

} // namespace flex::cuda
