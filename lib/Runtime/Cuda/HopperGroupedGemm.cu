//===- HopperGroupedGemm.cu - The wgmma grouped GEMM's runtime side -------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs HopperGemmKernel.cuh's ragged-M kernel for the runtime:
// whether this device and build have it, the tensor maps of one call, and
// the launch. It is compiled for sm_90a alone (lib/Runtime/Cuda's
// CMakeLists.txt): wgmma and setmaxnreg exist only there, and a device of
// another compute capability never launches it.
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"
#include "GroupedGemmInternal.h"
#include "HopperGemmKernel.cuh"
#include "HopperWgradKernel.cuh"

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string_view>

namespace flex::cuda::detail {

namespace {

/// Whether the sm_90a kernels load on the current device (this part is
/// built for sm_90a alone: on any other device they have no image).
bool hopperKernelBuilt() {
  static const bool built = [] {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(
            &attributes,
            hopper::raggedMKernel<__nv_bfloat16, 128, 5, false, false>) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attributes.binaryVersion == 90;
  }();
  return built;
}

template <typename T, int BN, int Stages, bool BKMajor, bool PingPong,
          bool Glu = false, bool Gather = false, int Cluster = 1,
          hopper::StoreMode Store = hopper::StoreMode::Plain, int Act = 0,
          bool Combine = false, bool DirectStore = false>
Status launch(KernelContext &ctx, const CUtensorMap &mapA,
              const CUtensorMap &mapB, const hopper::RaggedMParams &params,
              const CUtensorMap *mapUp = nullptr) {
  return checkCuda(
      hopper::launchRaggedM<T, BN, Stages, BKMajor, PingPong, Glu, Gather,
                            Cluster, Store, Act, Combine, DirectStore>(
          mapA, mapB, mapUp ? *mapUp : mapB, params, ctx.multiprocessors(),
          ctx.stream(), ctx.dependentLaunches && ctx.computeCapability() >= 90),
      "grouped GEMM kernel (wgmma)");
}

/// Measurement knobs of the wgmma forward (flex-gemm-bench compares them on
/// one card): FLEX_WGMMA_STORE=direct stores the plain 128 x 256 tiles
/// straight from the accumulators instead of staging them (stagedStore),
/// FLEX_WGMMA_RASTER=N walks raster bands of N M tiles (kRasterM).
bool directStoreAsked() {
  static const bool asked = [] {
    const char *v = std::getenv("FLEX_WGMMA_STORE");
    return v && std::string_view(v) == "direct";
  }();
  return asked;
}
int32_t rasterBand() {
  static const int32_t band = [] {
    const char *v = std::getenv("FLEX_WGMMA_RASTER");
    const long n = v ? std::strtol(v, nullptr, 10) : 0;
    return n >= 1 && n <= 1024 ? static_cast<int32_t>(n) : hopper::kRasterM;
  }();
  return band;
}

/// f(std::integral_constant<int, e>) for the epilogue e (Epilogue's value):
/// a fused store's activation is a template argument.
template <typename F> Status withEpilogue(Epilogue e, F &&f) {
  switch (e) {
  case Epilogue::Relu:
    return f(std::integral_constant<int, int(Epilogue::Relu)>{});
  case Epilogue::Gelu:
    return f(std::integral_constant<int, int(Epilogue::Gelu)>{});
  case Epilogue::Silu:
    return f(std::integral_constant<int, int(Epilogue::Silu)>{});
  default:
    return f(std::integral_constant<int, int(Epilogue::None)>{});
  }
}
/// Likewise for an activation's backward (Activation's value).
template <typename F> Status withActivation(Activation a, F &&f) {
  switch (a) {
  case Activation::Relu:
    return f(std::integral_constant<int, int(Activation::Relu)>{});
  case Activation::Gelu:
    return f(std::integral_constant<int, int(Activation::Gelu)>{});
  default:
    return f(std::integral_constant<int, int(Activation::Silu)>{});
  }
}

} // namespace

bool hopperGroupedGemmRuns(const KernelContext &ctx, std::string *reason) {
  auto refuse = [&](const char *why) {
    if (reason)
      *reason = why;
    return false;
  };
  if (!ctx.wgmma)
    return refuse("the wgmma grouped GEMM is switched off (wgmma=0, "
                  "FLEX_WGMMA=0)");
  if (ctx.computeCapability() != 90)
    return refuse("the wgmma grouped GEMM needs compute capability 9.0");
  if (!hopperKernelBuilt())
    return refuse("this build has no sm_90a code for the wgmma grouped GEMM");
  if (!hopper::tensorMapEncoder())
    return refuse("the driver offers no cuTensorMapEncodeTiled");
  return true;
}

int64_t hopperPairClustersThatFit(const KernelContext &ctx,
                                  std::string *reason) {
  if (!hopperGroupedGemmRuns(ctx, reason))
    return -1;
  // The launch's own query (launchPersistent's).
  constexpr auto kernel = hopper::raggedMKernel<__nv_bfloat16, 256, 4, false,
                                                false, false, false, 2>;
  constexpr int bytes =
      hopper::Layout<256, 4,
                     hopper::stagedStore(false, hopper::StoreMode::Plain, false,
                                         false)>::SharedBytes;
  int fit = 0;
  cudaError_t e = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess)
    e = hopper::clustersThatFit<2, kernel>(bytes, ctx.multiprocessors(), fit);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (reason)
      *reason = std::string("cudaOccupancyMaxActiveClusters: ") +
                cudaGetErrorString(e);
    return -1;
  }
  return fit;
}

