//===- Report.cpp - moe-scale's table and JSON ----------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file writes moe-scale's results: per W every variant's predicted
// times (forward stages, forward, backward, total), the winner, then one
// line per W with the winner and the best of each family, and where the
// winner's r, d or 2DH changes; or all of it as JSON.
//
//===----------------------------------------------------------------------===//

#include "MoeScale.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <sstream>

using namespace flex;
using namespace flex::moescale;

namespace {

using Json = nlohmann::ordered_json;

std::string format(const char *fmt, double value) {
  char text[64];
  std::snprintf(text, sizeof text, fmt, value);
  return text;
}

std::string layerLine(const Result &result) {
  const LayerConfig &l = result.layer;
  std::ostringstream out;
  out << "T " << l.tokens << " per GPU, d " << l.modelDim << ", h "
      << l.hiddenDim << ", E "
      << (result.expertsScale ? "scaled with W" : std::to_string(l.experts))
      << ", k " << l.topK << ", " << toString(l.expertKind) << ", "
      << toString(l.dtype) << ", capacity " << toString(l.capacityMode);
  if (l.capacityMode != CapacityMode::Dropless)
    out << " " << l.capacityFactor;
  return out.str();
}

std::string linkLine(const LinkFigures &link) {
  return format("alpha %.3g us", link.alphaSeconds * 1e6) +
         format(", %.3g us per peer", link.perPeerSeconds * 1e6) +
         format(", %.4g GB/s", link.betaBytesPerSecond / 1e9);
}

/// The best entry matching `keep`, or -1.
int64_t best(const Point &point, bool (*keep)(const Entry &)) {
  int64_t found = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(point.entries.size()); ++i)
    if (keep(point.entries[i]) &&
        (found < 0 || point.entries[i].totalUs < point.entries[found].totalUs))
      found = i;
  return found;
}

bool isFlat(const Entry &e) { return !e.twoDh && e.r != 0; }
bool isDataParallel(const Entry &e) { return e.r == 0; }

std::string labelAndTime(const Point &point, int64_t index) {
  if (index < 0)
    return "-";
  const Entry &e = point.entries[index];
  return e.label + (e.fits ? "" : "!") + format(" %.0f", e.totalUs);
}

int64_t nodes(const Result &result, int64_t worldSize) {
  const int64_t p = result.profile.topology->gpusPerNode;
  return (worldSize + p - 1) / p;
}

/// What differs between two winners: "r 1 -> 2, d 2 -> 4, 2DH on".
std::string winnerChange(const Entry &a, const Entry &b) {
  std::ostringstream out;
  auto add = [&](const std::string &text) {
    out << (out.tellp() > 0 ? ", " : "") << text;
  };
  if (a.r != b.r)
    add("r " + std::to_string(a.r) + " -> " + std::to_string(b.r));
  if (a.d != b.d)
    add("d " + std::to_string(a.d) + " -> " + std::to_string(b.d));
  if (a.twoDh != b.twoDh)
    add(b.twoDh ? "2DH on" : "2DH off");
  return out.str();
}

/// The runner-up to the winner among the same candidates (no fused
/// projection unless the winner is one), as "label +x%".
std::string runnerUp(const Point &point) {
  const Entry &w = point.entries[point.winner];
  int64_t second = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(point.entries.size()); ++i) {
    const Entry &e = point.entries[i];
    if (i != point.winner && (!e.fused || w.fused) &&
        (second < 0 || e.totalUs < point.entries[second].totalUs))
      second = i;
  }
  if (second < 0)
    return "-";
  const Entry &e = point.entries[second];
  return e.label + (e.fits ? "" : "!") +
         format(" +%.1f%%", (e.totalUs / w.totalUs - 1) * 100);
}

bool isBuiltTwoDh(const Entry &e) { return e.twoDh && !e.fused; }
bool isFusedTwoDh(const Entry &e) { return e.twoDh && e.fused; }

