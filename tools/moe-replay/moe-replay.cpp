//===- moe-replay.cpp - Fit step costs to recorded runs and predict them --===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// moe-replay: replays recorded runs through the cost model on the CPU
// (docs/CostModel.md, "Replaying recorded runs"). It reads a manifest, fits
// each step kind's figures to the listed runs' measured per-step times with
// fitStepCosts (the same fit as `moe-run --calibrate PLAN...`, here from
// runs made on other machines, several ranks included), then predicts the
// listed passes and prints the fitted profile and every prediction, step
// by step with each step's basis, as JSON. bench/replay_multi.py drives it.
// MLIR-free: the plan loader and the cost model. Bad usage or input: a
// message naming the cause and exit status 2.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/Calibrate.h"
#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/PlanLoader.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

using namespace flex;
using Json = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {

const char *const kUsage = R"(usage: moe-replay MANIFEST.json

Fits each step kind's cost figures to recorded per-step times of real plans
and predicts passes with the runtime's cost model (docs/CostModel.md,
"Replaying recorded runs"). The manifest (paths relative to its folder):

  {"profile": "base.json",               a cuda or cpu device profile
   "fit": [{"plan": "p.json", "variant": "r1d1", "backward": false,
            "capacity": -1, "steps_us": [12.5, ...]}, ...],
   "predict": [{"plan": "p.json", "variant": "r1d2", "backward": true,
                "capacity": 4200, "overlap": true}, ...]}

"fit" (optional): per pass, the measured mean of every step in the plan's
order (collectives are skipped: fitStepCosts fits compute steps only; a
value <= 0 leaves that step out); the figures fitted replace the profile's
for the kinds sampled. "capacity" -1 counts the static bounds. Prints JSON:
the fitted profile and, per prediction, the total, the stages and every
step (stream, start, duration, rows, bytes, bytes exchanged, FLOPs, the
GEMM table's time).
)";

struct Failure {
  std::string message;
};

[[noreturn]] void fail(const std::string &message) { throw Failure{message}; }

void check(const Status &status, const std::string &context) {
  if (!status)
    fail(context + ": " + status.message());
}

