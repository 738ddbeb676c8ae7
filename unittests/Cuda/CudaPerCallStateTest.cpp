//===- CudaPerCallStateTest.cpp - Per-call workspaces and seeds on CUDA ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs FlexRunOptions' per-call state on the "cuda" context
// (docs/CAPI.md, "Per-call workspaces and seeds"): forwards on two device
// workspaces and their backwards in another order (fixed capacity with CUDA
// graphs, where a graph recorded on one workspace must not replay on the
// other; dropless capacity, read back per routing), and the per-call seed of
// the gate noise, with and without graphs. Each result is compared with the
// fp64 reference; workspaces start as NaN bytes. Skips without a device.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"

#include "CAPITestSupport.h"
#include "flex-c/Flex.h"
#include "flex/Reference/ReferenceMoE.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

using namespace flex;
using flex::cudatest::Buffer;
using Json = nlohmann::ordered_json;

namespace {

std::string readPlan(const std::string &name) {
  return flex::test::readTextFile(std::string(FLEX_RUNTIME_PLANS_DIR) + "/" +
                                  name);
}

std::string withNoise(const std::string &name, double noise) {
  return flex::test::withGateNoise(readPlan(name), noise);
}

/// A device workspace of NaN bytes (cudaMalloc aligns to 256).
struct DeviceWorkspace {
  void *data = nullptr;
  int64_t bytes = 0;
  explicit DeviceWorkspace(int64_t bytes) : bytes(bytes) {
    EXPECT_EQ(cudaMalloc(&data, std::max<int64_t>(bytes, 1)), cudaSuccess);
    EXPECT_EQ(cudaMemset(data, 0xff, std::max<int64_t>(bytes, 1)), cudaSuccess);
  }
  DeviceWorkspace(const DeviceWorkspace &) = delete;
  ~DeviceWorkspace() { cudaFree(data); }
};

/// Inputs and grad_out of one call, clear of routing ties under `seeds`.
struct CallData {
  LayerConfig config;
  reference::LayerInputs inputs;
  std::vector<double> gradOut;
  double gradLAux = 0.5;
};

CallData makeData(const LayerConfig &config, uint64_t seed,
                  const std::vector<uint64_t> &seeds) {
  CallData data;
  data.config = config;
  std::mt19937_64 rng(seed);
  for (bool clear = false; !clear;) {
    data.inputs = reference::makeRandomInputs(config, rng);
    clear = true;
    for (uint64_t noiseSeed : seeds) {
      LayerConfig seeded = config;
      seeded.seed = noiseSeed;
      auto routing = reference::referenceRouting(seeded, data.inputs);
      auto margins = reference::routingMargins(seeded, routing);
      clear &= margins.logitGap > 1e-4 &&
               (!config.batchPrioritized || margins.priorityGap > 1e-6);
    }
  }
  std::normal_distribution<double> normal;
  data.gradOut.resize(config.tokens * config.modelDim);
  for (double &value : data.gradOut)
    value = static_cast<float>(normal(rng));
  return data;
}

/// A "cuda" executable and device buffers for its arguments (one set per
/// Arguments object).
class Layer {
public:
  explicit Layer(const std::string &text) {
    EXPECT_EQ(flexContextCreate("cuda", &context_), FLEX_STATUS_OK)
        << flexGetLastError();
    EXPECT_EQ(
        flexExecutableCreateFromPlan(context_, text.data(), text.size(), &exe),
        FLEX_STATUS_OK)
        << flexGetLastError();
    FlexLayerConfig layer;
    EXPECT_EQ(flexExecutableGetLayerConfig(exe, &layer), FLEX_STATUS_OK);
    config = flex::test::toLayerConfig(layer);
    int64_t alignment = 0;
    EXPECT_EQ(flexExecutableGetWorkspaceSize(exe, &workspaceBytes, &alignment),
              FLEX_STATUS_OK);
    EXPECT_LE(alignment, 256);
    int64_t count = 0;
    EXPECT_EQ(flexExecutableGetNumArguments(exe, &count), FLEX_STATUS_OK);
    for (int64_t i = 0; i < count; ++i) {
      FlexArgumentInfo info;
      EXPECT_EQ(flexExecutableGetArgument(exe, i, &info), FLEX_STATUS_OK);
      infos.push_back(info);
    }
  }
  ~Layer() {
    EXPECT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
    EXPECT_EQ(flexContextDestroy(context_), FLEX_STATUS_OK);
  }

  FlexExecutable exe = nullptr;
  LayerConfig config;
  int64_t workspaceBytes = 0;
  std::vector<FlexArgumentInfo> infos;

private:
  FlexContext context_ = nullptr;
};

struct Arguments {
  std::map<std::string, Buffer> buffers;
  std::vector<FlexBinding> bindings;

