//===- MoeScale.h - moe-scale's options, inputs and results -----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// moe-scale predicts a layer's time per variant for many world sizes from
// plans compiled for each W, a device profile and a node shape
// (docs/CostModel.md, "Past the machines"). MLIR-free: it reads plan files
// and runs the runtime's cost model, nothing else.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_TOOLS_MOESCALE_MOESCALE_H
#define FLEX_TOOLS_MOESCALE_MOESCALE_H

#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace flex::moescale {

/// How a 2DH exchange's block reorders are priced (CostModelOptions).
enum class Copies { PerBlock, Fused, Both };

struct Options {
  std::string profilePath; ///< empty: the built-in cuda profile
  std::string nodeShapePath;
  /// Flags over the file's (or the profile's) node shape.
  std::optional<int64_t> gpusPerNode;
  std::optional<LinkFigures> intra, inter;
  bool train = false;  ///< forward + backward
  bool serial = false; ///< every step on one stream
  /// The CUDA grouped GEMMs' path (RuntimeOptions::groupedGemm).
  GroupedGemmImpl groupedGemm = GroupedGemmImpl::Auto;
  bool json = false;
  bool summaryOnly = false;
  int64_t capacity = -1; ///< C for the model (-1: the static bounds)
  Copies copies = Copies::PerBlock;
  /// GPU memory (GiB): a variant needing more does not fit and wins only
  /// when no variant of its W fits.
  double memoryGiB = 80;
  std::vector<std::string> plans;
};

/// One variant of one plan, predicted.
struct Entry {
  /// The variant's name, "+2dh" when it exchanges in 2DH, "+2dh-fused"
  /// when priced with one reorder kernel per phase.
  std::string label;
  std::string variant, plan;
  int64_t r = -1, d = -1; ///< from the name r<R>d<D>; -1 otherwise
  bool twoDh = false, fused = false;
  Prediction forward, backward; ///< backward only with --train
  double totalUs = 0;           ///< forward, plus backward with --train
  /// The workspace this variant's steps touch (its buffers' furthest end)
  /// plus every argument; the backend's exchange staging not counted.
  int64_t memoryBytes = 0;
  bool fits = true;
};

/// One world size: every variant of its plans.
struct Point {
  int64_t worldSize = 1;
  int64_t experts = 0;
  std::vector<Entry> entries; ///< flat first, by r then d; then 2DH
  /// The fastest variant that fits (the fastest of all when none fits),
  /// among those Flex runs: a 2DH variant priced with a fused reorder is a
  /// projection and takes part only with --2dh-copies fused.
  int64_t winner = -1;
  /// With --2dh-copies both: the same with the fused projections too.
  int64_t winnerWithFused = -1;
  bool anyFits = false;
};

struct Result {
  Options options;
  DeviceProfile profile;     ///< with the node shape in use as its topology
  std::string profileSource; ///< the path, or "built-in cuda"
  LayerConfig layer;         ///< the first plan's
  bool expertsScale = false; ///< E differs between the plans
  std::vector<Point> points; ///< by W
};

/// Parses the command line; InvalidArgument with the usage error.
Status parseOptions(int argc, char **argv, Options &options, bool &help);
const char *usage();

/// Reads the profile, the node shape and the plans, checks that they fit
/// together (one layer, whole nodes, 2DH over the node shape's nodes, no
/// variant twice) and predicts every variant. InvalidArgument (or the
/// loader's status) naming the file and what does not fit.
Status runScale(const Options &options, Result &result);

/// The text report (every variant per W, then the winners) and the JSON.
std::string formatText(const Result &result);
std::string formatJson(const Result &result);

} // namespace flex::moescale

#endif // FLEX_TOOLS_MOESCALE_MOESCALE_H
