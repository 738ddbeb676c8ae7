//===- GroupedGemmInternal.h - The grouped GEMM's two implementations ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the device-sized grouped GEMM (DeviceGroupedGemm.cu):
// the expert groups' row counts are read by the kernel itself, so a dynamic
// routing needs no host read of its counts and no per-expert launch, and the
// pass can be recorded as a CUDA graph. GroupedGemm.cu chooses between it and
// the cuBLAS paths (RuntimeOptions::groupedGemm); the benchmark
// (tools/gemm-bench) and the tests call both explicitly.
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_CUDA_GROUPEDGEMMINTERNAL_H
#define LIB_RUNTIME_CUDA_GROUPEDGEMMINTERNAL_H

#include "flex/Runtime/Cuda/CudaKernels.h"

namespace flex::cuda::detail {

/// Whether this device and build can run the device kernel at all (compute
/// capability 8.0 or newer, sm_80+ code in the build); the reason when not.
bool deviceGroupedGemmRuns(const KernelContext &ctx,
                           std::string *reason = nullptr);

/// Whether the kernel's grid fits CUDA's limits (65535 blocks in y and z)
/// for `rowBound` rows over `experts` groups and a K (or weight-gradient M)
/// of `k`.
bool deviceGroupedGemmGridFits(int64_t rowBound, int64_t experts, int64_t k);

/// Whether the device kernel can run a grouped GEMM of these operands:
/// bf16 or f16 (fp32 accumulation), rows of k and n elements 16-byte aligned,
/// a dynamic row space (or, with `staticToo`, a static one: the GLU step,
/// which no cuBLAS call fuses), and a device of compute capability 8.0 or
/// newer. The reason is set when it cannot.
bool deviceGroupedGemmApplies(const KernelContext &ctx, DType type, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              std::initializer_list<const void *> pointers,
                              std::string *reason = nullptr,
                              bool staticToo = false);

/// The CTA tile of the device-sized kernel (Auto: Small for few rows per
/// expert, else the wgmma kernel where it applies, else Large; the
/// benchmark times each).
enum class DeviceTiles {
  Auto,
  Small, ///< 32 x 128, 4 warps
  Large, ///< 128 x 128, 8 warps
  Wide,  ///< 128 x 256, 8 warps
  /// The wgmma kernel (HopperGemmKernel.cuh, sm_90a): a TMA producer warp
  /// and two consumer warpgroups. Hopper is the default among them. (The
  /// Hopper values come last: `tiles >= DeviceTiles::Hopper` tests for one.)
  Hopper,
  HopperCooperative, ///< 128 x 128, both warpgroups on each tile
  HopperWide,        ///< 128 x 256, both warpgroups on each tile
  HopperPingPong,    ///< 128 x 128, the warpgroups on alternate tiles
  /// 128 x 256 in clusters of 2 CTAs along M sharing B's tile (TMA
  /// multicast: half of B's reads from L2).
  HopperWidePair,
};

/// The wgmma kernel's shapes (DeviceTiles' Hopper* values).
enum class HopperTile { Cooperative, Wide, PingPong, WidePair };
/// The one DeviceTiles::Hopper (and the automatic choice) takes: the fastest
/// on every shape measured (H100, bench/RESULTS.md Run 32: C3's experts
/// 1027 us against 1152 for both 128 x 128 shapes, C1's 1608 against
/// 2002-2064, 192 rows per expert 201 against 221-224). The GLU step and
/// a gathered A run 128 x 128 (ping-pong).
inline constexpr HopperTile kDefaultHopperTile = HopperTile::Wide;
/// The GLU step's (a gathered A runs 128 x 128 whatever is asked): 128 +
/// 128 columns, the fastest on every shape measured (H100, bench/RESULTS.md
/// Run 35: 256, 512 and 1024 tokens of 64 experts 287-365 us against
/// 311-370 for ping-pong 64 + 64; 128 tokens of the large layer 562 against
/// 678).
inline constexpr HopperTile kDefaultHopperGluTile = HopperTile::Wide;
/// The form a fused store (bias / activation, a backward, the combine) runs
/// whatever tile is asked: 128 x 256, the fastest shape (a gathered A runs
/// 128 x 128 cooperative). Its store modes are instantiated for it alone.
inline constexpr HopperTile kFusedStoreTile = HopperTile::Wide;
/// The weight gradient's over few rows per expert (each tile one or two
/// reduction steps): ping-pong 128 x 128, one warpgroup storing while the
/// other multiplies. H100 (bench/RESULTS.md Run 39): 108.5 us against
/// 157 for the other tiles at 32 rows per expert (64 experts), 66.0
/// against 87 at 64 (16 experts).
inline constexpr HopperTile kDefaultHopperWgradTile = HopperTile::PingPong;
/// Mean rows per expert above which the weight gradient takes the 2-CTA
/// pair (128 x 256 tiles sharing gradC's tile by multicast): there it
/// is the fastest, C3 (1536 rows, 64 experts) 1028.5 us against 1171.9 for
/// ping-pong and 1081.0 for 128 x 256 alone, C1 (4096 rows, 8 experts)
/// 1554.3 against 2158.2 and 1628.4 (Runs 38-39). Between 64 and 1536
/// rows it was not measured; 256 is where auto's rule sends the weight
/// gradient to cuBLAS (kDeviceGemmRowsPerExpert), so what auto runs
/// eagerly keeps the measured small-rows tile.
inline constexpr int64_t kWgradPairRowsPerExpert = 256;

/// The tile of a call that asks for the wgmma kernel's default: the
/// context's `wgmma_tile` where one is set, else `measured` (the GEMM's
/// own default).
inline HopperTile defaultHopperTile(const KernelContext &ctx,
                                    HopperTile measured) {
  switch (ctx.wgmmaTile) {
  case WgmmaTile::Wide:
    return HopperTile::Wide;
  case WgmmaTile::Pair:
    return HopperTile::WidePair;
  case WgmmaTile::Cooperative:
    return HopperTile::Cooperative;
  case WgmmaTile::PingPong:
    return HopperTile::PingPong;
  default:
    return measured;
  }
}

/// The HopperTile of a DeviceTiles::Hopper* value (Hopper: the default).
inline HopperTile hopperTileOf(DeviceTiles tiles) {
  switch (tiles) {
  case DeviceTiles::HopperCooperative:
    return HopperTile::Cooperative;
  case DeviceTiles::HopperWide:
    return HopperTile::Wide;
  case DeviceTiles::HopperPingPong:
    return HopperTile::PingPong;
  case DeviceTiles::HopperWidePair:
    return HopperTile::WidePair;
  default:
    return kDefaultHopperTile;
  }
}

/// The epilogue the device kernel applies in its store (not accumulating):
/// c = epilogue(round(a @ b[e]) + biasScale * bias[e]), `pre` (if any) the
/// value before the activation: applyGemmEpilogue's result, without its
/// launch and its second pass over c.
/// The column block of grouped_gemm_combine's arrival counters: a tile's
/// first column / 64 (every tile is 64 columns or wider, so two tiles never
/// share one).
inline constexpr int kCombineBlockColumns = 64;

/// The combine of grouped_gemm_combine in a GEMM kernel's store
/// (CombineInStore.cuh): the tile storing a token's last kept row sums the
/// token's rows into `out` as the combine kernel does.
struct CombineInStore {
  void *out = nullptr; ///< [tokens, n], c's type; null: no combine
  Routing routing;
  const int32_t *rowTokens = nullptr; ///< [rows]: the row's token, or -1
  /// [tokens, blocks]: zero before the launch, and again after it (the
  /// tile that sees a token's last arrival resets its counter).
  int32_t *arrivals = nullptr;
  int64_t blocks = 0; ///< ceil(n / kCombineBlockColumns)
};

struct DeviceGemmEpilogue {
  bool fused = false;
  const void *bias = nullptr; ///< [E, n] or null
  void *pre = nullptr;        ///< [rows, n] like c, or null
  Epilogue epilogue = Epilogue::None;
  float biasScale = 1.0f;
  /// The activation's backward instead (the wgmma kernel's store only; no
  /// bias, pre or epilogue): c = round(a @ b[e]) * act'(activationInput),
  /// activationInput [rows, n] like c (the forward's `pre`): bit for bit the
  /// GEMM followed by activationBackward.
  const void *activationInput = nullptr;
  Activation derivative = Activation::Relu;
  /// Or the GLU's backward (the wgmma kernel's store only; nothing else):
  /// with d = round(a @ b[e]), c = d * up * silu'(gate) (grad_gate_in) and
  /// gluGradUp = d * silu(gate) (grad_up_in), gate and up [rows, n] like c
  /// (the forward's gate_in / up_in): bit for bit the GEMM followed by
  /// gluBackward.
  const void *gluGate = nullptr, *gluUp = nullptr;
  void *gluGradUp = nullptr;
  /// And then the combine (the few-rows mma.sync tile and the wgmma
  /// kernel; with the bias and epilogue above, not the backwards).
  CombineInStore combine;
};

/// Whether this device and build run the wgmma grouped GEMM (compute
/// capability 9.0, the sm_90a part in the build, the driver's tensor-map
/// encoder); the reason when not.
bool hopperGroupedGemmRuns(const KernelContext &ctx,
                           std::string *reason = nullptr);

/// Whether the wgmma kernel takes these operands: bf16/f16, 16-byte aligned
/// rows and bases (TMA), sizes inside TMA's 32-bit coordinates.
bool hopperGroupedGemmApplies(const KernelContext &ctx, DType type, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              std::initializer_list<const void *> pointers,
                              std::string *reason = nullptr);

/// The weight gradient's default tile over `rowBound` declared rows of
/// `experts` experts: the pair above kWgradPairRowsPerExpert where its
/// clusters can run at once (hopperPairClustersThatFit: not under every
/// MPS or green-context partition), else ping-pong.
HopperTile measuredWgradTile(const KernelContext &ctx, int64_t rowBound,
                             int64_t experts);

/// How many 2-CTA clusters of the forward 128 x 256 pair form (bf16) the
/// device runs at once (cudaOccupancyMaxActiveClusters, what its persistent
/// launch sizes its grid by), or -1 with the reason when it cannot say. A
/// diagnostic for the benchmark: a count below half the SMs would leave SMs
/// idle.
int64_t hopperPairClustersThatFit(const KernelContext &ctx,
                                  std::string *reason = nullptr);

/// deviceGroupedGemm's ragged-M product on the wgmma kernel (any row space,
/// static included): c[rows of e] (+)= a[rows of e] @ b[e] (b[e]^T when
/// transB). With `gather.rowTokens` (not with transB), A's rows are
/// gathered by the producer warpgroup's cp.async (zeros for a token outside
/// [0, tokens)); a Wide tile then runs as Cooperative.
Status hopperGroupedGemm(KernelContext &ctx, const void *a, const void *b,
                         void *c, DType type, int64_t k, int64_t n,
                         const ExpertRowSpace &space, bool transB,
                         bool accumulate, HopperTile tile,
                         const RowGather &gather = {},
                         const DeviceGemmEpilogue &epilogue = {});

/// deviceGroupedGemmWgrad on the wgmma kernel (tiles of gradB[e]: ping-pong
/// 128 x 128, cooperative 128 x 128, Wide 128 x 256, or WidePair: Wide in
/// 2-CTA clusters sharing gradC's tile; the reduction over e's rows in
/// blocks of 64; the last block's rows past the group zeroed in shared
/// memory).
Status hopperGroupedGemmWgrad(KernelContext &ctx, const void *a,
                              const void *gradC, void *gradB, DType type,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool accumulate,
                              HopperTile tile = kDefaultHopperWgradTile);

/// deviceGroupedGemmGlu on the wgmma kernel (tiles of BN / 2 gate and the
/// same up columns; a gathered A runs 128 x 128): bit for bit the wgmma
/// kernel's two GEMMs and the glu kernel.
Status hopperGroupedGemmGlu(KernelContext &ctx, const void *a,
                            const void *bGate, const void *bUp, void *c,
                            void *gateOut, void *upOut, DType type, int64_t k,
                            int64_t n, const ExpertRowSpace &space,
                            HopperTile tile, const RowGather &gather = {});

/// The tile deviceGroupedGemm's Auto takes for these operands: Small for
/// few rows per expert, else Hopper where the wgmma kernel takes them, else
/// Large.
DeviceTiles
deviceGroupedGemmAutoTiles(const KernelContext &ctx, DType type, int64_t k,
                           int64_t n, const ExpertRowSpace &space, bool transB,
                           const RowGather &gather,
                           std::initializer_list<const void *> pointers);

/// Whether deviceGroupedGemm (tiles Auto) applies an epilogue in its store
/// for these operands: its few-rows tile and the wgmma kernel do, the
/// large mma.sync tile does not.
bool deviceGroupedGemmFusesEpilogue(
    const KernelContext &ctx, DType type, int64_t k, int64_t n,
    const ExpertRowSpace &space, bool transB, const RowGather &gather,
    std::initializer_list<const void *> pointers);

/// c[rows of e] (+)= a[rows of e] @ b[e] (b[e]^T when transB) for every
/// expert e, rows as the device's offsets and rows say; rows of c outside
/// every expert's segment are not written. `epilogue.fused`: the epilogue in
/// the store.
///
/// With `gather.rowTokens`, a is [gather.tokens, k] and row r's A row is
/// a[rowTokens[r]], read by the kernel's own loads (zeros for a token
/// outside [0, tokens)).
Status deviceGroupedGemm(KernelContext &ctx, const void *a, const void *b,
                         void *c, DType type, int64_t k, int64_t n,
                         const ExpertRowSpace &space, bool transB,
                         bool accumulate, DeviceTiles tiles = DeviceTiles::Auto,
                         const RowGather &gather = {},
                         const DeviceGemmEpilogue &epilogue = {});

/// The SwiGLU expert's first layer in one launch: for every expert e,
/// gate = a @ bGate[e] and up = a @ bUp[e] (both [E, k, n], [K][N]) over
/// its rows, each rounded to `type`; c = silu(gate) * up; gateOut / upOut
/// (null: not written) receive the rounded products. A CTA computes the
/// gate's and the up projection's tiles of the same output columns side by
/// side, sharing its A tile. Any row space, static included; `gather` as in
/// deviceGroupedGemm.
Status deviceGroupedGemmGlu(KernelContext &ctx, const void *a,
                            const void *bGate, const void *bUp, void *c,
                            void *gateOut, void *upOut, DType type, int64_t k,
                            int64_t n, const ExpertRowSpace &space,
                            const RowGather &gather = {},
                            DeviceTiles tiles = DeviceTiles::Auto);

/// gradB[e] (+)= a[rows of e]^T @ gradC[rows of e]; an expert without rows
/// gets zeros (or keeps its value when accumulating).
/// `tiles`: Auto, or a Hopper* tile of the wgmma kernel (Unavailable where
/// it does not apply).
Status deviceGroupedGemmWgrad(KernelContext &ctx, const void *a,
                              const void *gradC, void *gradB, DType type,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool accumulate, const RowGather &gather = {},
                              DeviceTiles tiles = DeviceTiles::Auto);

/// The implementation a grouped GEMM of a dynamic row space takes.
enum class GroupedGemmPath {
  Auto,   ///< RuntimeOptions::groupedGemm's rule (docs/Runtime.md)
  Device, ///< the device-sized kernel (where it applies)
  Cublas, ///< host-read counts, one cuBLAS GEMM per expert
  /// Host-read counts, then one cublasGemmGroupedBatchedEx over the experts
  /// with rows (one launch instead of one per expert). Auto's host path
  /// takes it for the forward and input gradient when no expert has more
  /// than kGroupedCublasMaxRows rows (Core/GroupedGemmRule.h).
  CublasGrouped,
};

/// c[e * capacity + r] = relu(a[e * capacity + r] @ op(b[e])) for `experts`
/// blocks of `capacity` rows, as one cuBLASLt matmul with the ReLU in its
/// epilogue (LtGemm.cu). `done` is false, and nothing was queued, where
/// cuBLASLt offers no algorithm or the dtype is f32: the caller runs the
/// GEMM and the epilogue kernel then.
Status ltReluBatchedGemm(KernelContext &ctx, bool transB, const void *a,
                         const void *b, void *c, DType dtype, int64_t k,
                         int64_t n, int64_t capacity, int64_t experts,
                         bool &done);

/// cuda::groupedGemm / groupedGemmWgrad / groupedGemmGlu with the path
/// chosen explicitly (for groupedGemmGlu: Device fuses where the kernel
/// applies, any other path runs two GEMMs of that path and the glu kernel).
Status groupedGemmWith(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                       ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                       const ExpertRowSpace &space,
                       const GroupedGemmOptions &options, WriteBuffer pre,
                       GroupedGemmPath path, const RowGather &gather = {});
Status groupedGemmWgradWith(KernelContext &ctx, ReadBuffer a, ReadBuffer gradC,
                            int64_t k, int64_t n, const ExpertRowSpace &space,
                            WriteBuffer gradB, WriteBuffer gradBias,
                            bool accumulate, GroupedGemmPath path,
                            const RowGather &gather = {});
Status groupedGemmActivationBackwardWith(KernelContext &ctx, ReadBuffer a,
                                         ReadBuffer b, ReadBuffer pre,
                                         WriteBuffer c, int64_t k, int64_t n,
                                         const ExpertRowSpace &space,
                                         bool transB, Activation act,
                                         GroupedGemmPath path);
/// Whether grouped_gemm_combine sums in the GEMM's store on `path` (the
/// device kernel's few-rows tile or the wgmma kernel, where grouped_gemm
/// would run it with its epilogue fused), given a row -> token map.
bool combinesInStore(const KernelContext &ctx, GroupedGemmPath path, DType type,
                     int64_t k, int64_t n, const ExpertRowSpace &space,
                     bool transB, std::initializer_list<const void *> pointers);
Status groupedGemmCombineWith(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                              ReadBuffer bias, WriteBuffer c, int64_t k,
                              int64_t n, const ExpertRowSpace &space,
                              const GroupedGemmOptions &options,
                              const Routing &routing, const int32_t *rowTokens,
                              WriteBuffer out, GroupedGemmPath path);
Status groupedGemmGluBackwardWith(KernelContext &ctx, ReadBuffer a,
                                  ReadBuffer b, ReadBuffer gateIn,
                                  ReadBuffer upIn, WriteBuffer gradGateIn,
                                  WriteBuffer gradUpIn, int64_t k, int64_t n,
                                  const ExpertRowSpace &space, bool transB,
                                  GroupedGemmPath path);
Status groupedGemmGluWith(KernelContext &ctx, ReadBuffer a, ReadBuffer bGate,
                          ReadBuffer bUp, WriteBuffer c, int64_t k, int64_t n,
                          const ExpertRowSpace &space, WriteBuffer gateIn,
                          WriteBuffer upIn, GroupedGemmPath path,
                          const RowGather &gather = {});

} // namespace flex::cuda::detail

#endif // LIB_RUNTIME_CUDA_GROUPEDGEMMINTERNAL_H
