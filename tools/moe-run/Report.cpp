//===- Report.cpp - moe-run's report: times and the check -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements what rank 0 prints after a run: the layer, the
// variant, per-pass and per-step times and the check results, as text or as
// one JSON object (--json). docs/Runtime.md describes both.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

using namespace flex;
using namespace flex::moerun;

namespace {

/// A capacity factor as written in a layer: 1.0, 1.25, 2.0.
std::string factorText(double factor) {
  std::ostringstream text;
  text << factor;
  std::string result = text.str();
  if (result.find_first_of(".e") == std::string::npos)
    result += ".0";
  return result;
}

} // namespace

std::string flex::moerun::layerSummary(const LayerRun &run) {
  const FlexLayerConfig &layer = run.layer;
  auto dtype = [](int32_t type) { return toString(static_cast<DType>(type)); };
  std::ostringstream text;
  // Sizes, then the expert and the capacity and routing as a moe.layer
  // spells them (ffn<gelu> bias, #moe.capacity<fixed 1.25>, normalize).
  text << "T=" << layer.tokens << " d=" << layer.model_dim
       << " h=" << layer.hidden_dim << " E=" << layer.experts
       << " k=" << layer.top_k << " "
       << toString(static_cast<ExpertKind>(layer.expert_kind)) << "<"
       << toString(static_cast<Activation>(layer.activation)) << ">";
  if (layer.expert_kind == FLEX_EXPERT_FFN)
    text << (layer.bias ? " bias" : " no bias");
  text << " " << dtype(layer.dtype);
  if (layer.router_fp32 && layer.dtype != FLEX_DTYPE_F32)
    text << " (router f32)";
  text << ", capacity "
       << toString(static_cast<CapacityMode>(layer.capacity_mode));
  if (layer.capacity_mode != FLEX_CAPACITY_DROPLESS)
    text << " " << factorText(layer.capacity_factor);
  text << ", routing";
  if (!layer.normalize_gate && !layer.batch_prioritized)
    text << " plain"; // weights unnormalized, capacity taken in token order
  if (layer.normalize_gate)
    text << " normalize";
  if (layer.batch_prioritized)
    text << " batch_prioritized";
  if (layer.gate_noise != 0)
    text << " noise " << layer.gate_noise;
  if (run.world > 1 && run.plan.shards() > 1)
    text << ", W=" << run.world << " (each expert sharded over "
         << run.plan.shards() << " ranks)";
  else if (run.world > 1)
    text << ", W=" << run.world << " (L=" << layer.experts / run.world
         << " experts per rank)";
  return text.str();
}

namespace {

void printJson(const Options &options, const LayerRun &run) {
  nlohmann::ordered_json out;
  // What the input is: a plan file, or a .mlir layer compiled in process.
  out[run.isMlir ? "layer_file" : "plan"] = options.path;
  out["layer"] = layerSummary(run);
  out["variant"] = run.variantName;
  out["variant_auto"] = run.automatic;
  out["auto_exploring"] = run.exploring;
  out["workspace_bytes"] = run.variantWorkspaceBytes;
  out["plan_workspace_bytes"] = run.planWorkspaceBytes;
  if (options.explain)
    out["explain"] = nlohmann::ordered_json::parse(run.explainJson);
  out["iters"] = options.iters;
  out["warmup"] = run.warmup;
  out["settle_calls"] = run.settleCalls;
  out["seed"] = options.seed;
  out["device"] = options.device;
  out["graph"] = options.graph;
  if (options.graph)
    out["graph_replays"] = {{"forward", run.forwardReplays},
                            {"backward", run.backwardReplays}};
  out["aligned"] = options.align && ranks.size > 1;
  out["ranks"] = ranks.size;
  auto steps = [&](const StepTimes &times) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (size_t i = 0; i < times.ops.size(); ++i)
      list.push_back(
          {{"index", i}, {"op", times.ops[i]}, {"mean_us", times.stepMean(i)}});
    return list;
  };
  auto pass = [&](const StepTimes &times) {
    return nlohmann::ordered_json{{"mean_us", times.mean()},
                                  {"median_us", times.quantile(0.5)},
                                  {"min_us", times.quantile(0.0)},
                                  {"max_us", times.quantile(1.0)},
                                  {"runs", times.runs.size()},
                                  {"dropped_runs", times.droppedRuns},
                                  {"call_median_us", times.callMedian()},
                                  {"steps", steps(times)}};
  };
  out["forward"] = pass(run.forwardTimes);
  if (options.train)
    out["backward"] = pass(run.backwardTimes);
  if (options.check) {
    const CheckReport &check = run.check;
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const CheckResult &result : check.results)
      list.push_back({{"name", result.name},
                      {"relative_l2", std::isfinite(result.error)
                                          ? nlohmann::ordered_json(result.error)
                                          : nlohmann::ordered_json("inf")},
                      {"pass", result.pass}});
    out["check"] = {{"tolerance", check.tolerance},
                    {"routing_margin", check.routingMargin},
                    {"pass", !check.failed},
                    {"passed", check.passed()},
                    {"results", list}};
  }
  std::cout << out.dump(2) << "\n";
}