HopperTile measuredWgradTile(const KernelContext &ctx, int64_t rowBound,
                             int64_t experts) {
  if (rowBound <= kWgradPairRowsPerExpert * experts)
    return kDefaultHopperWgradTile;
  // Whether the pair's clusters fit is the device's answer for the process
  // (its partition included): asked once per device, not per call.
  static std::mutex mutex;
  static std::map<int, bool> pairFits;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return kDefaultHopperWgradTile;
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto [found, added] = pairFits.try_emplace(device, false);
  if (added)
    found->second = hopperPairClustersThatFit(ctx) > 0;
  return found->second ? HopperTile::WidePair : kDefaultHopperWgradTile;
}

bool hopperGroupedGemmApplies(const KernelContext &ctx, DType type, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              std::initializer_list<const void *> pointers,
                              std::string *reason) {
  auto refuse = [&](std::string why) {
    if (reason)
      *reason = std::move(why);
    return false;
  };
  if (type != DType::BF16 && type != DType::F16)
    return refuse("the wgmma grouped GEMM takes bf16 or f16 operands");
  if (!hopperGroupedGemmRuns(ctx, reason))
    return false;
  // TMA: 16-byte aligned bases and row strides.
  if (!vectorizable(k, 2, pointers) || !vectorizable(n, 2, {}))
    return refuse("rows of " + std::to_string(k) + " and " + std::to_string(n) +
                  " elements must be 16-byte aligned for the wgmma grouped "
                  "GEMM");
  // A tensor map's dimensions are positive (k = 0 takes the other kernel).
  if (k <= 0 || n <= 0)
    return refuse("the wgmma grouped GEMM needs k and n above 0");
  // TMA's coordinates are 32-bit (the grid is persistent: no grid limit).
  // (A cluster's second CTA may start 128 rows past the last.)
  if (space.rowBound > INT32_MAX - 256 || k > INT32_MAX || n > INT32_MAX ||
      space.experts > INT32_MAX)
    return refuse("the problem is larger than 2^31 rows or columns");
  return true;
}

