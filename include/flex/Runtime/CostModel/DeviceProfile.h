//===- DeviceProfile.h - What a calibration measured ------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// A device profile: the figures the cost model (CostModel.h) turns a step's
// work (StepSchema.h, getStepWork) into time with. A calibration measures
// them on one machine (Calibrate.h) and writes them as JSON; later runs load
// the file. docs/CostModel.md documents the format and the fallback: a
// missing, corrupt or stale profile gives a Status naming the reason and a
// built-in conservative profile for the backend, flagged as such.
//
// MLIR-free and above Core and the plan model only.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COSTMODEL_DEVICEPROFILE_H
#define FLEX_RUNTIME_COSTMODEL_DEVICEPROFILE_H

#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Status.h"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

inline constexpr std::string_view kProfileFormatName = "flex-device-profile";
inline constexpr int kProfileFormatVersion = 2;

/// One measured GEMM shape class. M counts the rows of every group (the
/// whole step's rows), so M * N * K is the step's work / 2.
struct GemmPoint {
  /// Rows per group, and the [m, k] x [k, n] shape of each group's GEMM.
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::F32;
  /// Groups laid out ragged (a dropless or bounded layout) rather than
  /// padded to C rows each.
  bool ragged = false;
  double flopsPerSecond = 0;
  /// GEMMs in one step (the local experts); a version-1 profile's point is
  /// one group of m total rows.
  int64_t groups = 1;
};

/// One step kind's measured cost beside its bytes: the time an eager step
/// of this kind takes is alphaSeconds + its bytes / bytesPerSecond (memory
/// and launch steps) or alphaSeconds + its FLOPs at the GEMM table's rate
/// (GEMM steps). Fitted from a calibration's runs of real plans.
struct StepCostPoint {
  std::string op; ///< the plan step op name ("gate", "dispatch", ...)
  double alphaSeconds = 0;
  /// 0: the profile's memoryBandwidth (and for GEMM steps, unused).
  double bytesPerSecond = 0;
  /// GEMM steps: the measured time over the GEMM table's (a kind whose
  /// GEMMs run unlike the table's, e.g. a weight gradient's).
  double gemmScale = 1;
  /// How many step runs the fit saw (for people).
  int64_t samples = 0;
};

enum class CollectiveKind : uint8_t {
  AllToAll,
  AllGather,
  ReduceScatter,
  AllReduce
};
std::string_view toString(CollectiveKind kind);
std::optional<CollectiveKind> parseCollectiveKind(std::string_view text);

/// time = alpha + bytes / beta, for the bytes one rank sends.
struct CollectivePoint {
  CollectiveKind kind = CollectiveKind::AllToAll;
  int64_t worldSize = 1;
  int64_t groupSize = 1; ///< the ranks one call runs among
  /// "mpi", "local", "nccl", "copy_engine", ... (free text, matched exactly).
  std::string transport;
  double alphaSeconds = 0;
  double betaBytesPerSecond = 1;
};

/// One kind of link between GPUs: a collective phase over it costs
/// alphaSeconds + peers x perPeerSeconds + bytes / betaBytesPerSecond, for
/// the bytes one GPU sends over it (docs/CostModel.md, "Past the machines").
struct LinkFigures {
  double alphaSeconds = 0;
  /// Each further peer a GPU sends a message to (its setup, its latency).
  double perPeerSeconds = 0;
  double betaBytesPerSecond = 1;
};

/// The machine's shape: nodes of gpusPerNode GPUs (ranks r and r' share a
/// node when r / gpusPerNode == r' / gpusPerNode), joined inside a node by
/// `intra` (NVLink) and between nodes by `inter` (InfiniBand, per GPU).
/// With it the cost model prices collectives no measured point covers from
/// the links (Topology.h).
struct Topology {
  int64_t gpusPerNode = 1;
  LinkFigures intra, inter;
  /// Where the figures come from (free text, for people; optional).
  std::string source;
};

