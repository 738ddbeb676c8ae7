//===- MultiRankTestSupport.cpp - Helpers of the multi-rank tests ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//

#include "MultiRankTestSupport.h"

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Core/Capacity.h"
#include "flex/Runtime/Core/Element.h"
#include "flex/Runtime/PlanLoader.h"

#include <cmath>
#include <gmock/gmock.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

namespace flex::test {

std::string readTestPlan(const std::string &name) {
  std::ifstream file(std::string(FLEX_TEST_PLANS_DIR) + "/" + name);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

uint64_t runSeed() {
  if (const char *fixed = std::getenv("FLEX_TEST_SEED"))
    return std::strtoull(fixed, nullptr, 10);
  return std::random_device{}();
}

void onRanks(int size, const std::function<void(int)> &fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back(fn, r);
  for (std::thread &thread : threads)
    thread.join();
}

std::vector<std::shared_ptr<Communicator>> localRanks(int size,
                                                      double timeout) {
  std::vector<std::shared_ptr<Communicator>> ranks;
  Status status = createLocalCommunicators(size, ranks, timeout);
  EXPECT_TRUE(status.isOk()) << status.message();
  return ranks;
}

void storeValue(std::vector<uint8_t> &bytes, DType type, int64_t i,
                double value) {
  storeElement(bytes.data(), type, i, value);
}

double loadValue(const std::vector<uint8_t> &bytes, DType type, int64_t i) {
  return loadElement(bytes.data(), type, i);
}

void RankBuffers::init(const Plan &p) {
  plan = &p;
  for (const Argument &a : p.arguments)
    data[a.name].assign(a.numBytes(), 0);
  poison();
}

void RankBuffers::poison() {
  for (const Argument &a : plan->arguments)
    if (a.role == ArgumentRole::Output || a.role == ArgumentRole::GradOutput)
      set(a.name,
          std::vector<double>(a.numElements(),
                              std::numeric_limits<double>::quiet_NaN()));
}

void RankBuffers::set(const std::string &name,
                      const std::vector<double> &values) {
  if (!has(name))
    return;
  ASSERT_EQ(static_cast<int64_t>(values.size()), arg(name).numElements())
      << name;
  for (size_t i = 0; i < values.size(); ++i)
    storeValue(data[name], arg(name).dtype, i, values[i]);
}

std::vector<double> RankBuffers::get(const std::string &name) const {
  std::vector<double> values(arg(name).numElements());
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = loadValue(data.at(name), arg(name).dtype, i);
  return values;
}

std::vector<Binding> RankBuffers::bindings() {
  std::vector<Binding> result;
  for (auto &[name, bytes] : data)
    result.push_back(
        {arg(name).name, bytes.data(), static_cast<int64_t>(bytes.size())});
  return result;
}

std::vector<double> expertSlice(const std::vector<double> &global, int64_t rank,
                                int64_t world) {
  if (global.empty())
    return {};
  size_t block = global.size() / world;
  return std::vector<double>(global.begin() + rank * block,
                             global.begin() + (rank + 1) * block);
}

void PrintTo(const PlanVariant &value, std::ostream *os) {
  *os << value.plan << " variant " << value.variant;
}

std::string planVariantName(const ::testing::TestParamInfo<PlanVariant> &info) {
  std::string name = std::string(info.param.plan) + "_" + info.param.variant;
  for (char &c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)))
      c = '_';
  return name;
}

bool makeRankInputs(const LayerConfig &config,
                    const reference::ReferenceOptions &options, int world,
                    std::mt19937_64 &rng, RankInputs &result) {
  result.global = reference::makeRandomInputs(config, rng);
  result.inputs.assign(world, {});
  result.gradOut.assign(world, {});
  for (int r = 0; r < world; ++r) {
    for (int attempt = 0;; ++attempt) {
      if (attempt == 1000) {
        ADD_FAILURE() << "no tie-free tokens for rank " << r;
        return false;
      }
      result.inputs[r] = result.global;
      result.inputs[r].x = reference::makeRandomInputs(config, rng).x;
      reference::RoutingMargins margins = reference::routingMargins(
          config,
          reference::referenceRouting(config, result.inputs[r], options));
      if (margins.logitGap > 1e-3 &&
          (!config.batchPrioritized || margins.priorityGap > 1e-3))
        break;
    }
    std::normal_distribution<double> normal;
    std::vector<double> &gradOut = result.gradOut[r];
    gradOut.resize(config.tokens * config.modelDim);
    for (double &v : gradOut)
      v = normal(rng);
    gradOut = reference::roundTo(gradOut, config.dtype);
  }
  return true;
}