  explicit Arguments(const Layer &layer) {
    for (const FlexArgumentInfo &info : layer.infos)
      buffers.emplace(
          info.name,
          Buffer(static_cast<DType>(info.dtype),
                 static_cast<size_t>(
                     info.bytes / dtypeSize(static_cast<DType>(info.dtype)))));
    for (const FlexArgumentInfo &info : layer.infos)
      bindings.push_back({info.name, buffers.at(info.name).device, info.bytes});
  }
  void set(const std::string &name, const std::vector<double> &values) {
    auto it = buffers.find(name);
    if (it != buffers.end() && !values.empty())
      it->second.set(values);
  }
  /// The inputs of `data` uploaded; outputs and gradients NaN.
  void fill(const Layer &layer, const CallData &data) {
    set("x", data.inputs.x);
    set("wg", data.inputs.wg);
    set("w1", data.inputs.w1);
    set("b1", data.inputs.b1);
    set("w2", data.inputs.w2);
    set("b2", data.inputs.b2);
    set("w3", data.inputs.w3);
    set("grad_out", data.gradOut);
    set("grad_l_aux", {data.gradLAux});
    for (const FlexArgumentInfo &info : layer.infos)
      if (info.role == FLEX_ROLE_OUTPUT || info.role == FLEX_ROLE_GRAD_OUTPUT)
        buffers.at(info.name).poison();
  }
  std::vector<double> get(const std::string &name) {
    Buffer &buffer = buffers.at(name);
    buffer.download();
    std::vector<double> values(buffer.count);
    for (size_t i = 0; i < buffer.count; ++i)
      values[i] = buffer.at(i);
    return values;
  }
};

FlexStatus runPass(Layer &layer, Arguments &args, bool backward,
                   const DeviceWorkspace *ws, uint32_t flags = 0,
                   std::optional<uint64_t> seed = {}) {
  FlexRunOptions options{};
  options.struct_size = sizeof(FlexRunOptions);
  options.flags = flags | (seed ? FLEX_RUN_SEED : 0);
  options.workspace = ws ? ws->data : nullptr;
  options.workspace_bytes = ws ? ws->bytes : 0;
  options.seed = seed.value_or(0);
  return backward ? flexExecutableBackward(layer.exe, args.bindings.data(),
                                           args.bindings.size(), &options)
                  : flexExecutableForward(layer.exe, args.bindings.data(),
                                          args.bindings.size(), &options);
}

void expectForward(Arguments &args, const CallData &data) {
  auto forward = reference::referenceForward(data.config, data.inputs);
  EXPECT_LE(reference::relativeL2(args.get("out"), forward.out), 1e-5);
}

void expectGradients(const Layer &layer, Arguments &args,
                     const CallData &data) {
  auto grads = reference::referenceBackward(data.config, data.inputs,
                                            data.gradOut, data.gradLAux);
  const std::pair<const char *, const std::vector<double> *> want[] = {
      {"grad_x", &grads.x},   {"grad_wg", &grads.wg}, {"grad_w1", &grads.w1},
      {"grad_b1", &grads.b1}, {"grad_w2", &grads.w2}, {"grad_b2", &grads.b2},
      {"grad_w3", &grads.w3}};
  for (auto [name, values] : want)
    if (args.buffers.count(name)) {
      EXPECT_LE(reference::relativeL2(args.get(name), *values), 1e-5) << name;
    }
}

#define EXPECT_FLEX_OK(call)                                                   \
  EXPECT_EQ(call, FLEX_STATUS_OK) << flexGetLastError()

} // namespace

// The same argument pointers on two workspaces, with graphs: the first round
// runs eagerly, the second records, the third replays. Each workspace keeps
// its own graph; a graph replayed on the wrong workspace would leave the
// other's state stale (or NaN) and its backward wrong.
TEST(CudaPerCallState, GraphsAreKeyedByWorkspace) {
  FLEX_SKIP_WITHOUT_CUDA();
  Layer layer(readPlan("ffn_fixed_train.json"));
  ASSERT_EQ(flexExecutableSelectVariantByName(layer.exe, "padded"),
            FLEX_STATUS_OK);
  Arguments args(layer);
  DeviceWorkspace ws1(layer.workspaceBytes), ws2(layer.workspaceBytes);
  const uint32_t graph = FLEX_RUN_CUDA_GRAPH;
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    CallData a = makeData(layer.config, 100 + 2 * round, {layer.config.seed});
    CallData b = makeData(layer.config, 101 + 2 * round, {layer.config.seed});
    args.fill(layer, a);
    EXPECT_FLEX_OK(runPass(layer, args, false, &ws1, graph));
    expectForward(args, a);
    args.fill(layer, b);
    EXPECT_FLEX_OK(runPass(layer, args, false, &ws2, graph));
    expectForward(args, b);
    EXPECT_FLEX_OK(runPass(layer, args, true, &ws2, graph));
    expectGradients(layer, args, b);
    args.fill(layer, a); // a's backward reads a's inputs
    EXPECT_FLEX_OK(runPass(layer, args, true, &ws1, graph));
    expectGradients(layer, args, a);
  }
}

