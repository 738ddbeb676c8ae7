//===- GateBackward.cu - gate_backward on the GPU -------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the gradient of the logits through the gates and the
// [loss-1] auxiliary loss, one thread per token, in the CPU kernel's order
// (moved out of Gate.cu, which holds the forward gate).
//
//===----------------------------------------------------------------------===//

#include "CudaSupport.cuh"

namespace flex::cuda {

//===----------------------------------------------------------------------===//
// gate_backward
//===----------------------------------------------------------------------===//

namespace {

__global__ void firstChoiceKernel(const int32_t *__restrict__ indices,
                                  int64_t tokens, int32_t k,
                                  int32_t *__restrict__ firstChoices) {
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < tokens)
    atomicAdd(&firstChoices[indices[t * k]], 1);
}

__global__ void gateBackwardKernel(
    const float *__restrict__ gradGates, const float *__restrict__ gradLAux,
    const float *__restrict__ scores, const int32_t *__restrict__ indices,
    const int32_t *__restrict__ firstChoices, int64_t tokens, int32_t experts,
    int32_t k, bool normalize, float *__restrict__ gradLogits) {
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens)
    return;
  const float lossWeight = gradLAux ? *gradLAux : 0.0f;
  const double tokenCount = static_cast<double>(tokens);
  const float *scoreRow = scores + t * experts;
  const int32_t *indexRow = indices + t * k;
  const float *gradGateRow = gradGates + t * k;
  // The gradient of the scores is built in the output row, then replaced.
  float *gradRow = gradLogits + t * experts;
  for (int32_t e = 0; e < experts; ++e)
    gradRow[e] = lossWeight != 0.0f
                     ? static_cast<float>(static_cast<double>(lossWeight) *
                                          static_cast<double>(experts) *
                                          static_cast<double>(firstChoices[e]) /
                                          (tokenCount * tokenCount))
                     : 0.0f;
  if (normalize) {
    float sum = 0.0f;
    for (int32_t j = 0; j < k; ++j)
      sum = __fadd_rn(sum, scoreRow[indexRow[j]]);
    if (sum > kGateNormalizeEps) {
      double weighted = 0.0;
      for (int32_t j = 0; j < k; ++j)
        weighted =
            __dadd_rn(weighted, __dmul_rn(static_cast<double>(gradGateRow[j]),
                                          static_cast<double>(__fdiv_rn(
                                              scoreRow[indexRow[j]], sum))));
      for (int32_t j = 0; j < k; ++j)
        gradRow[indexRow[j]] =
            __fadd_rn(gradRow[indexRow[j]],
                      static_cast<float>((gradGateRow[j] - weighted) /
                                         static_cast<double>(sum)));
    } else {
      for (int32_t j = 0; j < k; ++j)
        gradRow[indexRow[j]] = __fadd_rn(
            gradRow[indexRow[j]], __fdiv_rn(gradGateRow[j], kGateNormalizeEps));
    }
  } else {
    for (int32_t j = 0; j < k; ++j)
      gradRow[indexRow[j]] = __fadd_rn(gradRow[indexRow[j]], gradGateRow[j]);
  }
  double dot = 0.0;
  for (int32_t e = 0; e < experts; ++e)
    dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(gradRow[e]),
                                   static_cast<double>(scoreRow[e])));
  for (int32_t e = 0; e < experts; ++e)
    gradRow[e] =
        static_cast<float>(__dmul_rn(static_cast<double>(scoreRow[e]),
                                     static_cast<double>(gradRow[e]) - dot));
}

} // namespace

Status gateBackward(KernelContext &ctx, const float *gradGates,
                    const float *gradLAux, const float *scores,
                    const Routing &routing, const GateBackwardAttrs &attrs,
                    float *gradLogits) {
  const int64_t tokens = routing.tokens;
  const int32_t E = static_cast<int32_t>(routing.experts);
  const int32_t k = static_cast<int32_t>(routing.topK);
  if (tokens <= 0 || E <= 0)
    return Status::ok();
  cudaStream_t stream = ctx.stream();
  void *scratch = nullptr;
  if (Status s = ctx.scratch(0, 4 * E, scratch); !s)
    return s;
  auto *firstChoices = static_cast<int32_t *>(scratch);
  if (Status s = checkCuda(cudaMemsetAsync(firstChoices, 0, 4 * E, stream),
                           "clearing first-choice counts");
      !s)
    return s;
  firstChoiceKernel<<<detail::gridFor(tokens, 256), 256, 0, stream>>>(
      routing.indices, tokens, k, firstChoices);
  if (Status s = checkLaunch("first-choice kernel"); !s)
    return s;
  gateBackwardKernel<<<detail::gridFor(tokens, 128), 128, 0, stream>>>(
      gradGates, gradLAux, scores, routing.indices, firstChoices, tokens, E, k,
      attrs.normalize && k > 1, gradLogits);
  return checkLaunch("gate backward kernel");
}

} // namespace flex::cuda
