//===- PlanCheck.cpp - A plan's run against the fp64 reference ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the comparison moe-run --check and the plan loader's
// fuzz tests share, and the one-rank CPU run of a plan the fuzz tests use to
// check that a plan which loads computes the layer it declares.
//
//===----------------------------------------------------------------------===//

#include "flex/Reference/PlanCheck.h"

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Core/Element.h"
#include "flex/Runtime/Executor.h"

#include <cstring>
#include <limits>
#include <map>
#include <memory>

namespace flex::reference {

double layerTolerance(DType dtype) { return dtype == DType::F32 ? 1e-5 : 2e-2; }

void configureForVariant(const Plan &plan, int64_t variant, LayerConfig &config,
                         ReferenceOptions &options) {
  config = plan.layer;
  options = ReferenceOptions();
  for (const Step &step : plan.variants[variant].forward)
    if (step.op == StepOp::Gate) {
      options.capacityAlignment = step.attrs.capacityAlignment;
      // The gate's attributes are what the plan runs.
      config.gateNoise = step.attrs.noise;
      config.seed = step.attrs.seed;
    }
}

std::vector<OutputCheck> compareOutputs(const ArgumentValues &got,
                                        const LayerForward &forward,
                                        const LayerGradients *grads,
                                        double tolerance) {
  std::vector<OutputCheck> results;
  auto compare = [&](const char *name, const std::vector<double> &want) {
    std::vector<double> values = got(name);
    if (values.empty())
      return;
    double error = relativeL2(values, want);
    results.push_back({name, error, error <= tolerance});
  };
  compare("out", forward.out);
  compare("l_aux", {forward.lAux});
  if (grads) {
    compare("grad_x", grads->x);
    compare("grad_wg", grads->wg);
    compare("grad_w1", grads->w1);
    compare("grad_b1", grads->b1);
    compare("grad_w2", grads->w2);
    compare("grad_b2", grads->b2);
    compare("grad_w3", grads->w3);
  }
  return results;
}

bool PlanRunCheck::pass() const {
  if (!status.isOk() || results.empty())
    return false;
  for (const OutputCheck &result : results)
    if (!result.pass)
      return false;
  return true;
}

std::string PlanRunCheck::describe() const {
  if (!status.isOk())
    return status.message();
  std::string text;
  for (const OutputCheck &result : results)
    if (!result.pass)
      text += (text.empty() ? "" : ", ") + result.name + " error " +
              std::to_string(result.error) + " > " + std::to_string(tolerance);
  return text.empty() ? "every output within " + std::to_string(tolerance)
                      : text;
}

namespace {

/// Random inputs whose routing is not within fp32 rounding of a tie (a few
/// draws at most: a tie the fp32 kernels resolve otherwise is no finding).
LayerInputs drawInputs(const LayerConfig &config,
                       const ReferenceOptions &options, std::mt19937_64 &rng) {
  LayerInputs inputs;
  for (int attempt = 0; attempt < 16; ++attempt) {
    inputs = makeRandomInputs(config, rng);
    RoutingMargins margins =
        routingMargins(config, referenceRouting(config, inputs, options));
    if (margins.logitGap > 1e-4 &&
        (!config.batchPrioritized || margins.priorityGap > 1e-4))
      break;
  }
  return inputs;
}

} // namespace

PlanRunCheck runPlanOnCpu(const Plan &plan, int64_t variant, uint64_t seed) {
  PlanRunCheck check;
  LayerConfig config;
  ReferenceOptions options;
  configureForVariant(plan, variant, config, options);
  check.tolerance = layerTolerance(config.dtype);
  std::mt19937_64 rng(seed);
  LayerInputs inputs = drawInputs(config, options, rng);
  std::normal_distribution<double> normal;
  std::vector<double> gradOut(config.tokens * config.modelDim);
  for (double &value : gradOut)
    value = normal(rng);
  gradOut = roundTo(gradOut, config.dtype);
  const double gradLAux = 0.5;

  // Every argument in its own buffer; outputs and gradients start as NaN so
  // an element no step writes cannot pass.
  std::map<std::string, std::vector<double>> given = {
      {"x", inputs.x},   {"wg", inputs.wg},     {"w1", inputs.w1},
      {"b1", inputs.b1}, {"w2", inputs.w2},     {"b2", inputs.b2},
      {"w3", inputs.w3}, {"grad_out", gradOut}, {"grad_l_aux", {gradLAux}}};
  std::map<std::string, std::vector<uint8_t>> buffers;
  std::vector<Binding> bindings;
  for (const Argument &arg : plan.arguments) {
    std::vector<uint8_t> &bytes = buffers[arg.name];
    bytes.assign(arg.numBytes(), 0);
    auto it = given.find(arg.name);
    bool input =
        arg.role == ArgumentRole::Input || arg.role == ArgumentRole::GradInput;
    size_t count = static_cast<size_t>(arg.numElements());
    for (size_t i = 0; i < count; ++i)
      storeElement(bytes.data(), arg.dtype, i,
                   input && it != given.end() && i < it->second.size()
                       ? it->second[i]
                       : std::numeric_limits<double>::quiet_NaN());
    bindings.push_back(
        {arg.name, bytes.data(), static_cast<int64_t>(bytes.size())});
  }

  std::unique_ptr<Executor> executor;
  auto shared = std::make_shared<const Plan>(plan);
  if (!(check.status = Executor::create(shared, createCpuBackend(),
                                        RuntimeOptions(), executor)))
    return check;
  if (!(check.status = executor->selectVariant(variant)) ||
      !(check.status = executor->forward(bindings.data(), bindings.size())))
    return check;
  if (plan.training &&
      !(check.status = executor->backward(bindings.data(), bindings.size())))
    return check;

  LayerForward forward;
  LayerGradients grads;
  if (plan.training)
    grads =
        referenceBackward(config, inputs, gradOut, gradLAux, options, &forward);
  else
    forward = referenceForward(config, inputs, options);
  auto values = [&](const char *name) {
    int64_t index = plan.findArgument(name);
    std::vector<double> result;
    if (index < 0)
      return result;
    const Argument &arg = plan.arguments[index];
    for (int64_t i = 0; i < arg.numElements(); ++i)
      result.push_back(loadElement(buffers[arg.name].data(), arg.dtype, i));
    return result;
  };
  check.results = compareOutputs(
      values, forward, plan.training ? &grads : nullptr, check.tolerance);
  return check;
}

} // namespace flex::reference