RankReference referenceOnRanks(const LayerConfig &config,
                               const reference::ReferenceOptions &options,
                               const RankInputs &inputs, double gradLAux,
                               bool training) {
  const size_t world = inputs.inputs.size();
  RankReference result;
  result.forward.resize(world);
  result.grads.resize(world);
  for (size_t r = 0; r < world; ++r) {
    if (training)
      result.grads[r] = reference::referenceBackward(
          config, inputs.inputs[r], inputs.gradOut[r], gradLAux, options,
          &result.forward[r]);
    else
      result.forward[r] =
          reference::referenceForward(config, inputs.inputs[r], options);
    for (auto field :
         {&reference::LayerGradients::w1, &reference::LayerGradients::b1,
          &reference::LayerGradients::w2, &reference::LayerGradients::b2,
          &reference::LayerGradients::w3}) {
      std::vector<double> &to = result.expertSum.*field;
      std::vector<double> &magnitude = result.expertAbsSum.*field;
      const std::vector<double> &v = result.grads[r].*field;
      to.resize(v.size(), 0.0);
      magnitude.resize(v.size(), 0.0);
      for (size_t i = 0; i < v.size(); ++i) {
        to[i] += v[i];
        magnitude[i] += std::abs(v[i]);
      }
    }
  }
  return result;
}

double expertFloor(const std::vector<double> &absSum) {
  const double norm = reference::normL2(absSum);
  return norm == 0.0 ? 1.0 : norm;
}

std::vector<ExpertGradient> expertGradients(const RankReference &ref) {
  const reference::LayerGradients &sum = ref.expertSum;
  const reference::LayerGradients &parts = ref.expertAbsSum;
  return {{"grad_w1", &sum.w1, &parts.w1},
          {"grad_b1", &sum.b1, &parts.b1},
          {"grad_w2", &sum.w2, &parts.w2},
          {"grad_b2", &sum.b2, &parts.b2},
          {"grad_w3", &sum.w3, &parts.w3}};
}

std::map<std::string, std::vector<double>>
rankArgumentValues(const RankInputs &inputs, int r, double gradLAux,
                   const ExpertSliceFn &slice) {
  const reference::LayerInputs &global = inputs.global;
  return {
      {"x", inputs.inputs[r].x},      {"wg", global.wg},
      {"w1", slice("w1", global.w1)}, {"b1", slice("b1", global.b1)},
      {"w2", slice("w2", global.w2)}, {"b2", slice("b2", global.b2)},
      {"w3", slice("w3", global.w3)}, {"grad_out", inputs.gradOut[r]},
      {"grad_l_aux", {gradLAux}},
  };
}

Status CpuRankExecutor::create(std::shared_ptr<const Plan> plan,
                               std::shared_ptr<Communicator> comm,
                               uint8_t workspaceFill) {
  const size_t align = plan->workspace.alignment;
  const size_t bytes = (plan->workspace.bytes + align - 1) / align * align;
  workspace.reset(std::aligned_alloc(align, bytes));
  std::memset(workspace.get(), workspaceFill, bytes);
  const int64_t workspaceBytes = plan->workspace.bytes;
  Status s = Executor::create(std::move(plan), createCpuBackend(), executor);
  if (s)
    s = executor->setWorkspace(workspace.get(), workspaceBytes);
  if (s)
    s = executor->setCommunicator(std::move(comm));
  return s;
}

Status runVariant(Executor &executor, int64_t variant,
                  std::vector<Binding> &bindings, bool backward) {
  Status s = executor.selectVariant(variant);
  if (s)
    s = executor.forward(bindings.data(), bindings.size());
  if (s && backward)
    s = executor.backward(bindings.data(), bindings.size());
  return s;
}

