//===- CudaKernels.h - CUDA kernels of the plan step ops --------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the CUDA backend's kernels: one function per step op,
// reproducing the semantics of the CPU kernels of the same name
// (Cpu/CpuKernels.h), over device pointers in the backend-neutral argument
// types of Core/KernelArgs.h, queued on the stream of a KernelContext. No
// function synchronizes with the host, except the grouped GEMMs of a routing
// whose row counts are only known on the device (ExpertRowSpace::isStatic()
// false): they read the counts once per routing (KernelContext::hostSegments).
//
// Padding rows. With a static routing (padded layout, fixed capacity: C is
// known on the host) the GEMMs run over all E * C rows as one strided batch,
// so every step over dispatch-shaped buffers writes every one of those rows:
// rows past an expert's valid ones hold zeros (dispatch, combine_backward) or
// the finite result of zeros (GEMMs, elementwise ops), so a weight gradient
// summed over them adds exact zeros. With a dynamic routing only the valid
// rows are touched, as on the CPU.
//
// The header needs no CUDA header: streams and handles are opaque.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CUDA_CUDAKERNELS_H
#define FLEX_RUNTIME_CUDA_CUDAKERNELS_H

#include "flex/Runtime/Core/KernelArgs.h"
#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/Status.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct CUstream_st;

namespace flex::cuda {

using Stream = CUstream_st *;

/// Which rows of a dispatch-shaped buffer [rowBound, N] a step touches.
struct ExpertRowSpace {
  const int32_t *offsets = nullptr; ///< device [experts + 1]
  const int32_t *rows = nullptr;    ///< device [experts]
  int64_t experts = 0;
  /// R, the rows of the buffers as the plan declared them.
  int64_t rowBound = 0;
  /// C when the layout is padded and the capacity fixed (known on the
  /// host); -1 otherwise. Static: every row of [0, E * C) is touched.
  int64_t staticCapacity = -1;
  /// The padded layout: dispatch and combine_backward write zeros into the
  /// rows no kept slot fills even when C is only known on the device, since
  /// all_to_all sends whole capacity blocks (docs/PlanFormat.md, "Many
  /// ranks").
  bool padded = false;
  /// The aligned layout (kAlignedLayoutRows; 0 otherwise): every expert's
  /// first row is a multiple of it, so each block of that many rows below
  /// offsets[E] is one expert's (its tail rows past the expert's count are
  /// never read), and the GEMMs run as one batched call over the blocks.
  int64_t alignedRows = 0;

  bool isStatic() const { return staticCapacity >= 0; }
};

/// The per-backend state the kernels share: the stream, the cuBLAS handle,
/// a grow-only device scratch area and pinned host memory for the one
/// read-back of dynamic routings. Not thread-safe (one executor, one thread).
class KernelContext {
public:
  /// Creates the handles on the current device. Unavailable with the CUDA
  /// error when that fails.
  static Status create(std::unique_ptr<KernelContext> &context);
  ~KernelContext();

  Stream stream() const { return stream_; }
  /// null = the context's own stream (created with the context).
  Status setStream(Stream stream);

  /// Device scratch of at least `bytes` bytes, 256-aligned; a later call
  /// with a larger size returns a new area and keeps the old one allocated
  /// (graphs recorded with it stay valid) until the context goes. `slot` picks
  /// one of a few independent areas (a step may need two at once).
  Status scratch(int slot, int64_t bytes, void *&data);
  /// scratch() whose bytes were zero when it was allocated: the caller's
  /// kernels leave it zero again (grouped_gemm_combine's counters).
  Status zeroedScratch(int slot, int64_t bytes, void *&data);
  /// True while a graph is being recorded: growing scratch is not allowed
  /// then (the pass ran eagerly once before, so it need not).
  bool capturing = false;