void printTimes(const char *title, const StepTimes &times) {
  double total = times.mean();
  std::printf("%s: %.1f us per call (median %.1f, min %.1f, max %.1f)\n", title,
              total, times.quantile(0.5), times.quantile(0.0),
              times.quantile(1.0));
  if (times.droppedRuns > 0)
    std::printf("  (the last %zu timed calls: %lld before them ran another "
                "variant, auto exploring or a new capacity)\n",
                times.runs.size(), static_cast<long long>(times.droppedRuns));
  for (size_t i = 0; i < times.ops.size(); ++i) {
    double mean = times.stepMean(i);
    std::printf("  %2zu %-20s %10.1f us %5.1f%%\n", i, times.ops[i].c_str(),
                mean, total > 0 ? 100.0 * mean / total : 0.0);
  }
}

void printCheck(const CheckReport &check) {
  std::printf("check vs fp64 reference (relative L2, tolerance %.0e):\n",
              check.tolerance);
  for (const CheckResult &result : check.results)
    std::printf("  %-10s %.3e  %s\n", result.name.c_str(), result.error,
                result.pass ? "ok" : "FAIL");
  if (check.failed && check.routingMargin < 1e-5)
    std::printf("  note: the routing margin is %.1e, close to a tie that "
                "fp32 cannot resolve; try another --seed\n",
                check.routingMargin);
  // The verdict, last: how many outputs are within [num-1]'s tolerance.
  int64_t total = static_cast<int64_t>(check.results.size());
  if (!check.failed) {
    std::printf("check passed: %lld of %lld outputs within tolerance\n",
                static_cast<long long>(total), static_cast<long long>(total));
    return;
  }
  std::string failed;
  for (const CheckResult &result : check.results)
    if (!result.pass)
      failed += (failed.empty() ? "" : ", ") + result.name;
  std::printf("check FAILED: %lld of %lld outputs over tolerance (%s)\n",
              static_cast<long long>(total - check.passed()),
              static_cast<long long>(total), failed.c_str());
}

