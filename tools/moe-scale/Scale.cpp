//===- Scale.cpp - moe-scale's inputs, their checks and predictions -------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file reads the profile, the node shape and the plans, checks that
// they describe one layer on whole nodes, and predicts every variant of
// every plan with the runtime's cost model (docs/CostModel.md).
//
//===----------------------------------------------------------------------===//

#include "MoeScale.h"

#include "flex/Runtime/PlanLoader.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

using namespace flex;
using namespace flex::moescale;

namespace {

Status invalid(const std::string &message) {
  return Status(StatusCode::InvalidArgument, message);
}

Status readText(const std::string &path, const char *what, std::string &text) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Status(StatusCode::IOError,
                  std::string("cannot read ") + what + " '" + path + "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  text = buffer.str();
  return Status::ok();
}

/// The profile (or the built-in cuda one) with the node shape in use.
Status loadProfile(const Options &options, Result &result) {
  DeviceProfile &profile = result.profile;
  if (options.profilePath.empty()) {
    // Points for no world size: a built-in profile never outranks the node
    // shape anyway (CostModel::usesTopology).
    profile = defaultProfile("cuda", 1);
    result.profileSource = "built-in cuda";
  } else {
    if (Status s = readProfileFile(options.profilePath, profile); !s)
      return s;
    result.profileSource = options.profilePath;
    if (profile.backend != "cuda")
      return invalid("device profile '" + options.profilePath +
                     "' was measured on backend '" + profile.backend +
                     "'; moe-scale predicts GPU ranks: give a cuda profile "
                     "(moe-run --calibrate --device cuda), or none for the "
                     "built-in one");
  }
  std::optional<Topology> topology = profile.topology;
  if (!options.nodeShapePath.empty()) {
    std::string text;
    if (Status s = readText(options.nodeShapePath, "node shape", text); !s)
      return s;
    Topology parsed;
    if (Status s = parseTopology(text, parsed); !s)
      return Status(s.code(), "node shape '" + options.nodeShapePath +
                                  "': " + s.message());
    topology = parsed;
  }
  const bool flags = options.gpusPerNode || options.intra || options.inter;
  if (!topology && !(options.gpusPerNode && options.intra && options.inter))
    return invalid(
        flags ? "the node shape needs --gpus-per-node, --intra and --inter "
                "together (or --node-shape FILE for the rest)"
              : "no node shape: give --node-shape FILE, or --gpus-per-node "
                "N --intra A,L,B --inter A,L,B, or a profile with a "
                "topology (docs/CostModel.md, \"Past the machines\")");
  if (!topology)
    topology = Topology{};
  if (options.gpusPerNode)
    topology->gpusPerNode = *options.gpusPerNode;
  if (options.intra)
    topology->intra = *options.intra;
  if (options.inter)
    topology->inter = *options.inter;
  if (flags)
    topology->source += topology->source.empty() ? "command line"
                                                 : " (with command-line flags)";
  profile.topology = topology;
  return Status::ok();
}

/// What differs between two plans' layers, besides E; empty when none.
std::string layerDifference(const LayerConfig &a, const LayerConfig &b) {
  auto num = [](auto x) {
    std::ostringstream out;
    out << x;
    return out.str();
  };
  auto field = [&](const char *name, const std::string &x,
                   const std::string &y) {
    return x == y ? std::string() : std::string(name) + " " + x + " vs " + y;
  };
  for (std::string diff :
       {field("tokens", num(a.tokens), num(b.tokens)),
        field("model_dim", num(a.modelDim), num(b.modelDim)),
        field("hidden_dim", num(a.hiddenDim), num(b.hiddenDim)),
        field("top_k", num(a.topK), num(b.topK)),
        field("dtype", std::string(toString(a.dtype)),
              std::string(toString(b.dtype))),
        field("expert_kind", std::string(toString(a.expertKind)),
              std::string(toString(b.expertKind))),
        field("capacity_mode", std::string(toString(a.capacityMode)),
              std::string(toString(b.capacityMode))),
        field("capacity_factor", num(a.capacityFactor), num(b.capacityFactor))})
    if (!diff.empty())
      return diff;
  return "";
}

/// The ranks_per_node of the variant's first 2DH exchange (1 < N < its
/// group), 0 when it exchanges flat.
int64_t twoDhRanksPerNode(const Plan &plan, const Variant &variant) {
  for (const std::vector<Step> *steps : {&variant.forward, &variant.backward})
    for (const Step &step : *steps) {
      const int64_t n = step.attrs.ranksPerNode;
      if (step.op == StepOp::AllToAll && n > 1 &&
          n < step.attrs.groupRanks(plan.worldSize))
        return n;
    }
  return 0;
}

/// r and d of a variant named r<R>d<D>; -1 otherwise.
void parseRD(const std::string &name, int64_t &r, int64_t &d) {
  static const std::regex pattern("r([0-9]+)d([0-9]+)");
  std::smatch match;
  if (std::regex_match(name, match, pattern)) {
    r = std::stoll(match[1]);
    d = std::stoll(match[2]);
  }
}

/// Checks one plan against the node shape and the first plan.
Status checkPlan(const std::string &path, const Plan &plan,
                 const Result &result, const Plan *first,
                 const std::string &firstPath) {
  const Options &options = result.options;
  const int64_t perNode = result.profile.topology->gpusPerNode;
  if (options.train && !plan.training)
    return invalid("--train needs training plans: '" + path +
                   "' is an inference plan (compile it with "
                   "--moe-lower-to-plan=\"training=true\")");
  if (plan.worldSize > perNode && plan.worldSize % perNode != 0)
    return invalid("plan '" + path + "' runs on " +
                   std::to_string(plan.worldSize) +
                   " ranks, not whole nodes of " + std::to_string(perNode) +
                   " GPUs (the node shape's gpus_per_node)");
  for (const Variant &variant : plan.variants)
    if (int64_t n = twoDhRanksPerNode(plan, variant); n && n != perNode)
      return invalid("plan '" + path + "' variant '" + variant.name +
                     "' exchanges in 2DH over nodes of " + std::to_string(n) +
                     " ranks (ranks_per_node), but the node shape has " +
                     std::to_string(perNode) +
                     " GPUs per node: compile it with --moe-a2a-2dh="
                     "\"ranks-per-node=" +
                     std::to_string(perNode) + "\"");
  if (first)
    if (std::string diff = layerDifference(first->layer, plan.layer);
        !diff.empty())
      return invalid("plan '" + path + "' holds another layer than '" +
                     firstPath + "': " + diff +
                     " (moe-scale follows one layer over W; only the "
                     "experts may scale with W)");
  return Status::ok();
}

/// What a variant needs on one GPU: the furthest end of the workspace
/// buffers its steps touch (variants share the block from offset 0) and
/// the caller's arguments.
int64_t variantMemory(const Plan &plan, const Variant &variant) {
  int64_t end = 0, arguments = 0;
  for (const std::vector<Step> *steps : {&variant.forward, &variant.backward})
    for (const Step &step : *steps)
      for (const auto *refs : {&step.inputs, &step.outputs})
        for (const BufferRef &ref : *refs)
          if (ref.kind == BufferRef::Kind::Workspace) {
            const WorkspaceBuffer &b = plan.workspace.buffers[ref.index];
            end = std::max(end, b.offset + std::max(b.bytes, b.numBytes()));
          }
  for (const Argument &arg : plan.arguments)
    arguments += arg.numBytes();
  return end + arguments;
}

/// Flat before 2DH, then r (r0 first), then d, then the name.
bool entryOrder(const Entry &a, const Entry &b) {
  return std::tie(a.twoDh, a.fused, a.r, a.d, a.label) <
         std::tie(b.twoDh, b.fused, b.r, b.d, b.label);
}

/// Predicts every variant of `plan` into `point`; a variant another plan
/// already gave (a 2DH plan's variants without a 2DH exchange are its flat
/// twin's) is skipped, or an error when both plans are flat.
/// `seen`: label -> (the plan that gave it, whether that plan has 2DH).
using Seen = std::map<std::string, std::pair<std::string, bool>>;

Status addPlan(const std::string &path, const Plan &plan, const Result &result,
               Seen &seen, Point &point) {
  const Options &options = result.options;
  CostModelOptions base;
  base.overlap = !options.serial;
  base.groupedGemm = options.groupedGemm;
  bool planHas2dh = false;
  for (const Variant &variant : plan.variants)
    planHas2dh = planHas2dh || twoDhRanksPerNode(plan, variant) > 0;
  for (int64_t v = 0; v < static_cast<int64_t>(plan.variants.size()); ++v) {
    const Variant &variant = plan.variants[v];
    const bool twoDh = twoDhRanksPerNode(plan, variant) > 0;
    std::vector<bool> fusedModes = {false};
    if (twoDh && options.copies == Copies::Fused)
      fusedModes = {true};
    if (twoDh && options.copies == Copies::Both)
      fusedModes = {false, true};
    for (bool fused : fusedModes) {
      Entry entry;
      entry.variant = variant.name;
      entry.plan = path;
      entry.twoDh = twoDh;
      entry.fused = fused;
      entry.label =
          variant.name + (twoDh ? (fused ? "+2dh-fused" : "+2dh") : "");
      parseRD(variant.name, entry.r, entry.d);
      entry.memoryBytes = variantMemory(plan, variant);
      entry.fits = static_cast<double>(entry.memoryBytes) <=
                   options.memoryGiB * 1024 * 1024 * 1024;
      if (auto it = seen.find(entry.label); it != seen.end()) {
        if (!twoDh && (planHas2dh || it->second.second))
          continue;
        return invalid("plans '" + it->second.first + "' and '" + path +
                       "' both give variant '" + entry.label +
                       "' for W=" + std::to_string(plan.worldSize));
      }
      seen.emplace(entry.label, std::make_pair(path, planHas2dh));
      CostModelOptions modelOptions = base;
      modelOptions.hierarchicalCopyPerBlock = !fused;
      CostModel model(result.profile, modelOptions);
      entry.forward = model.predict(plan, v, false, options.capacity);
      entry.totalUs = entry.forward.totalUs;
      if (options.train) {
        entry.backward = model.predict(plan, v, true, options.capacity);
        entry.totalUs += entry.backward.totalUs;
      }
      point.entries.push_back(std::move(entry));
    }
  }
  return Status::ok();
}

/// The smallest total among the variants that fit (all when none does),
/// fused-reorder projections only when `fused`; ties keep the first.
int64_t pickWinner(const Point &point, bool fused) {
  int64_t winner = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(point.entries.size()); ++i) {
    const Entry &e = point.entries[i];
    if ((e.fits || !point.anyFits) && (fused || !e.fused) &&
        (winner < 0 || e.totalUs < point.entries[winner].totalUs * (1 - 1e-12)))
      winner = i;
  }
  return winner;
}

} // namespace

