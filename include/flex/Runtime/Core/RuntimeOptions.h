//===- RuntimeOptions.h - The behaviour knobs of the runtime ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares RuntimeOptions: every knob that changes how the runtime
// behaves (not what it computes), as one plain struct that callers fill and
// pass down explicitly: to Executor::create, createCudaBackend and the
// communicator factories. The FLEX_* environment variables remain as
// documented overrides, and RuntimeOptions::fromEnvironment is the only place
// they are read. Each option has a name ("variant", "cuda_overlap", ...) and a
// text form, shared by set(), the environment and the C API's
// flexOptionsSet, so the three parse and validate alike. docs/Runtime.md
// ("Runtime options") has the table.
//
// The variables that describe a launch rather than the library's behaviour
// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, FLEX_RENDEZVOUS_PORT,
// TORCHELASTIC_RUN_ID, OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK) are read
// where the launch is detected (TcpRendezvous.cpp, MpiCommunicator.cpp).
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_RUNTIMEOPTIONS_H
#define FLEX_RUNTIME_CORE_RUNTIMEOPTIONS_H

#include "flex/Runtime/Status.h"

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

/// The default collective timeout (FLEX_COLLECTIVE_TIMEOUT_S).
inline constexpr double kDefaultCollectiveTimeoutSeconds = 300.0;
/// The most streams RuntimeOptions::gemmStreams allows.
inline constexpr int kMaxGemmStreams = 8;

/// Whether a device all_to_all packs its rows into one staging block per
/// peer before sending.
enum class ExchangeStaging : uint8_t {
  Auto,   ///< pack when the rows per (peer, expert) are small
  Always, ///< always pack
  Never,  ///< send the rows in place
};

/// How a CUDA grouped GEMM over a dynamic routing (dropless, bounded,
/// ragged) runs.
enum class GroupedGemmImpl : uint8_t {
  Auto,   ///< the device-sized kernel for few rows per expert, else cuBLAS
  Device, ///< the device-sized kernel wherever it applies (graph-recordable)
  /// Counts read to the host, then cuBLAS: one grouped call over the
  /// experts when none has many rows (groupedCublasTakes), else a GEMM per
  /// expert.
  Cublas,
};

/// The tile shape of the wgmma grouped kernel (Hopper), for every GEMM it
/// runs (forward and input gradient, the GLU step, the weight gradient).
enum class WgmmaTile : uint8_t {
  Auto, ///< each GEMM's measured default (docs/Runtime.md)
  Wide, ///< 128 x 256 (a GLU tile of 128 + 128 columns)
  Pair, ///< 128 x 256 in 2-CTA clusters sharing B (weight gradient: gradC)
  Cooperative, ///< 128 x 128, both warpgroups on a tile
  PingPong,    ///< 128 x 128, the warpgroups on alternate tiles
};

/// How a device all_to_all moves its bytes.
enum class AllToAllTransport : uint8_t {
  Nccl,       ///< NCCL's send/receive kernels
  CopyEngine, ///< the GPUs' copy engines (peer copies, ranks on one host)
};