std::string swigluInferencePlan(const LayerConfig &layer, DispatchLayout layout,
                                bool gathered) {
  using Json = nlohmann::ordered_json;
  const int64_t T = layer.tokens, d = layer.modelDim, h = layer.hiddenDim;
  const int64_t E = layer.experts, k = std::min(layer.topK, layer.experts);
  const int64_t padded = E * alignedCapacityBound(layer, 1);
  const int64_t R =
      layout == DispatchLayout::Padded ? padded : std::min(T * k, padded);
  const std::string dtype(toString(layer.dtype));
  Json doc;
  doc["format"] = "flex-plan";
  doc["version"] = 2;
  doc["producer"] = "swigluInferencePlan (unittests)";
  doc["layer"] = {{"tokens", T},
                  {"model_dim", d},
                  {"hidden_dim", h},
                  {"experts", E},
                  {"top_k", layer.topK},
                  {"capacity_mode", toString(layer.capacityMode)},
                  {"capacity_factor", layer.capacityFactor},
                  {"expert_kind", "gated"},
                  {"activation", "silu"},
                  {"bias", false},
                  {"dtype", dtype},
                  {"router_fp32", true},
                  {"batch_prioritized", layer.batchPrioritized},
                  {"normalize_gate", layer.normalizeGate},
                  {"gate_noise", 0.0},
                  {"seed", layer.seed}};
  doc["training"] = false;
  auto argument = [](const char *name, const std::string &type,
                     std::vector<int64_t> shape, const char *role) {
    return Json{
        {"name", name}, {"dtype", type}, {"shape", shape}, {"role", role}};
  };
  doc["arguments"] = {argument("x", dtype, {T, d}, "input"),
                      argument("wg", "f32", {d, E}, "input"),
                      argument("w1", dtype, {E, d, h}, "input"),
                      argument("w2", dtype, {E, h, d}, "input"),
                      argument("w3", dtype, {E, d, h}, "input"),
                      argument("out", dtype, {T, d}, "output"),
                      argument("l_aux", "f32", {1}, "output")};
  Json buffers = Json::array();
  int64_t bytes = 0;
  auto buffer = [&](const char *name, const std::string &type,
                    std::vector<int64_t> shape) {
    int64_t size = type == "f32" || type == "i32" ? 4 : 2;
    for (int64_t dim : shape)
      size *= dim;
    buffers.push_back({{"name", name},
                       {"dtype", type},
                       {"shape", shape},
                       {"offset", bytes},
                       {"bytes", size}});
    bytes += (size + 255) / 256 * 256;
  };
  buffer("logits", "f32", {T, E});
  buffer("scores", "f32", {T, E});
  buffer("indices", "i32", {T, k});
  buffer("locations", "i32", {T, k});
  buffer("gates", "f32", {T, k});
  buffer("capacity", "i32", {1});
  buffer("expert_offsets", "i32", {E + 1});
  buffer("expert_rows", "i32", {E});
  if (gathered)
    buffer("row_tokens", "i32", {R});
  else
    buffer("dispatched", dtype, {R, d});
  buffer("gate_proj", dtype, {R, h});
  buffer("up_proj", dtype, {R, h});
  buffer("hidden", dtype, {R, h});
  buffer("expert_out", dtype, {R, d});
  doc["workspace"] = {
      {"bytes", bytes}, {"alignment", 256}, {"buffers", buffers}};

  const Json routing = {{"indices", "indices"},
                        {"locations", "locations"},
                        {"capacity", "capacity"},
                        {"expert_offsets", "expert_offsets"}};
  const Json segments = {{"expert_offsets", "expert_offsets"},
                         {"expert_rows", "expert_rows"}};
  const Json gemmAttrs = {{"trans_b", false},
                          {"epilogue", "none"},
                          {"bias_scale", 1.0},
                          {"accumulate", false}};
  auto gemm = [&](const char *a, const char *b, const char *c, bool rows) {
    Json in = segments;
    in["a"] = a;
    in["b"] = b;
    if (rows)
      in["row_tokens"] = "row_tokens";
    return Json{{"op", "grouped_gemm"},
                {"in", in},
                {"out", {{"c", c}}},
                {"attrs", gemmAttrs}};
  };
  Json forward = Json::array();
  forward.push_back({{"op", "router"},
                     {"in", {{"x", "x"}, {"wg", "wg"}}},
                     {"out", {{"logits", "logits"}}},
                     {"attrs", Json::object()}});
  forward.push_back({{"op", "gate"},
                     {"in", {{"logits", "logits"}}},
                     {"out",
                      {{"scores", "scores"},
                       {"indices", "indices"},
                       {"locations", "locations"},
                       {"gates", "gates"},
                       {"capacity", "capacity"},
                       {"expert_offsets", "expert_offsets"},
                       {"expert_rows", "expert_rows"},
                       {"l_aux", "l_aux"}}},
                     {"attrs",
                      {{"top_k", layer.topK},
                       {"capacity_mode", toString(layer.capacityMode)},
                       {"capacity_factor", layer.capacityFactor},
                       {"normalize", layer.normalizeGate},
                       {"batch_prioritized", layer.batchPrioritized},
                       {"noise", 0.0},
                       {"seed", layer.seed},
                       {"layout", toString(layout)},
                       {"capacity_alignment", 1}}}});
  if (gathered) {
    forward.push_back({{"op", "dispatch_rows"},
                       {"in", routing},
                       {"out", {{"row_tokens", "row_tokens"}}},
                       {"attrs", Json::object()}});
  } else {
    Json in = routing;
    in["x"] = "x";
    forward.push_back({{"op", "dispatch"},
                       {"in", in},
                       {"out", {{"dispatched", "dispatched"}}},
                       {"attrs", Json::object()}});
  }
  const char *a = gathered ? "x" : "dispatched";
  forward.push_back(gemm(a, "w1", "gate_proj", gathered));
  forward.push_back(gemm(a, "w3", "up_proj", gathered));
  Json gluIn = segments;
  gluIn["gate_in"] = "gate_proj";
  gluIn["up_in"] = "up_proj";
  forward.push_back({{"op", "glu"},
                     {"in", gluIn},
                     {"out", {{"c", "hidden"}}},
                     {"attrs", Json::object()}});
  forward.push_back(gemm("hidden", "w2", "expert_out", false));
  Json combineIn = routing;
  combineIn["gates"] = "gates";
  combineIn["expert_out"] = "expert_out";
  forward.push_back({{"op", "combine"},
                     {"in", combineIn},
                     {"out", {{"out", "out"}}},
                     {"attrs", Json::object()}});
  doc["variants"] = {{{"name", "single"}, {"forward", forward}}};
  doc["default_variant"] = 0;
  return doc.dump();
}