void writeSummary(const Result &result, std::ostringstream &out) {
  const bool both = result.options.copies == Copies::Both;
  out << "winners ("
      << (result.options.train ? "forward + backward" : "forward") << ", us)\n";
  char line[640];
  std::snprintf(line, sizeof line,
                "%6s %6s  %-14s %10s  %-22s %-18s %-22s %-26s %s\n", "W",
                "nodes", "winner", "total_us", "runner-up", "best flat EP",
                "best 2DH", both ? "best 2DH, fused reorder" : "", "r0d1");
  out << line;
  for (const Point &point : result.points) {
    if (point.winner < 0)
      continue;
    const Entry &w = point.entries[point.winner];
    std::snprintf(line, sizeof line,
                  "%6lld %6lld  %-14s %10.0f  %-22s %-18s %-22s %-26s %s\n",
                  static_cast<long long>(point.worldSize),
                  static_cast<long long>(nodes(result, point.worldSize)),
                  (w.label + (w.fits ? "" : "!")).c_str(), w.totalUs,
                  runnerUp(point).c_str(),
                  labelAndTime(point, best(point, isFlat)).c_str(),
                  labelAndTime(point, best(point, isBuiltTwoDh)).c_str(),
                  both ? labelAndTime(point, best(point, isFusedTwoDh)).c_str()
                       : "",
                  labelAndTime(point, best(point, isDataParallel)).c_str());
    out << line;
  }
  out << "  ! = needs more than " << format("%g", result.options.memoryGiB)
      << " GiB per GPU (workspace + arguments)\n";
  for (const Point &point : result.points)
    if (!point.anyFits)
      out << "  W=" << point.worldSize
          << ": no variant fits; the winner is the fastest of all\n";
  auto changes = [&](bool fused) {
    const Entry *previous = nullptr;
    for (const Point &point : result.points) {
      const int64_t index = fused ? point.winnerWithFused : point.winner;
      if (index < 0)
        continue;
      const Entry &w = point.entries[index];
      if (previous && previous->label != w.label)
        out << "  W=" << point.worldSize << ": the winner"
            << (fused ? " with fused 2DH reorders" : "") << " changes from "
            << previous->label << " to " << w.label << " ("
            << winnerChange(*previous, w) << ")\n";
      previous = &w;
    }
  };
  changes(false);
  if (both)
    changes(true);
}

void writePoint(const Result &result, const Point &point,
                std::ostringstream &out) {
  out << "\nW=" << point.worldSize << " (" << nodes(result, point.worldSize)
      << " node(s), E " << point.experts << ")\n";
  char line[512];
  std::snprintf(line, sizeof line,
                "  %-20s %10s %10s %10s %9s %9s %9s %9s %11s %8s\n", "variant",
                "fwd_us", "bwd_us", "total_us", "gate", "dispatch", "experts",
                "combine", "collectives", "mem_GiB");
  out << line;
  for (int64_t i = 0; i < static_cast<int64_t>(point.entries.size()); ++i) {
    const Entry &e = point.entries[i];
    const auto &s = e.forward.stageUs;
    std::string bwd =
        result.options.train ? format("%.1f", e.backward.totalUs) : "-";
    std::string memory =
        format("%.1f", static_cast<double>(e.memoryBytes) / (1 << 30)) +
        (e.fits ? " " : "!");
    std::snprintf(
        line, sizeof line,
        "%c %-20s %10.1f %10s %10.1f %9.1f %9.1f %9.1f %9.1f %11.1f %9s\n",
        i == point.winner ? '*' : ' ', e.label.c_str(), e.forward.totalUs,
        bwd.c_str(), e.totalUs, s[0], s[1], s[2], s[3], s[4], memory.c_str());
    out << line;
  }
}