// Dropless: C is known only on the device and read back per routing; each
// backward needs its own forward's C and row counts.
TEST(CudaPerCallState, DroplessForwardsInterleave) {
  FLEX_SKIP_WITHOUT_CUDA();
  Layer layer(readPlan("ffn_dropless_ragged_train.json"));
  std::vector<CallData> data;
  std::vector<int64_t> capacities;
  for (uint64_t seed = 10; data.size() < 2; ++seed) {
    CallData call = makeData(layer.config, seed, {layer.config.seed});
    int64_t capacity =
        reference::referenceRouting(layer.config, call.inputs).capacity;
    if (!capacities.empty() && capacities.front() == capacity)
      continue;
    capacities.push_back(capacity);
    data.push_back(std::move(call));
  }
  Arguments a(layer), b(layer);
  a.fill(layer, data[0]);
  b.fill(layer, data[1]);
  DeviceWorkspace ws1(layer.workspaceBytes), ws2(layer.workspaceBytes);
  EXPECT_FLEX_OK(runPass(layer, a, false, &ws1));
  EXPECT_FLEX_OK(runPass(layer, b, false, &ws2));
  EXPECT_FLEX_OK(runPass(layer, a, true, &ws1));
  EXPECT_FLEX_OK(runPass(layer, b, true, &ws2));
  expectForward(a, data[0]);
  expectForward(b, data[1]);
  expectGradients(layer, a, data[0]);
  expectGradients(layer, b, data[1]);
  // Without a forward pending there, a backward is refused.
  EXPECT_EQ(runPass(layer, a, true, &ws1), FLEX_STATUS_FAILED_PRECONDITION);
}

// The per-call seed: different seeds route differently, the same seed gives
// the same bits, each backward follows its forward's noise; with graphs the
// seeded passes run step by step, so a new seed is never a stale replay.
TEST(CudaPerCallState, PerCallSeed) {
  FLEX_SKIP_WITHOUT_CUDA();
  Layer layer(withNoise("ffn_fixed_train.json", 2.0));
  ASSERT_EQ(flexExecutableSelectVariantByName(layer.exe, "padded"),
            FLEX_STATUS_OK);
  const uint64_t s1 = 100;
  uint64_t s2 = 101;
  CallData data = makeData(layer.config, 41, {s1, s2});
  auto routingOf = [&](uint64_t seed) {
    LayerConfig seeded = layer.config;
    seeded.seed = seed;
    return reference::referenceRouting(seeded, data.inputs).indices;
  };
  while (routingOf(s1) == routingOf(s2)) {
    ++s2;
    data = makeData(layer.config, 41, {s1, s2});
  }
  CallData d1 = data, d2 = data;
  d1.config.seed = s1;
  d2.config.seed = s2;
  Arguments a(layer), b(layer), c(layer);
  a.fill(layer, d1);
  b.fill(layer, d2);
  c.fill(layer, d1);
  DeviceWorkspace ws1(layer.workspaceBytes), ws2(layer.workspaceBytes),
      ws3(layer.workspaceBytes);
  EXPECT_FLEX_OK(runPass(layer, a, false, &ws1, 0, s1));
  EXPECT_FLEX_OK(runPass(layer, b, false, &ws2, 0, s2));
  EXPECT_FLEX_OK(runPass(layer, c, false, &ws3, 0, s1));
  a.buffers.at("out").download();
  c.buffers.at("out").download();
  EXPECT_TRUE(a.buffers.at("out").host == c.buffers.at("out").host);
  EXPECT_FLEX_OK(runPass(layer, b, true, &ws2));
  EXPECT_FLEX_OK(runPass(layer, a, true, &ws1));
  expectForward(a, d1);
  expectForward(b, d2);
  expectGradients(layer, a, d1);
  expectGradients(layer, b, d2);

  // With graphs, on the same pointers, a new seed each round.
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    CallData seeded = data;
    seeded.config.seed = round % 2 ? s2 : s1;
    a.fill(layer, seeded);
    EXPECT_FLEX_OK(runPass(layer, a, false, &ws1, FLEX_RUN_CUDA_GRAPH,
                           seeded.config.seed));
    EXPECT_FLEX_OK(runPass(layer, a, true, &ws1, FLEX_RUN_CUDA_GRAPH));
    expectForward(a, seeded);
    expectGradients(layer, a, seeded);
  }
}