namespace {

Status refusedMaps(CUresult r, const char *what) {
  return Status(StatusCode::Internal,
                std::string("cuTensorMapEncodeTiled refused ") + what +
                    " (CUresult " + std::to_string(static_cast<int>(r)) + ")");
}

/// The ragged-M kernel's parameters; with a gathered A, its rows.
hopper::RaggedMParams raggedMParams(const ExpertRowSpace &space, int64_t k,
                                    int64_t n, void *c, bool accumulate,
                                    const void *a, const RowGather &gather) {
  hopper::RaggedMParams params{};
  params.offsets = space.offsets;
  params.rows = space.rows;
  params.groups = static_cast<int32_t>(space.experts);
  params.rowBound = space.rowBound;
  params.staticCapacity = space.staticCapacity;
  params.k = k;
  params.n = n;
  params.c = c;
  params.accumulate = accumulate;
  params.rasterM = rasterBand();
  if (gather.rowTokens) {
    params.a = a;
    params.rowTokens = gather.rowTokens;
    params.tokens = gather.tokens;
  }
  return params;
}

/// A's map covers the rows A has: the row space's, or a gathered A's
/// tokens (the gathered kernels read A by cp.async, not by this map).
int64_t aRows(const ExpertRowSpace &space, const RowGather &gather) {
  return std::max<int64_t>(gather.rowTokens ? gather.tokens : space.rowBound,
                           1);
}

} // namespace