int fuseGluSteps(nlohmann::ordered_json &plan, bool keepProducts) {
  using Json = nlohmann::ordered_json;
  int fused = 0;
  for (Json &variant : plan["variants"]) {
    for (const char *pass : {"forward", "backward"})
      if (variant.contains(pass))
        for (Json &step : variant[pass])
          step.erase("facts");
    Json &steps = variant["forward"];
    for (size_t i = 0; i < steps.size(); ++i) {
      if (steps[i]["op"] != "glu")
        continue;
      const Json glu = steps[i];
      // The latest GEMM before the glu writing each of its inputs.
      auto writer = [&](const char *role) {
        for (size_t j = i; j-- > 0;)
          if (steps[j]["op"] == "grouped_gemm" &&
              steps[j]["out"]["c"] == glu["in"][role])
            return j;
        throw std::runtime_error(std::string("no grouped_gemm writes ") + role);
      };
      const size_t g = writer("gate_in"), u = writer("up_in");
      Json in = steps[g]["in"];
      in.erase("bias");
      in["b_up"] = steps[u]["in"]["b"];
      Json out = {{"c", glu["out"]["c"]}};
      if (keepProducts) {
        out["gate_in"] = steps[g]["out"]["c"];
        out["up_in"] = steps[u]["out"]["c"];
      }
      steps[i] = {{"op", "grouped_gemm_glu"},
                  {"in", in},
                  {"out", out},
                  {"attrs", Json::object()}};
      steps.erase(steps.begin() + static_cast<std::ptrdiff_t>(std::max(g, u)));
      steps.erase(steps.begin() + static_cast<std::ptrdiff_t>(std::min(g, u)));
      i -= 2;
      ++fused;
    }
  }
  return fused;
}