std::string readText(const fs::path &path, const char *what) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    fail(std::string("cannot read ") + what + " '" + path.string() + "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

/// The plans the manifest names, each loaded once.
class Plans {
public:
  explicit Plans(fs::path base) : base_(std::move(base)) {}

  const Plan &get(const std::string &name) {
    auto &slot = plans_[name];
    if (!slot) {
      slot = std::make_unique<Plan>();
      const fs::path path =
          fs::path(name).is_absolute() ? fs::path(name) : base_ / name;
      check(loadPlanFile(path.string(), *slot), "plan '" + path.string() + "'");
    }
    return *slot;
  }

private:
  fs::path base_;
  std::map<std::string, std::unique_ptr<Plan>> plans_;
};

/// One pass named by the manifest: its plan, variant index and capacity.
struct Pass {
  const Plan *plan = nullptr;
  int64_t variant = -1;
  bool backward = false;
  int64_t capacity = -1;
};

Pass readPass(const Json &entry, Plans &plans, const std::string &where) {
  if (!entry.is_object() || !entry.contains("plan") ||
      !entry.contains("variant"))
    fail(where + ": needs \"plan\" and \"variant\"");
  Pass pass;
  const std::string name = entry["plan"].get<std::string>();
  pass.plan = &plans.get(name);
  const std::string variant = entry["variant"].get<std::string>();
  pass.variant = pass.plan->findVariant(variant);
  if (pass.variant < 0)
    fail(where + ": plan '" + name + "' has no variant '" + variant + "'");
  pass.backward = entry.value("backward", false);
  pass.capacity = entry.value("capacity", int64_t{-1});
  if (pass.backward && !pass.plan->training)
    fail(where + ": plan '" + name + "' has no backward (inference plan)");
  return pass;
}

const std::vector<Step> &passSteps(const Pass &pass) {
  const Variant &v = pass.plan->variants[pass.variant];
  return pass.backward ? v.backward : v.forward;
}

/// The samples of one "fit" entry: each compute step's basis for the rows
/// the model counts it for (the prediction's), and its measured time.
void addSamples(const Json &entry, Plans &plans, const CostModel &model,
                const std::string &where, std::vector<StepSample> &samples) {
  const Pass pass = readPass(entry, plans, where);
  const std::vector<Step> &steps = passSteps(pass);
  const Json &times = entry.value("steps_us", Json::array());
  if (!times.is_array() || times.size() != steps.size())
    fail(where + ": \"steps_us\" needs one time per step (" +
         std::to_string(steps.size()) + ")");
  std::vector<double> seconds;
  for (const Json &time : times)
    seconds.push_back(time.is_number() ? time.get<double>() * 1e-6 : 0.0);
  collectStepSamples(model, *pass.plan, pass.variant, pass.backward,
                     pass.capacity, seconds, samples);
}

Json predictionJson(const Pass &pass, const CostModel &model) {
  const Prediction p =
      model.predict(*pass.plan, pass.variant, pass.backward, pass.capacity);
  const std::vector<Step> &steps = passSteps(pass);
  Json out;
  out["total_us"] = p.totalUs;
  Json stages = Json::object();
  for (int s = 0; s < kNumCostStages; ++s)
    stages[std::string(toString(static_cast<CostStage>(s)))] = p.stageUs[s];
  out["stages_us"] = stages;
  Json list = Json::array();
  for (const StepPrediction &step : p.steps) {
    const StepBasis basis =
        model.stepBasis(*pass.plan, steps[step.index], step.rows);
    list.push_back({{"op", std::string(toString(step.op))},
                    {"stage", std::string(toString(step.stage))},
                    {"stream", std::string(toString(step.stream))},
                    {"start_us", step.startUs},
                    {"us", step.us},
                    {"rows", step.rows},
                    {"bytes", basis.bytes},
                    {"bytes_exchanged", basis.bytesExchanged},
                    {"flops", basis.flops},
                    {"gemm_us", basis.gemmSeconds * 1e6}});
  }
  out["steps"] = list;
  return out;
}

Json run(const fs::path &manifestPath) {
  Json manifest;
  try {
    manifest = Json::parse(readText(manifestPath, "manifest"));
  } catch (const nlohmann::json::exception &e) {
    fail("manifest '" + manifestPath.string() + "': " + e.what());
  }
  if (!manifest.is_object() || !manifest.contains("profile"))
    fail("manifest '" + manifestPath.string() + "': needs \"profile\"");
  const fs::path base = manifestPath.parent_path();
  fs::path profilePath = manifest["profile"].get<std::string>();
  if (profilePath.is_relative())
    profilePath = base / profilePath;
  DeviceProfile profile;
  check(readProfileFile(profilePath.string(), profile),
        "profile '" + profilePath.string() + "'");
  Plans plans(base);
  std::vector<StepSample> samples;
  const Json &fit = manifest.value("fit", Json::array());
  for (size_t i = 0; i < fit.size(); ++i)
    addSamples(fit[i], plans, CostModel(profile),
               "fit[" + std::to_string(i) + "]", samples);
  if (!samples.empty())
    fitStepCosts(samples, profile);
  Json out;
  out["samples"] = samples.size();
  out["profile"] = Json::parse(writeProfile(profile));
  Json predictions = Json::array();
  const Json &predict = manifest.value("predict", Json::array());
  for (size_t i = 0; i < predict.size(); ++i) {
    const std::string where = "predict[" + std::to_string(i) + "]";
    const Pass pass = readPass(predict[i], plans, where);
    CostModelOptions options;
    options.overlap = predict[i].value("overlap", true);
    predictions.push_back(predictionJson(pass, CostModel(profile, options)));
  }
  out["predictions"] = predictions;
  return out;
}

} // namespace

int main(int argc, char **argv) {
  if (argc == 2 &&
      (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
    std::cout << kUsage;
    return 0;
  }
  if (argc != 2) {
    std::cerr << "moe-replay: needs one manifest (moe-replay --help)\n";
    return 2;
  }
  try {
    std::cout << run(argv[1]).dump(1) << "\n";
  } catch (const Failure &f) {
    std::cerr << "moe-replay: " << f.message << "\n";
    return 2;
  } catch (const nlohmann::json::exception &e) {
    std::cerr << "moe-replay: manifest '" << argv[1] << "': " << e.what()
              << "\n";
    return 2;
  }
  return 0;
}