  /// The valid rows per expert, on the host, for a dynamic routing: copies
  /// offsets and rows once per routing (keyed by their device addresses and
  /// `generation`, bumped by every gate) and waits for the copy.
  Status hostSegments(const ExpertRowSpace &space,
                      const int32_t *&hostOffsets, const int32_t *&hostRows);
  uint64_t generation = 0;
  /// RuntimeOptions::groupedGemm: how grouped GEMMs of a dynamic routing
  /// run (GroupedGemm.cu).
  GroupedGemmImpl groupedGemm = GroupedGemmImpl::Auto;
  /// RuntimeOptions::reluInGemm: a fixed capacity's ReLU in cuBLASLt's
  /// epilogue (LtGemm.cu).
  bool reluInGemm = true;
  /// RuntimeOptions::wgmma: the wgmma grouped kernel where the device has
  /// it (HopperGroupedGemm.cu). On in a bare context (the kernel tests and
  /// the calibration use it); a backend sets the option's value.
  bool wgmma = true;
  /// RuntimeOptions::wgmmaTile: the wgmma kernel's tile where a call asks
  /// for its default (Auto: each GEMM's measured one).
  WgmmaTile wgmmaTile = WgmmaTile::Auto;
  /// Programmatic dependent launches for the decode chain's kernels (the
  /// router, the gate, the slot map, the device GEMMs, the combine:
  /// DependentLaunch.cuh), sm_90 and up. Off: they gained nothing at D1 on
  /// an H100 (bench/RESULTS.md Run 44); FLEX_PDL=1 turns them on in new
  /// contexts, to measure.
  bool dependentLaunches = false;

  /// How the host waits for the stream; empty = cudaStreamSynchronize. A
  /// multi-rank backend waits through its device communicator, whose wait
  /// is bounded (Communicator::synchronizeStream).
  std::function<Status(Stream)> streamWaiter;
  Status waitForStream(const char *what);

  /// RuntimeOptions::gemmStreams: the streams spreadOverStreams may use.
  int gemmStreams = 1;
  /// Queues `weights.size()` independent cuBLAS calls spread over up to
  /// gemmStreams streams: the context's, and side streams that start after
  /// the work queued so far, each with a cuBLAS handle and workspace of its
  /// own. `issue(item, handle)` queues item's call on `handle`; the heaviest
  /// item goes first, each to the stream with the least weight so far. The
  /// context's stream waits for the side streams before anything queued
  /// after, so to the caller it is one call on its stream. One stream while
  /// capturing a graph. The side streams are created on first use and kept.
  Status spreadOverStreams(const std::vector<int64_t> &weights,
                           const std::function<Status(int64_t, void *)> &issue);