int fuseActivationBackwardSteps(nlohmann::ordered_json &plan) {
  using Json = nlohmann::ordered_json;
  int fused = 0;
  for (Json &variant : plan["variants"]) {
    for (const char *pass : {"forward", "backward"})
      if (variant.contains(pass))
        for (Json &step : variant[pass])
          step.erase("facts");
    Json &steps = variant["backward"];
    for (size_t i = 0; i < steps.size(); ++i) {
      const bool glu = steps[i]["op"] == "glu_backward";
      if (steps[i]["op"] != "activation_backward" && !glu)
        continue;
      const Json backward = steps[i];
      size_t g = i;
      while (g-- > 0)
        if (steps[g]["op"] == "grouped_gemm" &&
            steps[g]["out"]["c"] == backward["in"]["grad"])
          break;
      if (g >= i)
        throw std::runtime_error("no grouped_gemm writes the grad");
      Json in = steps[g]["in"];
      if (glu) {
        in["gate_in"] = backward["in"]["gate_in"];
        in["up_in"] = backward["in"]["up_in"];
        steps[i] = {{"op", "grouped_gemm_glu_backward"},
                    {"in", in},
                    {"out", backward["out"]},
                    {"attrs", {{"trans_b", steps[g]["attrs"]["trans_b"]}}}};
      } else {
        in["pre"] = backward["in"]["pre"];
        steps[i] = {{"op", "grouped_gemm_activation_backward"},
                    {"in", in},
                    {"out", {{"c", backward["out"]["grad_pre"]}}},
                    {"attrs",
                     {{"trans_b", steps[g]["attrs"]["trans_b"]},
                      {"activation", backward["attrs"]["activation"]}}}};
      }
      steps.erase(steps.begin() + static_cast<std::ptrdiff_t>(g));
      --i;
      ++fused;
    }
  }
  // The fused step reads its a while it writes c, which the placement of
  // the unfused plan may have overlapped (a dead after the GEMM): every
  // buffer gets bytes of its own.
  if (fused > 0 && plan.contains("workspace")) {
    Json &workspace = plan["workspace"];
    const int64_t alignment = workspace.value("alignment", int64_t{256});
    int64_t offset = 0;
    for (Json &buffer : workspace["buffers"]) {
      buffer["offset"] = offset;
      offset += (buffer["bytes"].get<int64_t>() + alignment - 1) / alignment *
                alignment;
    }
    workspace["bytes"] = std::max<int64_t>(offset, 1);
  }
  return fused;
}

void expectRejectedAfterEdit(
    const std::string &name,
    const std::function<void(nlohmann::ordered_json &)> &edit,
    const std::string &what) {
  nlohmann::ordered_json doc =
      nlohmann::ordered_json::parse(readTestPlan(name));
  edit(doc);
  Plan plan;
  Status status = parsePlan(doc.dump(), plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan) << what;
  EXPECT_THAT(status.message(), ::testing::HasSubstr(what));
}

std::vector<RankBuffers>
makeRankBuffers(const Plan &plan, const RankInputs &inputs, double gradLAux,
                const std::function<ExpertSliceFn(int r)> &sliceFor) {
  const int W = static_cast<int>(plan.worldSize);
  std::vector<RankBuffers> buffers(W);
  for (int r = 0; r < W; ++r) {
    buffers[r].init(plan);
    ExpertSliceFn slice =
        sliceFor ? sliceFor(r)
                 : ExpertSliceFn(
                       [r, W](const char *, const std::vector<double> &global) {
                         return expertSlice(global, r, W);
                       });
    for (const auto &[name, values] :
         rankArgumentValues(inputs, r, gradLAux, slice))
      buffers[r].set(name, values);
  }
  return buffers;
}

} // namespace flex::test
