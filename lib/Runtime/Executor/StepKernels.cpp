//===- StepKernels.cpp - Steps to a backend's kernels ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the dispatch every backend shares: a step runs the
// kernel its backend registered for its kind, and a kind without one is
// refused by name. The collectives whose work is the communicator's alone
// (all_gather, reduce_scatter) are written once here for all backends.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Comm/Communicator.h"

namespace flex {

Status Backend::runStep(const Plan &plan, const Step &step,
                        const StepOperands &operands) {
  return runKernel(plan, step, operands);
}

Status Backend::runKernel(const Plan &plan, const Step &step,
                          const StepOperands &operands) const {
  const StepKernel &kernel = kernels_[static_cast<int>(step.op)];
  if (!kernel)
    return Status(StatusCode::Unavailable,
                  "step '" + std::string(toString(step.op)) +
                      "' has no kernel in the " + std::string(name()) +
                      " backend; run this plan on a backend that has one");
  return kernel(plan, step, operands);
}

Status Backend::checkRuns(const Plan &plan) const {
  for (const Variant &variant : plan.variants)
    for (bool backward : {false, true}) {
      const std::vector<Step> &steps =
          backward ? variant.backward : variant.forward;
      for (size_t i = 0; i < steps.size(); ++i)
        if (!implements(steps[i].op))
          return Status(StatusCode::Unavailable,
                        "step '" + std::string(toString(steps[i].op)) +
                            "' (variant '" + variant.name + "', " +
                            (backward ? "backward[" : "forward[") +
                            std::to_string(i) + "]) has no kernel in the " +
                            std::string(name()) +
                            " backend; run this plan on a backend that has "
                            "one");
    }
  return Status::ok();
}

Status Backend::gatherOrScatter(Communicator &comm, const Step &step,
                                const StepOperands &ops) {
  using R = OperandRole;
  const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
  const std::string what = std::string(toString(step.op)) + " '" +
                           input.desc->name + "' -> '" + output.desc->name +
                           "'";
  if (step.op == StepOp::AllGather)
    return comm.allGather(input.data, input.desc->numBytes(), output.data,
                          what);
  if (step.op == StepOp::ReduceScatter)
    return comm.reduceScatterSum(input.data, output.data,
                                 output.desc->numElements(), output.desc->dtype,
                                 what);
  return Status(StatusCode::Internal,
                "op '" + std::string(toString(step.op)) +
                    "' is neither all_gather nor reduce_scatter");
}

} // namespace flex