/// --explain as text: the choice, the profile, the capacity, then per
/// variant the predicted time (total and per stage, forward + backward),
/// the measured one and the error.
void printExplain(const LayerRun &run) {
  nlohmann::ordered_json explain =
      nlohmann::ordered_json::parse(run.explainJson);
  const nlohmann::ordered_json &profile = explain["profile"];
  std::printf("explain  %s '%s' (%lld): %s\n",
              explain["automatic"].get<bool>() ? "auto chose" : "named",
              explain["chosen_name"].get<std::string>().c_str(),
              static_cast<long long>(explain["chosen"].get<int64_t>()),
              explain["reason"].get<std::string>().c_str());
  std::string source = profile["source"].get<std::string>();
  std::string path = profile["path"].get<std::string>();
  std::string why = profile["why"].get<std::string>();
  std::printf("profile  %s%s (device %s)%s%s\n", source.c_str(),
              source == "file" ? (" " + path).c_str() : "",
              profile["device"].get<std::string>().c_str(),
              why.empty() ? "" : ": ", why.c_str());
  std::printf("capacity %lld (%s)\n",
              static_cast<long long>(explain["capacity"].get<int64_t>()),
              explain["capacity_source"].get<std::string>().c_str());
  // The name column fits the longest name (fused copies' are long).
  int nameWidth = 12;
  for (const nlohmann::ordered_json &variant : explain["variants"])
    nameWidth = std::max(
        nameWidth, static_cast<int>(variant["name"].get<std::string>().size()));
  std::printf("  %-*s %12s %9s %9s %9s %9s %11s %12s %8s %13s\n", nameWidth,
              "variant", "predicted_us", "gate", "dispatch", "experts",
              "combine", "collectives", "measured_us", "error",
              "workspace_mib");
  for (const nlohmann::ordered_json &variant : explain["variants"]) {
    auto stage = [&](const char *name) {
      return variant["forward_stages_us"][name].get<double>() +
             variant["backward_stages_us"][name].get<double>();
    };
    double measured = 0;
    for (const char *key : {"measured_forward_us", "measured_backward_us"})
      if (!variant[key].is_null())
        measured += variant[key].get<double>();
    char error[32] = "-", measuredText[32] = "-";
    if (!variant["error"].is_null()) {
      std::snprintf(error, sizeof(error), "%+.0f%%",
                    100.0 * variant["error"].get<double>());
      std::snprintf(measuredText, sizeof(measuredText), "%.1f", measured);
    }
    std::printf(
        "%c %-*s %12.1f %9.1f %9.1f %9.1f %9.1f %11.1f %12s %8s %13.1f\n",
        variant["chosen"].get<bool>() ? '*' : ' ', nameWidth,
        variant["name"].get<std::string>().c_str(),
        variant["predicted_us"].get<double>(), stage("gate"), stage("dispatch"),
        stage("experts"), stage("combine"), stage("collectives"), measuredText,
        error, variant["workspace_bytes"].get<double>() / (1 << 20));
  }
}

void printText(const Options &options, const LayerRun &run) {
  // A .mlir input is a layer (compiled here), not a plan.
  if (run.isMlir)
    std::printf("layer    %s (compiled in process)\n         %s\n",
                options.path.c_str(), layerSummary(run).c_str());
  else
    std::printf("plan     %s\nlayer    %s\n", options.path.c_str(),
                layerSummary(run).c_str());
  std::printf(
      "variant  %s (%lld%s)   iters %lld (after %lld warm-up)   seed %llu"
      "   device %s%s\n",
      run.variantName, static_cast<long long>(run.variant),
      run.automatic ? ", auto" : "", static_cast<long long>(options.iters),
      static_cast<long long>(run.warmup),
      static_cast<unsigned long long>(options.seed), options.device.c_str(),
      options.graph ? " (graph)" : "");
  std::printf("memory   workspace %.1f MiB for this variant (%.1f MiB holds "
              "every variant)\n",
              static_cast<double>(run.variantWorkspaceBytes) / (1 << 20),
              static_cast<double>(run.planWorkspaceBytes) / (1 << 20));
  if (ranks.size > 1)
    std::printf("ranks    %d (MPI); times are the largest over ranks, the "
                "check the worst rank's\n",
                ranks.size);
  printTimes("forward", run.forwardTimes);
  if (options.train)
    printTimes("backward", run.backwardTimes);
  if (options.graph)
    std::printf("graph    %lld of %lld timed forwards%s replayed a recorded "
                "graph\n",
                static_cast<long long>(run.forwardReplays),
                static_cast<long long>(options.iters),
                options.train ? (" and " + std::to_string(run.backwardReplays) +
                                 " backwards")
                                    .c_str()
                              : "");
  if (run.settleCalls > 0)
    std::printf("settle   %lld calls untimed while auto measured variants "
                "(--settle)\n",
                static_cast<long long>(run.settleCalls));
  if (run.exploring)
    std::printf("note     auto was still measuring variants at the last call "
                "('%s' ran to be timed, not as its pick): these times are "
                "not its choice's; time more calls (--iters) or let it "
                "settle first (--settle)\n",
                run.variantName);
  if (options.check)
    printCheck(run.check);
  if (options.explain)
    printExplain(run);
}

} // namespace

void flex::moerun::printReport(const Options &options, const LayerRun &run) {
  if (options.json)
    printJson(options, run);
  else
    printText(options, run);
}