/// The CUDA backend's device-sized grouped GEMM (DeviceGroupedGemm.cu), the
/// path of a dynamic grouped GEMM with few rows per expert or in a recorded
/// graph (Core/GroupedGemmRule.h). A step on it costs launchSeconds +
/// max(its FLOPs over its tiles' padded rows / the tile's rate, the bytes it
/// touches / (weightReadEfficiency x the profile's memoryBandwidth))
/// (docs/CostModel.md, "The device-sized grouped GEMM"). The member
/// defaults are one H100's (bench/RESULTS.md Run 20), what a profile
/// without a `device_gemm` object gets.
struct DeviceGemmFigures {
  /// False: the device has no such kernel (compute capability < 8.0, or a
  /// build without sm_80 code); dynamic GEMMs then run per expert.
  bool available = true;
  /// FLOP/s over the padded rows of the small (32 x 128) and the large
  /// (128 x 128) CTA tile.
  double smallFlopsPerSecond = 98e12;
  double largeFlopsPerSecond = 220e12;
  /// FLOP/s of the wgmma kernel's tiles (Hopper), where the backend has it
  /// (CostModelOptions::wgmmaGemm): H100, C3's experts (2026-12-06).
  double wgmmaFlopsPerSecond = 520e12;
  /// The touched weights' read rate over the profile's memoryBandwidth.
  double weightReadEfficiency = 0.96;
  /// The fixed cost of one call (the launch, the count scan, the tail).
  double launchSeconds = 16e-6;
  /// The weight gradient's time per 128 x 128 output tile over the whole
  /// device (every expert's [k, n] slice is tiled, whatever its rows): the
  /// floor of a gradient whose tiles have one or two reduction steps (Run
  /// 23: 68 ns before the kernel staged its C tile through shared memory,
  /// 20 ns after).
  double wgradTileSeconds = 20e-9;
  /// grouped_gemm_combine's combine summed in the kernel's store, in units
  /// of the combine step it replaces (the step's price times this). H100,
  /// the few-rows tile (bench/RESULTS.md Runs 35 and 36): D1's fc2 grew by
  /// 54.5 and 54.7 us where the combine takes 10.6 (5.1x, 5.2x), D2's by 53
  /// and 54.3 where it takes 12 (4.4x, 4.5x); the sums run behind each
  /// tile's store on the SMs the weight-bound GEMM streams with. Fitted by
  /// `moe-run --calibrate` from a plan's timed `+combine` variants.
  double storeCombineSlowdown = 4.8;
  /// Where the figures come from (free text, for people; optional).
  std::string source;
};

struct DeviceProfile {
  std::string deviceName;
  std::string backend = "cpu"; ///< "cpu" or "cuda"
  /// Versions of what was measured through; empty on the CPU.
  std::string driverVersion, cudaVersion, ncclVersion;
  int64_t worldSize = 1;
  int64_t ranksPerNode = 1;
  /// When it was measured (free text, for people).
  std::string created;
  /// What was measured and what was not (free text, for people; optional).
  std::string notes;
  /// A built-in conservative profile, not a measurement (the fallback).
  bool builtin = false;

  std::vector<GemmPoint> gemm;
  /// Per step kind figures fitted from real runs; a kind not listed costs
  /// launchSeconds + bytes / memoryBandwidth (or its GEMM time).
  std::vector<StepCostPoint> steps;
  /// Memory-bound steps: launchSeconds + bytes / memoryBandwidth.
  double memoryBandwidth = 1e9; ///< bytes/s
  double launchSeconds = 0;
  std::vector<CollectivePoint> collectives;
  /// Compute runs this many times slower while an exchange runs beside it
  /// (>= 1; 1 on the CPU backend, whose exchanges do not overlap).
  double overlapSlowdown = 1.0;
  /// An exchange runs this many times slower while compute runs beside it
  /// (>= 1): its kernels wait for SMs the GEMMs hold and share memory
  /// bandwidth with them. Optional in the file (1, none, when absent).
  double exchangeSlowdown = 1.0;
  /// The node shape (optional): collectives without an exact measured
  /// point are priced from its links (Topology.h).
  std::optional<Topology> topology;
  /// The device-sized grouped GEMM's figures (cuda; optional: absent, the
  /// DeviceGemmFigures defaults). Ignored on the cpu backend.
  std::optional<DeviceGemmFigures> deviceGemm;