  void *cublasHandle() const { return cublas_; }
  /// The cuBLASLt handle (GEMMs with an activation in their epilogue); it
  /// shares the cuBLAS workspace, as both run on the one stream.
  void *cublasLtHandle() const { return cublasLt_; }
  void *cublasWorkspace() const { return cublasWorkspace_; }
  int64_t cublasWorkspaceBytes() const { return cublasWorkspaceBytes_; }
  int multiprocessors() const { return multiprocessors_; }
  /// major * 10 + minor (90 for an H100).
  int computeCapability() const { return computeCapability_; }

private:
  KernelContext() = default;
  Stream ownStream_ = nullptr;
  Stream stream_ = nullptr;
  void *cublas_ = nullptr;
  void *cublasLt_ = nullptr;
  void *cublasWorkspace_ = nullptr;
  int64_t cublasWorkspaceBytes_ = 0;
  int multiprocessors_ = 1;
  int computeCapability_ = 0;
  struct ScratchArea {
    void *data = nullptr;
    int64_t bytes = 0;
    bool zeroed = false; ///< zeroedScratch() cleared it
  };
  /// Slots: 0 gate (and gate_backward), 1 dispatch slot maps, 2 bias
  /// gradients, 3 the router's GEMM path (and router_backward), 4 the
  /// router's weights, 5 gathered A rows, 6 the few-token router's splits,
  /// 7 the grouped cuBLAS call's operand pointers, 8 grouped_gemm_glu's
  /// products where the unfused GEMMs run and the step keeps none, 9
  /// grouped_gemm_combine's arrival counters (zeroed).
  std::vector<ScratchArea> scratch_ = std::vector<ScratchArea>(12);
  /// Areas a slot outgrew, freed with the context (graphs may hold them).
  std::vector<void *> retiredScratch_;
  /// spreadOverStreams' side streams: each with its cuBLAS handle, that
  /// handle's workspace and the event the context's stream waits on.
  struct SideStream {
    Stream stream = nullptr;
    void *cublas = nullptr;
    void *workspace = nullptr;
    void *done = nullptr; ///< cudaEvent_t
  };
  std::vector<SideStream> sideStreams_;
  void *sideStart_ = nullptr; ///< cudaEvent_t: the side streams wait on it
  Status addSideStream();
  static void destroySideStream(SideStream &side);
  int32_t *pinned_ = nullptr;
  int64_t pinnedCount_ = 0;
  const int32_t *hostKeyOffsets_ = nullptr;
  uint64_t hostKeyGeneration_ = ~uint64_t{0};
};

/// The message of the last CUDA error as a Status, or ok. `what` names the
/// call ("dispatch kernel").
Status checkCuda(int error, const char *what);
Status checkLaunch(const char *what);

//===----------------------------------------------------------------------===//
// Forward step ops (see the CPU functions of the same name)
//===----------------------------------------------------------------------===//

Status router(KernelContext &ctx, ReadBuffer x, ReadBuffer wg, float *logits,
              int64_t tokens, int64_t modelDim, int64_t experts);

/// `gate`. The host side only launches: capacity, offsets and rows stay on
/// the device. Indices and locations equal the CPU kernel's bit for bit on
/// the same logits (same fp32 operation order; exp in fp64 rounded once).
Status gate(KernelContext &ctx, const float *logits, int64_t tokens,
            int64_t experts, const GateAttrs &attrs, const GateOutputs &out);

Status dispatch(KernelContext &ctx, ReadBuffer x, int64_t modelDim,
                const Routing &routing, const ExpertRowSpace &space,
                WriteBuffer dispatched);

/// `dispatch_rows`: rowTokens[row of each kept slot] = its token; with
/// `padded` (a padded layout's padding rows exist) -1 for the other rows
/// below rowCount, which a ragged layout does not have before offsets[E].
Status dispatchRows(KernelContext &ctx, const Routing &routing,
                    int64_t rowCount, bool padded, int32_t *rowTokens);

/// Whether this device and build can run the device-sized grouped GEMM that
/// dynamic routings take under grouped_gemm=auto/device (compute capability
/// 8.0+, sm_80 code in the build); the reason in *why when not.
bool deviceGroupedGemmAvailable(const KernelContext &ctx,
                                std::string *why = nullptr);

/// Whether that kernel has its wgmma tiles here (compute capability 9.0 and
/// the build's sm_90a part): forward and input-gradient GEMMs of any size
/// then take it under grouped_gemm=auto.
bool wgmmaGroupedGemmAvailable(const KernelContext &ctx,
                               std::string *why = nullptr);

/// With `gather.rowTokens` (a gather-fused variant) `a` is the layer's x
/// [T, K] and row r of the product reads a[rowTokens[r]]: the device-sized
/// kernel follows the map in its A loads; where it does not apply, the rows
/// are gathered into scratch first.
Status groupedGemm(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                   ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                   const ExpertRowSpace &space,
                   const GroupedGemmOptions &options, WriteBuffer pre = {},
                   const RowGather &gather = {});

Status glu(KernelContext &ctx, ReadBuffer gateIn, ReadBuffer upIn,
           WriteBuffer c, int64_t n, const ExpertRowSpace &space);

/// `grouped_gemm_glu`: per expert, gate = a @ bGate[e] and up = a @ bUp[e]
/// (both [E, k, n]), each rounded to c's type (into gateIn / upIn when
/// given), c = silu(gate) * up. The device-sized kernel computes both
/// products and the GLU in one launch wherever it applies (bf16/f16, any
/// row space) unless grouped_gemm=cublas; elsewhere two grouped GEMMs (into
/// gateIn / upIn, else scratch) and the glu kernel: bit for bit the unfused
/// steps on the same GEMM path. `gather` as in groupedGemm.
Status groupedGemmGlu(KernelContext &ctx, ReadBuffer a, ReadBuffer bGate,
                      ReadBuffer bUp, WriteBuffer c, int64_t k, int64_t n,
                      const ExpertRowSpace &space, WriteBuffer gateIn = {},
                      WriteBuffer upIn = {}, const RowGather &gather = {});

Status combine(KernelContext &ctx, ReadBuffer expertOut, int64_t modelDim,
               const Routing &routing, WriteBuffer out);

//===----------------------------------------------------------------------===//
// Backward step ops
//===----------------------------------------------------------------------===//

Status combineBackward(KernelContext &ctx, ReadBuffer gradOut,
                       ReadBuffer expertOut, int64_t modelDim,
                       const Routing &routing, const ExpertRowSpace &space,
                       WriteBuffer gradExpertOut, float *gradGates);

/// `grouped_gemm_activation_backward`: per expert, c = round(a @ b[e]) *
/// act'(pre) (b[e]^T with transB), the product rounded to c's type first.
/// The wgmma kernel applies the derivative in its store wherever it runs
/// and applies (bf16/f16 on Hopper, any row space) unless
/// grouped_gemm=cublas; elsewhere groupedGemm into c and activationBackward
/// over c in place: bit for bit the unfused steps on the same GEMM path.
/// c must not be a, b or pre.
Status groupedGemmActivationBackward(KernelContext &ctx, ReadBuffer a,
                                     ReadBuffer b, ReadBuffer pre,
                                     WriteBuffer c, int64_t k, int64_t n,
                                     const ExpertRowSpace &space, bool transB,
                                     Activation act);

/// `grouped_gemm_combine`: c = groupedGemm(a, b, bias) with `options` (not
/// accumulating), then out = combine(c) over the routing. Where the GEMM
/// runs on the device kernel's few-rows tile or the wgmma kernel (as
/// grouped_gemm would run it) and `rowTokens` ([rows]: each row's token,
/// dispatch_rows') is given, the tile storing a token's last kept row sums
/// the token in its store; elsewhere the two steps. Bit for bit groupedGemm
/// and combine on the same GEMM path. c and out must not be a, b or bias.
Status groupedGemmCombine(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                          ReadBuffer bias, WriteBuffer c, int64_t k, int64_t n,
                          const ExpertRowSpace &space,
                          const GroupedGemmOptions &options,
                          const Routing &routing, const int32_t *rowTokens,
                          WriteBuffer out);

/// `grouped_gemm_glu_backward`: per expert, with d = round(a @ b[e])
/// (b[e]^T with transB), gradGateIn = d * upIn * silu'(gateIn) and
/// gradUpIn = d * silu(gateIn). The wgmma kernel computes both in its store
/// wherever it runs and applies, unless grouped_gemm=cublas; elsewhere
/// groupedGemm into gradGateIn and gluBackward over it in place: bit for bit
/// the unfused steps on the same GEMM path. The outputs must be none of the
/// inputs and not one another.
Status groupedGemmGluBackward(KernelContext &ctx, ReadBuffer a, ReadBuffer b,
                              ReadBuffer gateIn, ReadBuffer upIn,
                              WriteBuffer gradGateIn, WriteBuffer gradUpIn,
                              int64_t k, int64_t n, const ExpertRowSpace &space,
                              bool transB);

Status groupedGemmWgrad(KernelContext &ctx, ReadBuffer a, ReadBuffer gradC,
                        int64_t k, int64_t n, const ExpertRowSpace &space,
                        WriteBuffer gradB, WriteBuffer gradBias,
                        bool accumulate = false, const RowGather &gather = {});

Status activationBackward(KernelContext &ctx, ReadBuffer pre, ReadBuffer grad,
                          WriteBuffer gradPre, int64_t n,
                          const ExpertRowSpace &space, Activation act);

Status gluBackward(KernelContext &ctx, ReadBuffer gateIn, ReadBuffer upIn,
                   ReadBuffer grad, WriteBuffer gradGateIn,
                   WriteBuffer gradUpIn, int64_t n,
                   const ExpertRowSpace &space);

Status dispatchBackward(KernelContext &ctx, ReadBuffer gradDispatched,
                        int64_t modelDim, const Routing &routing,
                        WriteBuffer gradX);

Status gateBackward(KernelContext &ctx, const float *gradGates,
                    const float *gradLAux, const float *scores,
                    const Routing &routing, const GateBackwardAttrs &attrs,
                    float *gradLogits);

Status routerBackward(KernelContext &ctx, ReadBuffer x, ReadBuffer wg,
                      const float *gradLogits, int64_t tokens,
                      int64_t modelDim, int64_t experts, WriteBuffer gradX,
                      WriteBuffer gradWg);

//===----------------------------------------------------------------------===//
// Experts sharded over ranks (see the CPU shardRouting)
//===----------------------------------------------------------------------===//

/// `shard_routing`: slot (t * k + i) * s + q of the outputs gets choice
/// (t, i)'s index * s + q, location and gate; expertOffsets[v] = v * C (C
/// read on the device) for v <= E * s, expertRows[v] = routing's rows of
/// v / s. `routing` is the gate's (k = topK choices over E = experts).
/// InvalidArgument when shards < 1.
Status shardRouting(KernelContext &ctx, const Routing &routing, int64_t shards,
                    int32_t *indices, int32_t *locations, float *gates,
                    int32_t *expertOffsets, int32_t *expertRows);

/// `shard_routing_backward`: gradGates[t, i] = sum over q in order of
/// shardGradGates[(t * topK + i) * shards + q], in fp32.
Status shardRoutingBackward(KernelContext &ctx, const float *shardGradGates,
                            int64_t tokens, int64_t topK, int64_t shards,
                            float *gradGates);

//===----------------------------------------------------------------------===//
// Collective steps: the device side (the communicator moves the bytes)
//===----------------------------------------------------------------------===//

/// sync_capacity after the all-reduce: offsets[e] = e * capacity[0] for e in
/// [0, experts], reading the capacity on the device.
Status writeCapacityOffsets(KernelContext &ctx, const int32_t *capacity,
                            int64_t experts, int32_t *offsets);

/// uniform_segments: with n = ranks * (C / chunks), offsets[g] =
/// chunk * groups * n + g * n (g <= groups) and rows[g] = n, C read on the
/// device.
Status uniformSegments(KernelContext &ctx, const int32_t *capacity,
                       int64_t groups, int64_t ranks, int64_t chunks,
                       int64_t chunk, int32_t *offsets, int32_t *rows);

/// The all_to_all row mapping of AllToAllLayout.h for W ranks, L local
/// experts, capacity C in D chunks, chunk q.
struct AllToAllShape {
  int64_t ranks = 1, localExperts = 1, capacity = 0, chunks = 1, chunk = 0;
};

/// Copies the runs exchanged with each peer between `layoutBuffer` (the
/// dispatch layout [W, L, C] when `dispatchLayout`, else the received layout
/// [D, L, W, Cq]) and `staging` ([W, L, Cq] rows of `rowBytes` bytes, block
/// p for peer p): toward the staging buffer when `pack`, else back.
Status allToAllCopy(KernelContext &ctx, const AllToAllShape &shape,
                    bool dispatchLayout, bool pack, void *layoutBuffer,
                    void *staging, int64_t rowBytes);

} // namespace flex::cuda

#endif // FLEX_RUNTIME_CUDA_CUDAKERNELS_H
