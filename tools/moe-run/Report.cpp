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

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

using namespace flex;
using namespace flex::moerun;

std::string flex::moerun::layerSummary(const LayerRun &run) {
  const FlexLayerConfig &layer = run.layer;
  std::ostringstream text;
  text << "T=" << layer.tokens << " d=" << layer.model_dim
       << " h=" << layer.hidden_dim << " E=" << layer.experts
       << " k=" << layer.top_k << " "
       << toString(static_cast<CapacityMode>(layer.capacity_mode))
       << (layer.capacity_mode != FLEX_CAPACITY_DROPLESS
               ? "(" + std::to_string(layer.capacity_factor).substr(0, 4) + ")"
               : "")
       << " " << toString(static_cast<ExpertKind>(layer.expert_kind)) << " "
       << toString(static_cast<DType>(layer.dtype));
  if (run.world > 1 && run.plan.shards() > 1)
    text << " W=" << run.world << " (each expert sharded over "
         << run.plan.shards() << " ranks)";
  else if (run.world > 1)
    text << " W=" << run.world << " (L=" << layer.experts / run.world
         << " experts per rank)";
  return text.str();
}

namespace {

void printJson(const Options &options, const LayerRun &run) {
  nlohmann::ordered_json out;
  out["plan"] = options.path;
  out["layer"] = layerSummary(run);
  out["variant"] = run.variantName;
  out["iters"] = options.iters;
  out["seed"] = options.seed;
  out["device"] = options.device;
  out["graph"] = options.graph;
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
                    {"results", list}};
  }
  std::cout << out.dump(2) << "\n";
}

void printTimes(const char *title, const StepTimes &times) {
  double total = times.mean();
  std::printf("%s: %.1f us per call (median %.1f, min %.1f, max %.1f)\n", title,
              total, times.quantile(0.5), times.quantile(0.0),
              times.quantile(1.0));
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
  std::printf("check %s\n", check.failed ? "FAILED" : "passed");
}

void printText(const Options &options, const LayerRun &run) {
  std::printf("plan     %s\n", options.path.c_str());
  std::printf("layer    %s\n", layerSummary(run).c_str());
  std::printf("variant  %s (%lld)   iters %lld   seed %llu   device %s%s\n",
              run.variantName, static_cast<long long>(run.variant),
              static_cast<long long>(options.iters),
              static_cast<unsigned long long>(options.seed),
              options.device.c_str(), options.graph ? " (graph)" : "");
  if (ranks.size > 1)
    std::printf("ranks    %d (MPI); times are the largest over ranks, the "
                "check the worst rank's\n",
                ranks.size);
  printTimes("forward", run.forwardTimes);
  if (options.train)
    printTimes("backward", run.backwardTimes);
  if (options.check)
    printCheck(run.check);
}

} // namespace

void flex::moerun::printReport(const Options &options, const LayerRun &run) {
  if (options.json)
    printJson(options, run);
  else
    printText(options, run);
}
