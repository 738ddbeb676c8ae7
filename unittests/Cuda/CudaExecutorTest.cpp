//===- CudaExecutorTest.cpp - Whole layers on the CUDA backend ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs whole plans through the Executor on the CUDA backend: the
// hand-written plans of unittests/Runtime/plans and plans made by the
// compiler (unittests/Cuda/plans, from examples/*.mlir with
// `moe-opt --moe-lower-to-plan="training=true" | moe-translate
// --moert-to-plan`). Every variant's forward and backward is compared with
// the fp64 reference ([num-1]) and with the CPU backend on fresh random
// inputs, outputs poisoned first; CUDA-graph replay must equal eager runs;
// the C API runs the "cuda" context on device pointers and a caller stream.
// The backend has a kernel for every declared step kind.
//
//===----------------------------------------------------------------------===//

#include "CudaTestSupport.h"

#include "flex-c/Flex.h"
#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

using namespace flex;
using flex::cudatest::Buffer;

namespace {

std::string readText(const std::string &path) {
  std::ifstream file(path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

struct PlanFile {
  std::string path;
  std::string label;
};

std::vector<PlanFile> planFiles() {
  std::vector<PlanFile> files;
  for (const char *name :
       {"ffn_fixed_train.json", "ffn_dropless_ragged_train.json",
        "ffn_dropless_ragged_train_bf16.json", "gated_bounded_infer.json",
        "gated_fixed_train.json"})
    files.push_back({std::string(FLEX_RUNTIME_PLANS_DIR) + "/" + name, name});
  // The *_gather_* plans hold the gather-fused variant (single+gather) of
  // the default pipeline beside the unfused one; *_act_backward_* also the
  // backward-fused copies of both (fuse-activation-backward=true),
  // *_combine* the combine-fused ones (fuse-combine=true).
  for (const char *name :
       {"small_ffn_train.json", "small_swiglu_bf16_train.json",
        "small_swiglu_bf16_gather_train.json",
        "decode_ffn_bias_bf16_gather_train.json",
        "decode_ffn_bias_bf16_act_backward_train.json",
        "decode_swiglu_bf16_act_backward_train.json",
        "decode_ffn_bias_bf16_combine.json",
        "decode_swiglu_bf16_combine_train.json"})
    files.push_back({std::string(FLEX_CUDA_PLANS_DIR) + "/" + name, name});
  return files;
}

/// Device buffers for every argument of a plan, with host copies.
struct DeviceArguments {
  const Plan &plan;
  std::map<std::string, Buffer> buffers;

  explicit DeviceArguments(const Plan &plan) : plan(plan) {
    for (const Argument &arg : plan.arguments)
      buffers.emplace(arg.name, Buffer(arg.dtype, arg.numElements()));
  }
  void set(const std::string &name, const std::vector<double> &values) {
    auto it = buffers.find(name);
    if (it != buffers.end())
      it->second.set(values);
  }
  void poison(ArgumentRole role) {
    for (const Argument &arg : plan.arguments)
      if (arg.role == role)
        buffers.at(arg.name).poison();
  }
  std::vector<double> get(const std::string &name) {
    Buffer &buffer = buffers.at(name);
    buffer.download();
    std::vector<double> values(buffer.count);
    for (size_t i = 0; i < buffer.count; ++i)
      values[i] = buffer.at(i);
    return values;
  }
  std::vector<Binding> bindings() {
    std::vector<Binding> result;
    for (auto &[name, buffer] : buffers)
      result.push_back({plan.arguments[plan.findArgument(name)].name,
                        buffer.device,
                        static_cast<int64_t>(buffer.host.size())});
    return result;
  }
};

reference::LayerInputs makeInputs(const LayerConfig &config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (;;) {
    reference::LayerInputs inputs = reference::makeRandomInputs(config, rng);
    reference::LayerForward forward =
        reference::referenceForward(config, inputs);
    reference::RoutingMargins margins =
        reference::routingMargins(config, forward.routing);
    // Many tokens always have some max scores closer than 1e-4 apart;
    // fp32 resolves 1e-6.
    if (margins.logitGap > 1e-4 &&
        (!config.batchPrioritized || margins.priorityGap > 1e-6))
      return inputs;
  }
}

const char *const kGradients[] = {"grad_x",  "grad_wg", "grad_w1", "grad_b1",
                                  "grad_w2", "grad_b2", "grad_w3"};

struct LayerData {
  reference::LayerInputs inputs;
  std::vector<double> gradOut;
  double gradLAux = 0.5;
};

LayerData makeData(const LayerConfig &config, uint64_t seed) {
  LayerData data;
  data.inputs = makeInputs(config, seed);
  std::mt19937_64 rng(seed + 1000);
  std::normal_distribution<double> normal;
  data.gradOut.resize(config.tokens * config.modelDim);
  for (double &value : data.gradOut)
    value = normal(rng);
  data.gradOut = reference::roundTo(data.gradOut, config.dtype);
  return data;
}

void fill(DeviceArguments &args, const LayerData &data) {
  args.set("x", data.inputs.x);
  args.set("wg", data.inputs.wg);
  args.set("w1", data.inputs.w1);
  args.set("b1", data.inputs.b1);
  args.set("w2", data.inputs.w2);
  args.set("b2", data.inputs.b2);
  args.set("w3", data.inputs.w3);
  args.set("grad_out", data.gradOut);
  args.set("grad_l_aux", {data.gradLAux});
  args.poison(ArgumentRole::Output);
  args.poison(ArgumentRole::GradOutput);
}

std::unique_ptr<Executor> makeCudaExecutor(std::shared_ptr<const Plan> plan) {
  std::unique_ptr<Backend> backend;
  Status status = createCudaBackend(backend);
  EXPECT_TRUE(status.isOk()) << status.message();
  std::unique_ptr<Executor> executor;
  status = Executor::create(std::move(plan), std::move(backend), executor);
  EXPECT_TRUE(status.isOk()) << status.message();
  return executor;
}

std::shared_ptr<const Plan> loadPlan(const std::string &path) {
  auto plan = std::make_shared<Plan>();
  Status status = parsePlan(readText(path), *plan);
  EXPECT_TRUE(status.isOk()) << path << ": " << status.message();
  return plan;
}

// Every kind StepKinds.def declares has a kernel in the CUDA backend's
// table, as in the CPU backend's
// (StepKernels.TheCpuBackendRunsEveryDeclaredKind).
TEST(CudaStepKernels, TheCudaBackendRunsEveryDeclaredKind) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::unique_ptr<Backend> backend;
  Status status = createCudaBackend(backend);
  ASSERT_TRUE(status.isOk()) << status.message();
  for (int i = 0; i < kNumStepOps; ++i)
    EXPECT_TRUE(backend->implements(static_cast<StepOp>(i)))
        << toString(static_cast<StepOp>(i));
}

TEST(CudaExecutor, EveryPlanAndVariantMatchesTheReference) {
  FLEX_SKIP_WITHOUT_CUDA();
  for (const PlanFile &file : planFiles()) {
    std::shared_ptr<const Plan> plan = loadPlan(file.path);
    const LayerConfig &config = plan->layer;
    double tolerance = config.dtype == DType::F32 ? 1e-5 : 2e-2;
    for (size_t v = 0; v < plan->variants.size(); ++v) {
      for (uint64_t seed : {1, 2}) {
        SCOPED_TRACE(file.label + " variant " + plan->variants[v].name +
                     " seed " + std::to_string(seed));
        // Progress, so a hang names its plan.
        std::fprintf(stderr, "[ plan     ] %s variant %s seed %d\n",
                     file.label.c_str(), plan->variants[v].name.c_str(),
                     static_cast<int>(seed));
        LayerData data = makeData(config, seed);
        int64_t alignment = 1;
        for (const Step &step : plan->variants[v].forward)
          if (step.op == StepOp::Gate)
            alignment = step.attrs.capacityAlignment;
        reference::ReferenceOptions options;
        options.capacityAlignment = alignment;
        reference::LayerForward forward;
        reference::LayerGradients grads;
        if (plan->training)
          grads = reference::referenceBackward(config, data.inputs,
                                               data.gradOut, data.gradLAux,
                                               options, &forward);
        else
          forward = reference::referenceForward(config, data.inputs, options);

        DeviceArguments args(*plan);
        fill(args, data);
        std::unique_ptr<Executor> executor = makeCudaExecutor(plan);
        ASSERT_TRUE(executor->selectVariant(static_cast<int64_t>(v)).isOk());
        std::vector<Binding> bindings = args.bindings();
        Status status = executor->forward(bindings.data(), bindings.size());
        ASSERT_TRUE(status.isOk()) << status.message();
        EXPECT_EQ(executor->lastRunStats().steps.size(),
                  plan->variants[v].forward.size());
        EXPECT_GT(executor->lastRunStats().totalMicros, 0.0);
        EXPECT_LE(reference::relativeL2(args.get("out"), forward.out),
                  tolerance);
        EXPECT_LE(reference::relativeL2(args.get("l_aux"), {forward.lAux}),
                  tolerance);
        if (!plan->training)
          continue;
        status = executor->backward(bindings.data(), bindings.size());
        ASSERT_TRUE(status.isOk()) << status.message();
        const std::vector<double> *want[] = {
            &grads.x,  &grads.wg, &grads.w1, &grads.b1,
            &grads.w2, &grads.b2, &grads.w3};
        for (size_t g = 0; g < std::size(kGradients); ++g)
          if (plan->findArgument(kGradients[g]) >= 0) {
            EXPECT_LE(reference::relativeL2(args.get(kGradients[g]), *want[g]),
                      tolerance)
                << kGradients[g];
          }
      }
    }
  }
}

/// Every argument's bytes after a forward (and, training, a backward) of
/// each `<v><suffix>` variant of the CUDA test plan `file` equal v's.
void expectFusedVariantsEqualTheirOriginals(const char *file,
                                            const std::string &suffix,
                                            bool wgmma) {
  std::shared_ptr<const Plan> plan =
      loadPlan(std::string(FLEX_CUDA_PLANS_DIR) + "/" + file);
  const LayerData data = makeData(plan->layer, 11);
  for (GroupedGemmImpl impl : {GroupedGemmImpl::Auto, GroupedGemmImpl::Device,
                               GroupedGemmImpl::Cublas}) {
    RuntimeOptions options;
    options.groupedGemm = impl;
    options.wgmma = wgmma;
    auto run = [&](const std::string &name) {
      std::map<std::string, std::vector<uint8_t>> bytes;
      DeviceArguments args(*plan);
      fill(args, data);
      std::unique_ptr<Backend> backend;
      EXPECT_TRUE(createCudaBackend(backend, options).isOk());
      std::unique_ptr<Executor> executor;
      EXPECT_TRUE(Executor::create(plan, std::move(backend), executor).isOk());
      EXPECT_TRUE(executor->selectVariant(plan->findVariant(name)).isOk());
      std::vector<Binding> bindings = args.bindings();
      Status status = executor->forward(bindings.data(), bindings.size());
      if (status && plan->training)
        status = executor->backward(bindings.data(), bindings.size());
      EXPECT_TRUE(status.isOk()) << name << ": " << status.message();
      for (auto &[arg, buffer] : args.buffers) {
        buffer.download();
        bytes[arg] = buffer.host;
      }
      return bytes;
    };
    int compared = 0;
    for (const Variant &variant : plan->variants) {
      const std::string fused = variant.name + suffix;
      if (plan->findVariant(fused) < 0)
        continue;
      ++compared;
      SCOPED_TRACE(std::string(file) + " " + variant.name + " grouped_gemm " +
                   std::to_string(static_cast<int>(impl)));
      const auto want = run(variant.name);
      const auto got = run(fused);
      for (const auto &[arg, value] : want)
        EXPECT_TRUE(got.at(arg) == value) << arg << " differs";
    }
    EXPECT_GT(compared, 0) << file << " has no " << suffix << " variant";
  }
}

// Where the fused step runs its GEMM on the engine the original's GEMM runs
// on (the wgmma kernel off: the GEMM on grouped_gemm's path, then the
// derivative in place), each backward-fused variant gives its original's
// bytes in every output and gradient, on each grouped_gemm path. (On
// Hopper with wgmma the fused step takes the wgmma kernel where the plain
// GEMM may take another: equal to the same engine's pair,
// CudaDeviceGemm.ActivationBackwardMatchesTheUnfusedStepsAndFp64, and
// within the reference's tolerance, EveryPlanAndVariantMatchesTheReference.)
TEST(CudaExecutor, ActivationBackwardFusedVariantsEqualTheirOriginals) {
  FLEX_SKIP_WITHOUT_CUDA();
  for (const char *file : {"decode_ffn_bias_bf16_act_backward_train.json",
                           "decode_swiglu_bf16_act_backward_train.json"})
    expectFusedVariantsEqualTheirOriginals(file, "+act_backward",
                                           /*wgmma=*/false);
}

// grouped_gemm_combine runs its GEMM where grouped_gemm would (at decode
// the device kernel's few-rows tile, which then sums each token in its
// store; with grouped_gemm=cublas the two steps): each combine-fused
// variant gives its original's bytes in every output (and gradient), wgmma
// on or off, inference and training.
TEST(CudaExecutor, CombineFusedVariantsEqualTheirOriginals) {
  FLEX_SKIP_WITHOUT_CUDA();
  for (bool wgmma : {false, true})
    for (const char *file : {"decode_ffn_bias_bf16_combine.json",
                             "decode_swiglu_bf16_combine_train.json"})
      expectFusedVariantsEqualTheirOriginals(file, "+combine", wgmma);
}

/// Graph replay gives the eager results, and runs with no per-step times.
TEST(CudaExecutor, GraphReplayEqualsEager) {
  FLEX_SKIP_WITHOUT_CUDA();
  int captured = 0;
  for (const PlanFile &file : planFiles()) {
    std::shared_ptr<const Plan> plan = loadPlan(file.path);
    for (size_t v = 0; v < plan->variants.size(); ++v) {
      std::unique_ptr<Executor> executor = makeCudaExecutor(plan);
      if (!executor->backend().canCapturePass(*plan, v, false))
        continue;
      ++captured;
      SCOPED_TRACE(file.label + " variant " + plan->variants[v].name);
      ASSERT_TRUE(executor->selectVariant(static_cast<int64_t>(v)).isOk());
      LayerData data = makeData(plan->layer, 7);
      DeviceArguments args(*plan);
      fill(args, data);
      std::vector<Binding> bindings = args.bindings();
      std::map<std::string, std::vector<uint8_t>> eager;
      auto snapshot = [&]() {
        std::map<std::string, std::vector<uint8_t>> result;
        for (const Argument &arg : plan->arguments)
          if (arg.role == ArgumentRole::Output ||
              arg.role == ArgumentRole::GradOutput) {
            args.buffers.at(arg.name).download();
            result[arg.name] = args.buffers.at(arg.name).host;
          }
        return result;
      };
      RunOptions graph;
      graph.useGraph = true;
      for (int run = 0; run < 4; ++run) {
        args.poison(ArgumentRole::Output);
        args.poison(ArgumentRole::GradOutput);
        Status status = executor->forward(bindings.data(), bindings.size(),
                                          run == 0 ? RunOptions{} : graph);
        ASSERT_TRUE(status.isOk()) << status.message();
        EXPECT_EQ(executor->lastRunStats().replayedGraph, run >= 2) << run;
        if (plan->training) {
          status = executor->backward(bindings.data(), bindings.size(),
                                      run == 0 ? RunOptions{} : graph);
          ASSERT_TRUE(status.isOk()) << status.message();
          EXPECT_EQ(executor->lastRunStats().replayedGraph, run >= 2) << run;
        }
        auto results = snapshot();
        if (run == 0) {
          eager = results;
          continue;
        }
        for (auto &[name, bytes] : results) {
          if (name == "l_aux") {
            // Summed with fp64 atomics: the order may change the last bit.
            float a, b;
            std::memcpy(&a, bytes.data(), 4);
            std::memcpy(&b, eager[name].data(), 4);
            EXPECT_NEAR(a, b, 1e-6 * std::abs(b)) << name << " run " << run;
            continue;
          }
          EXPECT_TRUE(bytes == eager[name]) << name << " run " << run;
        }
      }
    }
  }
  EXPECT_GT(captured, 0) << "no plan has a variant that can be recorded";
}

/// grouped_gemm=device: a dropless bf16 SwiGLU plan records as a graph, and
/// the replays read each call's own routing on the device - new inputs in
/// the same buffers give the reference's results, with no host read.
TEST(CudaExecutor, DroplessGraphRoutesEachCallOnTheDevice) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::shared_ptr<const Plan> plan = loadPlan(std::string(FLEX_CUDA_PLANS_DIR) +
                                              "/small_swiglu_bf16_train.json");
  RuntimeOptions runtime;
  runtime.groupedGemm = GroupedGemmImpl::Device;
  for (size_t v = 0; v < plan->variants.size(); ++v) {
    SCOPED_TRACE("variant " + plan->variants[v].name);
    std::unique_ptr<Backend> backend;
    ASSERT_TRUE(createCudaBackend(backend, runtime).isOk());
    ASSERT_TRUE(backend->canCapturePass(*plan, v, false));
    // Without the wgmma kernel auto's rule sends this plan's prefill-sized
    // GEMMs to cuBLAS after a host read, so its passes stay eager (with it,
    // on a Hopper, up to 512 rows per expert run on the device and the
    // single variant records).
    RuntimeOptions mmaSync;
    mmaSync.wgmma = false;
    std::unique_ptr<Backend> automatic;
    ASSERT_TRUE(createCudaBackend(automatic, mmaSync).isOk());
    EXPECT_FALSE(automatic->canCapturePass(*plan, v, false))
        << "auto keeps dynamic routings eager";
    std::unique_ptr<Executor> executor;
    ASSERT_TRUE(Executor::create(plan, std::move(backend), executor).isOk());
    ASSERT_TRUE(executor->selectVariant(static_cast<int64_t>(v)).isOk());
    DeviceArguments args(*plan);
    std::vector<Binding> bindings = args.bindings();
    RunOptions graph;
    graph.useGraph = true;
    for (uint64_t seed = 1; seed <= 4; ++seed) {
      SCOPED_TRACE("seed " + std::to_string(seed));
      LayerData data = makeData(plan->layer, seed);
      fill(args, data);
      reference::ReferenceOptions options;
      for (const Step &step : plan->variants[v].forward)
        if (step.op == StepOp::Gate)
          options.capacityAlignment = step.attrs.capacityAlignment;
      reference::LayerForward forward;
      reference::LayerGradients grads =
          reference::referenceBackward(plan->layer, data.inputs, data.gradOut,
                                       data.gradLAux, options, &forward);
      Status status =
          executor->forward(bindings.data(), bindings.size(), graph);
      ASSERT_TRUE(status.isOk()) << status.message();
      // The first call runs eagerly, the second records and launches.
      EXPECT_EQ(executor->lastRunStats().replayedGraph, seed >= 2);
      status = executor->backward(bindings.data(), bindings.size(), graph);
      ASSERT_TRUE(status.isOk()) << status.message();
      EXPECT_EQ(executor->lastRunStats().replayedGraph, seed >= 2);
      EXPECT_LE(reference::relativeL2(args.get("out"), forward.out), 2e-2);
      EXPECT_LE(reference::relativeL2(args.get("grad_x"), grads.x), 2e-2);
      EXPECT_LE(reference::relativeL2(args.get("grad_w1"), grads.w1), 2e-2);
      EXPECT_LE(reference::relativeL2(args.get("grad_w2"), grads.w2), 2e-2);
      EXPECT_LE(reference::relativeL2(args.get("grad_w3"), grads.w3), 2e-2);
    }
  }
}

/// The C API: a "cuda" context, device pointers, a caller stream, graphs.
TEST(CudaCAPI, RunsOnDevicePointersAndACallerStream) {
  FLEX_SKIP_WITHOUT_CUDA();
  std::string text =
      readText(std::string(FLEX_RUNTIME_PLANS_DIR) + "/ffn_fixed_train.json");
  FlexContext context = nullptr;
  ASSERT_EQ(flexContextCreate("cuda", &context), FLEX_STATUS_OK)
      << flexGetLastError();
  FlexExecutable exe = nullptr;
  ASSERT_EQ(flexExecutableCreateFromPlan(context, text.data(), text.size(),
                                         &exe),
            FLEX_STATUS_OK)
      << flexGetLastError();
  std::shared_ptr<const Plan> plan =
      loadPlan(std::string(FLEX_RUNTIME_PLANS_DIR) + "/ffn_fixed_train.json");
  LayerData data = makeData(plan->layer, 3);
  DeviceArguments args(*plan);
  fill(args, data);
  std::vector<FlexBinding> bindings;
  for (Binding &b : args.bindings())
    bindings.push_back({b.name.data(), b.data, b.bytes});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
            cudaSuccess);
  FlexRunOptions options{};
  options.struct_size = sizeof(FlexRunOptions);
  options.stream = stream;
  options.flags = FLEX_RUN_CUDA_GRAPH | FLEX_RUN_NO_TIMING;
  for (int run = 0; run < 3; ++run) {
    ASSERT_EQ(
        flexExecutableForward(exe, bindings.data(), bindings.size(), &options),
        FLEX_STATUS_OK)
        << flexGetLastError();
    ASSERT_EQ(
        flexExecutableBackward(exe, bindings.data(), bindings.size(), &options),
        FLEX_STATUS_OK)
        << flexGetLastError();
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  reference::LayerForward forward;
  reference::LayerGradients grads = reference::referenceBackward(
      plan->layer, data.inputs, data.gradOut, data.gradLAux, {}, &forward);
  EXPECT_LE(reference::relativeL2(args.get("out"), forward.out), 1e-5);
  EXPECT_LE(reference::relativeL2(args.get("grad_w1"), grads.w1), 1e-5);
  // The NaN check reads device memory through the backend.
  options.flags = FLEX_RUN_CHECK_NONFINITE;
  EXPECT_EQ(
      flexExecutableForward(exe, bindings.data(), bindings.size(), &options),
      FLEX_STATUS_OK)
      << flexGetLastError();
  args.buffers.at("x").poison();
  EXPECT_EQ(
      flexExecutableForward(exe, bindings.data(), bindings.size(), &options),
      FLEX_STATUS_NUMERIC_ERROR);
  EXPECT_EQ(flexExecutableDestroy(exe), FLEX_STATUS_OK);
  EXPECT_EQ(flexContextDestroy(context), FLEX_STATUS_OK);
  cudaStreamDestroy(stream);
}

} // namespace