  /// deviceGemm, else the defaults.
  DeviceGemmFigures deviceGemmFigures() const {
    return deviceGemm ? *deviceGemm : DeviceGemmFigures{};
  }
  /// The FLOP/s of a step of `groups` GEMMs of [m, k] x [k, n]: among the
  /// points of the same dtype and layout (else the same dtype - f16 and
  /// bf16 stand in for each other - else all), the inverse-distance
  /// weighted mean of log(FLOP/s) of the four nearest in (log m, log n,
  /// log k, log groups); an exact match is that point. 0 without points.
  double gemmFlopsPerSecond(int64_t groups, int64_t m, int64_t n, int64_t k,
                            DType dtype, bool ragged) const;
  /// The smallest rows per group among the GEMM points the lookup of
  /// (dtype, ragged) reads; 0 without points.
  int64_t gemmMinRows(DType dtype, bool ragged) const;
  /// The fitted figures of step kind `op`, or nullptr.
  const StepCostPoint *findStep(std::string_view op) const;
  /// The point for (kind, worldSize, groupSize, transport): an exact match,
  /// else the same kind and group size with the nearest world size, else
  /// the same kind with the nearest group size (ties: the first listed);
  /// transport "" matches any. nullptr when the kind was never measured.
  const CollectivePoint *findCollective(CollectiveKind kind, int64_t worldSize,
                                        int64_t groupSize,
                                        std::string_view transport) const;
};

/// What a run expects of a profile: a profile for another backend, world
/// size or device is stale. Empty / <= 0 fields are not checked.
struct ProfileExpectation {
  std::string backend;
  std::string deviceName;
  int64_t worldSize = 0;
};

/// The JSON text of a profile (docs/CostModel.md, "The profile").
std::string writeProfile(const DeviceProfile &profile);
/// Reads a profile; InvalidArgument naming the field ("profile field
/// 'gemm[2].flops_per_s': ...") on a malformed document. Never throws.
Status parseProfile(std::string_view text, DeviceProfile &profile);
/// Reads a node shape alone (a profile's `topology` object, e.g. a file
/// given to moe-scale); InvalidArgument naming the field ("topology field
/// 'inter.beta_bytes_per_s': ...").
Status parseTopology(std::string_view text, Topology &topology);
/// The JSON text of a node shape (the profile's `topology` object).
std::string writeTopology(const Topology &topology);
/// parseProfile of a file; IOError naming the path when it cannot be read.
Status readProfileFile(const std::string &path, DeviceProfile &profile);
Status writeProfileFile(const std::string &path, const DeviceProfile &profile);
/// FailedPrecondition saying what differs when `profile` was measured for
/// another backend, device or world size than `expected`.
Status checkProfile(const DeviceProfile &profile,
                    const ProfileExpectation &expected);

/// The built-in conservative profile of `backend` ("cpu", "cuda") for
/// `worldSize` ranks (builtin = true): slow enough that no variant looks
/// better than it is; docs/CostModel.md lists its figures.
DeviceProfile defaultProfile(std::string_view backend, int64_t worldSize);

/// Loads `path` and checks it against `expected`. On a missing, corrupt or
/// stale file returns the default profile of `expected.backend` and sets
/// `why` to the reason (with "using the built-in <backend> profile"); `why`
/// is OK when the file is used.
DeviceProfile loadProfileOrDefault(const std::string &path,
                                   const ProfileExpectation &expected,
                                   Status &why);

/// The current UTC time as a profile's `created` field writes it
/// ("2026-12-06T02:18:55Z").
std::string utcTimestamp();

} // namespace flex

#endif // FLEX_RUNTIME_COSTMODEL_DEVICEPROFILE_H