Status hopperGroupedGemm(KernelContext &ctx, const void *a, const void *b,
                         void *c, DType type, int64_t k, int64_t n,
                         const ExpertRowSpace &space, bool transB,
                         bool accumulate, HopperTile tile,
                         const RowGather &gather,
                         const DeviceGemmEpilogue &epilogue) {
  if (space.experts == 0 || n == 0 || space.rowBound == 0)
    return Status::ok();
  const bool gathered = gather.rowTokens != nullptr;
  // The gathered forms: [K][N] weights (the forward), 128 x 128 tiles.
  if (gathered && transB)
    return Status(StatusCode::Internal,
                  "the wgmma grouped GEMM gathers A for [K][N] weights only");
  if (gathered && (tile == HopperTile::Wide || tile == HopperTile::WidePair))
    tile = HopperTile::Cooperative;
  // A store with an epilogue (bias and activation, a backward, the
  // combine) has its own instantiations, one per epilogue and activation
  // (HopperGemmKernel.cuh's StoreMode), of the 128 x 256 form (a gathered
  // A: the cooperative 128 x 128 one); the combine's for [K][N] weights
  // only.
  if (epilogue.fused && accumulate)
    return Status(StatusCode::Internal,
                  "the wgmma grouped GEMM fuses its epilogue only when not "
                  "accumulating");
  const bool combines = epilogue.fused && epilogue.combine.out;
  if (combines && (gathered || transB || accumulate))
    return Status(StatusCode::Internal,
                  "the wgmma grouped GEMM sums the combine in its store for a "
                  "forward product of [K][N] weights only");
  if (epilogue.fused && !gathered)
    tile = kFusedStoreTile;
  // A K-major B's box: the tile's columns, or each CTA's half of them.
  // (WidePair: 256-column tiles, 128 from each CTA.)
  const int bBoxColumns = tile == HopperTile::Wide ? 256 : 128;
  CUtensorMap mapA, mapB;
  if (CUresult r = hopper::makeRaggedMMaps(mapA, mapB, type == DType::BF16, a,
                                           b, aRows(space, gather), k, n,
                                           space.experts, transB, bBoxColumns);
      r != CUDA_SUCCESS)
    return refusedMaps(r, "the grouped GEMM's operands");
  hopper::RaggedMParams params =
      raggedMParams(space, k, n, c, accumulate, a, gather);
  params.bias = epilogue.bias;
  params.pre = epilogue.pre;
  params.biasScale = epilogue.biasScale;
  params.activationInput = epilogue.activationInput;
  params.gluGate = epilogue.gluGate;
  params.gluUp = epilogue.gluUp;
  params.gluGradUp = epilogue.gluGradUp;
  params.combine = epilogue.combine;
  using hopper::StoreMode;
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return Status(StatusCode::Internal,
                    "the wgmma grouped GEMM was asked for f32");
    } else if (epilogue.fused && epilogue.gluGate) {
      constexpr auto G = StoreMode::GluBackward;
      return transB ? launch<T, 256, 4, true, false, false, false, 1, G>(
                          ctx, mapA, mapB, params)
                    : launch<T, 256, 4, false, false, false, false, 1, G>(
                          ctx, mapA, mapB, params);
    } else if (epilogue.fused && epilogue.activationInput) {
      return withActivation(epilogue.derivative, [&](auto act) {
        constexpr auto D = StoreMode::ActivationBackward;
        constexpr int A = decltype(act)::value;
        return transB ? launch<T, 256, 4, true, false, false, false, 1, D, A>(
                            ctx, mapA, mapB, params)
                      : launch<T, 256, 4, false, false, false, false, 1, D, A>(
                            ctx, mapA, mapB, params);
      });
    } else if (epilogue.fused) {
      return withEpilogue(epilogue.epilogue, [&](auto act) {
        constexpr auto B = StoreMode::BiasActivation;
        constexpr int A = decltype(act)::value;
        if (gathered)
          return launch<T, 128, 5, false, false, false, true, 1, B, A>(
              ctx, mapA, mapB, params);
        if (combines)
          return launch<T, 256, 4, false, false, false, false, 1, B, A, true>(
              ctx, mapA, mapB, params);
        return transB ? launch<T, 256, 4, true, false, false, false, 1, B, A>(
                            ctx, mapA, mapB, params)
                      : launch<T, 256, 4, false, false, false, false, 1, B, A>(
                            ctx, mapA, mapB, params);
      });
    } else if (gathered) {
      return tile == HopperTile::PingPong
                 ? launch<T, 128, 6, false, true, false, true>(ctx, mapA, mapB,
                                                               params)
                 : launch<T, 128, 5, false, false, false, true>(ctx, mapA, mapB,
                                                                params);
    } else {
      switch (tile) {
      case HopperTile::Wide:
        if (!transB && directStoreAsked())
          return launch<T, 256, 4, false, false, false, false, 1,
                        StoreMode::Plain, 0, false, true>(ctx, mapA, mapB,
                                                          params);
        return transB
                   ? launch<T, 256, 4, true, false>(ctx, mapA, mapB, params)
                   : launch<T, 256, 4, false, false>(ctx, mapA, mapB, params);
      case HopperTile::WidePair:
        if (!transB && directStoreAsked())
          return launch<T, 256, 4, false, false, false, false, 2,
                        StoreMode::Plain, 0, false, true>(ctx, mapA, mapB,
                                                          params);
        return transB ? launch<T, 256, 4, true, false, false, false, 2>(
                            ctx, mapA, mapB, params)
                      : launch<T, 256, 4, false, false, false, false, 2>(
                            ctx, mapA, mapB, params);
      case HopperTile::PingPong:
        return transB ? launch<T, 128, 6, true, true>(ctx, mapA, mapB, params)
                      : launch<T, 128, 6, false, true>(ctx, mapA, mapB, params);
      default:
        return transB
                   ? launch<T, 128, 5, true, false>(ctx, mapA, mapB, params)
                   : launch<T, 128, 5, false, false>(ctx, mapA, mapB, params);
      }
    }
  });
}