Status flex::moescale::runScale(const Options &options, Result &result) {
  result = Result{};
  result.options = options;
  if (options.plans.empty())
    return invalid("no plan given (moe-scale --help)");
  if (Status s = loadProfile(options, result); !s)
    return s;
  std::map<int64_t, Point> points;
  std::map<int64_t, Seen> seen;
  std::unique_ptr<Plan> first;
  for (const std::string &path : options.plans) {
    auto plan = std::make_unique<Plan>();
    if (Status s = loadPlanFile(path, *plan); !s)
      return Status(s.code(), "plan '" + path + "': " + s.message());
    if (Status s =
            checkPlan(path, *plan, result, first.get(), options.plans.front());
        !s)
      return s;
    Point &point = points[plan->worldSize];
    point.worldSize = plan->worldSize;
    point.experts = plan->layer.experts;
    if (first && plan->layer.experts != first->layer.experts)
      result.expertsScale = true;
    if (Status s = addPlan(path, *plan, result, seen[plan->worldSize], point);
        !s)
      return s;
    if (!first) {
      result.layer = plan->layer;
      first = std::move(plan);
    }
  }
  for (auto &[w, point] : points) {
    std::stable_sort(point.entries.begin(), point.entries.end(), entryOrder);
    for (const Entry &e : point.entries)
      point.anyFits = point.anyFits || e.fits;
    point.winner = pickWinner(point, options.copies == Copies::Fused);
    if (options.copies == Copies::Both)
      point.winnerWithFused = pickWinner(point, true);
    result.points.push_back(std::move(point));
  }
  return Status::ok();
}
