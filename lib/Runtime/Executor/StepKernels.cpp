//===- StepKernels.cpp - Steps to a backend's kernels ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the dispatch every backend shares: a step runs the
// kernel its backend registered for its kind, and a kind without one is
// refused by name. The collectives whose work is the communicator's alone
// (all_gather, reduce_scatter) are written once here for all backends, and
// all_to_all's description and checks of its capacity.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Comm/Communicator.h"

#include <algorithm>
#include <string>

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

namespace {
using R = OperandRole;

/// "'input' -> 'output'": a collective's buffers, as messages name them.
std::string inputToOutput(const StepOperands &ops) {
  return "'" + ops.in(R::Input).desc->name + "' -> '" +
         ops.out(R::Output).desc->name + "'";
}
} // namespace

Status Backend::collectiveCommunicator(const Step &step,
                                       Communicator *&communicator) {
  return communicatorFor(step, communicator);
}

void Backend::setGatherScatterKernels() {
  auto kernel = [this](const Plan &, const Step &step,
                       const StepOperands &operands) {
    Communicator *communicator = nullptr;
    if (Status status = collectiveCommunicator(step, communicator); !status)
      return status;
    return gatherOrScatter(*communicator, step, operands);
  };
  setKernel(StepOp::AllGather, kernel);
  setKernel(StepOp::ReduceScatter, kernel);
}

Status Backend::gatherOrScatter(Communicator &comm, const Step &step,
                                const StepOperands &ops) {
  const TensorView &input = ops.in(R::Input), &output = ops.out(R::Output);
  const std::string what =
      std::string(toString(step.op)) + " " + inputToOutput(ops);
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

std::string Backend::describeAllToAll(const Step &step,
                                      const StepOperands &ops) {
  const StepAttrs &a = step.attrs;
  return "all_to_all " + std::string(toString(a.direction)) + " " +
         inputToOutput(ops) + ", chunk " + std::to_string(a.chunk) + " of " +
         std::to_string(a.chunks);
}

Status Backend::checkAllToAllRows(const std::string &what, int64_t experts,
                                  int64_t capacity, const Step &step,
                                  const StepOperands &ops) {
  const int64_t chunks = step.attrs.chunks;
  if (capacity % chunks != 0)
    return Status(StatusCode::Internal, what + ": capacity " +
                                            std::to_string(capacity) +
                                            " is not a multiple of the " +
                                            std::to_string(chunks) + " chunks");
  const int64_t inputRows = ops.in(R::Input).desc->shape[0];
  const int64_t outputRows = ops.out(R::Output).desc->shape[0];
  const int64_t rows = experts * capacity;
  if (rows > inputRows || rows > outputRows)
    return Status(StatusCode::Internal,
                  what + ": E * C = " + std::to_string(rows) +
                      " rows exceed the buffers' " +
                      std::to_string(std::min(inputRows, outputRows)));
  return Status::ok();
}

} // namespace flex