Status hopperGroupedGemmWgrad(KernelContext &ctx, const void *a,
                              const void *gradC, void *gradB, DType type,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool accumulate, HopperTile tile) {
  if (space.experts == 0 || n == 0 || k == 0)
    return Status::ok();
  CUtensorMap mapA, mapGradC;
  // (deviceGroupedGemmWgrad sends an empty row space to the other kernel.)
  if (CUresult r =
          hopper::makeRaggedKMaps(mapA, mapGradC, type == DType::BF16, a, gradC,
                                  std::max<int64_t>(space.rowBound, 1), k, n);
      r != CUDA_SUCCESS)
    return Status(StatusCode::Internal,
                  "cuTensorMapEncodeTiled refused the weight gradient's "
                  "operands (CUresult " +
                      std::to_string(static_cast<int>(r)) + ")");
  hopper::RaggedKParams params{
      space.offsets,  space.rows, static_cast<int32_t>(space.experts),
      space.rowBound, k,          n,
      gradB,          accumulate};
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>)
      return Status(StatusCode::Internal,
                    "the wgmma grouped GEMM was asked for f32");
    else
      return checkCuda(
          tile == HopperTile::WidePair
              ? hopper::launchRaggedK<T, 256, 4, false, 2>(
                    mapA, mapGradC, params, ctx.multiprocessors(), ctx.stream())
          : tile == HopperTile::Wide
              ? hopper::launchRaggedK<T, 256, 4, false>(
                    mapA, mapGradC, params, ctx.multiprocessors(), ctx.stream())
          : tile == HopperTile::Cooperative
              ? hopper::launchRaggedK<T, 128, 5, false>(
                    mapA, mapGradC, params, ctx.multiprocessors(), ctx.stream())
              : hopper::launchRaggedK<T, 128, 6>(mapA, mapGradC, params,
                                                 ctx.multiprocessors(),
                                                 ctx.stream()),
          "grouped GEMM weight-gradient kernel (wgmma)");
  });
}

Status hopperGroupedGemmGlu(KernelContext &ctx, const void *a,
                            const void *bGate, const void *bUp, void *c,
                            void *gateOut, void *upOut, DType type, int64_t k,
                            int64_t n, const ExpertRowSpace &space,
                            HopperTile tile, const RowGather &gather) {
  if (space.experts == 0 || n == 0 || space.rowBound == 0)
    return Status::ok();
  const bool bf16 = type == DType::BF16;
  CUtensorMap mapA, mapGate, mapUp;
  CUresult r = hopper::makeRaggedMMaps(mapA, mapGate, bf16, a, bGate,
                                       aRows(space, gather), k, n,
                                       space.experts, /*bKMajor=*/false, 128);
  if (r == CUDA_SUCCESS)
    r = hopper::makeWeightMap(mapUp, bf16, bUp, k, n, space.experts,
                              /*bKMajor=*/false, 128);
  if (r != CUDA_SUCCESS)
    return refusedMaps(r, "the GLU step's operands");
  hopper::RaggedMParams params =
      raggedMParams(space, k, n, c, /*accumulate=*/false, a, gather);
  params.gateOut = gateOut;
  params.upOut = upOut;
  // A gathered A runs 128-column tiles: ping-pong unless cooperative is
  // asked.
  const bool pingPong = tile == HopperTile::PingPong ||
                        (gather.rowTokens && tile != HopperTile::Cooperative);
  return withType(type, [&](auto tag) -> Status {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>)
      return Status(StatusCode::Internal,
                    "the wgmma grouped GEMM was asked for f32");
    else if (gather.rowTokens) // (128-column tiles: registers)
      return pingPong ? launch<T, 128, 6, false, true, true, true>(
                            ctx, mapA, mapGate, params, &mapUp)
                      : launch<T, 128, 5, false, false, true, true>(
                            ctx, mapA, mapGate, params, &mapUp);
    else if (tile == HopperTile::Wide)
      return launch<T, 256, 4, false, false, true>(ctx, mapA, mapGate, params,
                                                   &mapUp);
    else if (tile == HopperTile::WidePair)
      return launch<T, 256, 4, false, false, true, false, 2>(ctx, mapA, mapGate,
                                                             params, &mapUp);
    else
      return pingPong ? launch<T, 128, 6, false, true, true>(ctx, mapA, mapGate,
                                                             params, &mapUp)
                      : launch<T, 128, 5, false, false, true>(
                            ctx, mapA, mapGate, params, &mapUp);
  });
}

} // namespace flex::cuda::detail