struct RuntimeOptions {
  /// The variant an executor starts with: a name, a decimal index, or
  /// "auto" (the cost model picks one per call, docs/CostModel.md); empty =
  /// "auto" when the plan holds several variants, else its only one.
  /// ("variant", FLEX_VARIANT)
  std::string variant;
  /// The device profile the automatic choice and explain read (a path
  /// `moe-run --calibrate` wrote); empty, missing, stale or corrupt: the
  /// built-in profile of the backend, with the reason kept for explain.
  /// ("profile", FLEX_PROFILE)
  std::string profile;
  /// With "auto" on one rank: timed calls' measured times overrule the
  /// model among the variants it predicts close to its pick (bounded
  /// exploration; docs/CostModel.md). ("refine_variant", FLEX_REFINE_VARIANT)
  bool refineVariant = true;
  /// NaN/Inf check of every pass's inputs and outputs, on top of
  /// RunOptions::checkNonFinite. ("check_nonfinite", FLEX_CHECK_NAN)
  bool checkNonFinite = false;
  /// Record and replay passes as CUDA graphs, on top of
  /// RunOptions::useGraph. ("cuda_graph", FLEX_CUDA_GRAPH)
  bool cudaGraph = false;
  /// CUDA: exchanges on their own stream, overlapping compute; false queues
  /// them on the compute stream. ("cuda_overlap", FLEX_CUDA_OVERLAP)
  bool cudaOverlap = true;
  /// CUDA: staging of all_to_all rows. ("a2a_staging", FLEX_A2A_STAGING)
  ExchangeStaging a2aStaging = ExchangeStaging::Auto;
  /// CUDA: the grouped GEMMs of a dynamic routing. ("grouped_gemm",
  /// FLEX_GROUPED_GEMM)
  GroupedGemmImpl groupedGemm = GroupedGemmImpl::Auto;
  /// CUDA: a fixed capacity's ReLU in cuBLASLt's epilogue (one pass over c
  /// less; ~8% of C3's forward on an H100). cuBLASLt documents its ReLU as
  /// max(x, 0); measured (cuBLAS 13, H100) it keeps a NaN product NaN as the
  /// epilogue kernel does, and CudaStaticGemm.ReluKeepsNaNOnEveryPath checks
  /// that on the GPU. ("relu_in_gemm", FLEX_RELU_IN_GEMM)
  bool reluInGemm = true;
  /// CUDA on Hopper: Flex's wgmma grouped kernel for the expert GEMMs
  /// (HopperGemmKernel.cuh; docs/Runtime.md). Off: the mma.sync kernel and
  /// the cuBLAS paths, as on other GPUs. On by default since its whole GPU
  /// suite passes on an H100 (bench/RESULTS.md Run 39; Run 33's stalled
  /// shard was the ping-pong weight gradient's hang, fixed). No effect on
  /// other GPUs. ("wgmma", FLEX_WGMMA)
  bool wgmma = true;
  /// CUDA on Hopper with `wgmma`: the wgmma kernel's tile shape (auto: each
  /// GEMM's default; a fixed shape for measuring or tuning a layer).
  /// ("wgmma_tile", FLEX_WGMMA_TILE)
  WgmmaTile wgmmaTile = WgmmaTile::Auto;
  /// CUDA: the streams a dynamic routing's per-expert cuBLAS GEMMs spread
  /// over (1..8; 1 = one after another on the compute stream). Uneven
  /// experts of a few hundred to a few thousand rows each leave SMs idle one
  /// at a time (bench/RESULTS.md Run 29: C3 dropless's per-expert GEMMs
  /// 1.4x the padded batch). Two measured best on an H100 (Run 37: C3
  /// dropless forward 2658 against 2789 us on one stream, backward 4925
  /// against 5370; four streams 2746 and 5016). ("gemm_streams",
  /// FLEX_GEMM_STREAMS)
  int gemmStreams = 2;
  /// The most the executor's own workspace may grow to, in MiB (0: no
  /// bound). It grows to the largest variant run on it (each variant's
  /// `workspace_bytes`), so a plan carrying a memory-hungry variant beside
  /// lean ones (C3 dropless's padded layout: 14.8 GiB in training, against
  /// 1.4 for ragged) pays for it only where it runs; with this bound, auto
  /// leaves out the variants that need more, and naming one is an error. A
  /// caller's workspace bounds the variants by its own size instead. One-
  /// rank plans only: on several ranks the choice must agree, so nothing
  /// is left out. ("max_workspace_mib", FLEX_MAX_WORKSPACE_MIB)
  int64_t maxWorkspaceMib = 0;
  int64_t maxWorkspaceBytes() const {
    return maxWorkspaceMib > 0 ? maxWorkspaceMib << 20
                               : std::numeric_limits<int64_t>::max();
  }
  /// NCCL communicators: the all_to_all transport; rank 0's choice holds
  /// for every rank. ("a2a_transport", FLEX_A2A_TRANSPORT)
  AllToAllTransport a2aTransport = AllToAllTransport::Nccl;
  /// Seconds every collective (and joining, and a device backend's final
  /// drain) may wait; > 0. ("collective_timeout_s",
  /// FLEX_COLLECTIVE_TIMEOUT_S)
  double collectiveTimeoutSeconds = kDefaultCollectiveTimeoutSeconds;

  /// The environment variables fromEnvironment applied, in table order.
  std::vector<std::string> environmentOverrides;

  /// Sets option `name` from its text form (what its environment variable
  /// holds). InvalidArgument naming the option and the allowed values when
  /// the text is not one of them; NotFound for an unknown name.
  Status set(std::string_view name, std::string_view value);
  /// The text form of option `name` (NotFound for an unknown name).
  Status get(std::string_view name, std::string &value) const;

  /// `base` with every set, non-empty FLEX_* variable of the table applied
  /// on top. InvalidArgument naming the variable and the allowed values
  /// when one holds a bad value (`result` is then `base`).
  static Status fromEnvironment(const RuntimeOptions &base,
                                RuntimeOptions &result);

  /// The options and their environment variables, in a fixed order.
  struct Entry {
    const char *name;
    const char *environment;
  };
  static const std::vector<Entry> &entries();
};

} // namespace flex

#endif // FLEX_RUNTIME_CORE_RUNTIMEOPTIONS_H