Json stagesJson(const Prediction &prediction) {
  Json stages = Json::object();
  for (int i = 0; i < kNumCostStages; ++i)
    stages[std::string(toString(static_cast<CostStage>(i)))] =
        prediction.stageUs[i];
  return stages;
}

Json linkJson(const LinkFigures &link) {
  return {{"alpha_s", link.alphaSeconds},
          {"per_peer_s", link.perPeerSeconds},
          {"beta_bytes_per_s", link.betaBytesPerSecond}};
}

} // namespace

std::string flex::moescale::formatText(const Result &result) {
  std::ostringstream out;
  const Topology &t = *result.profile.topology;
  out << "layer    " << layerLine(result) << "; "
      << (result.options.train ? "forward + backward" : "forward")
      << (result.options.serial ? ", serial" : ", overlapped") << "\n";
  out << "profile  " << result.profileSource << " (device "
      << result.profile.deviceName << ")\n";
  out << "nodes    " << t.gpusPerNode << " GPUs per node; NVLink "
      << linkLine(t.intra) << "; network " << linkLine(t.inter) << "\n";
  if (!t.source.empty())
    out << "source   " << t.source << "\n";
  if (!result.options.summaryOnly)
    for (const Point &point : result.points)
      writePoint(result, point, out);
  out << "\n";
  writeSummary(result, out);
  return out.str();
}

std::string flex::moescale::formatJson(const Result &result) {
  const Topology &t = *result.profile.topology;
  const LayerConfig &l = result.layer;
  Json json;
  json["tool"] = "moe-scale";
  json["train"] = result.options.train;
  json["overlap"] = !result.options.serial;
  json["capacity"] = result.options.capacity;
  json["memory_gib"] = result.options.memoryGiB;
  json["layer"] = {{"tokens_per_gpu", l.tokens},
                   {"model_dim", l.modelDim},
                   {"hidden_dim", l.hiddenDim},
                   {"experts", result.expertsScale ? Json("scaled with W")
                                                   : Json(l.experts)},
                   {"top_k", l.topK},
                   {"expert_kind", toString(l.expertKind)},
                   {"dtype", toString(l.dtype)},
                   {"capacity_mode", toString(l.capacityMode)},
                   {"capacity_factor", l.capacityFactor}};
  json["profile"] = {{"source", result.profileSource},
                     {"device", result.profile.deviceName},
                     {"builtin", result.profile.builtin}};
  json["node_shape"] = {{"gpus_per_node", t.gpusPerNode},
                        {"intra", linkJson(t.intra)},
                        {"inter", linkJson(t.inter)},
                        {"source", t.source}};
  Json points = Json::array();
  for (const Point &point : result.points) {
    Json variants = Json::array();
    for (const Entry &e : point.entries) {
      Json v = {{"label", e.label},
                {"variant", e.variant},
                {"plan", e.plan},
                {"r", e.r},
                {"d", e.d},
                {"two_dh", e.twoDh},
                {"fused_reorder", e.fused},
                {"forward_us", e.forward.totalUs},
                {"forward_stages_us", stagesJson(e.forward)}};
      if (result.options.train) {
        v["backward_us"] = e.backward.totalUs;
        v["backward_stages_us"] = stagesJson(e.backward);
      }
      v["total_us"] = e.totalUs;
      v["memory_bytes"] = e.memoryBytes;
      v["fits"] = e.fits;
      variants.push_back(std::move(v));
    }
    points.push_back(
        {{"world_size", point.worldSize},
         {"nodes", nodes(result, point.worldSize)},
         {"experts", point.experts},
         {"any_fits", point.anyFits},
         {"winner",
          point.winner < 0 ? Json() : Json(point.entries[point.winner].label)},
         {"winner_with_fused_2dh",
          point.winnerWithFused < 0
              ? Json()
              : Json(point.entries[point.winnerWithFused].label)},
         {"variants", std::move(variants)}});
  }
  json["points"] = std::move(points);
  return json.dump(2) + "\n";
}
