//===- Gate.cpp - gate, gate_backward and the gate noise ------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the routing of [gate-1..3], [loc-1], [cap-1] and
// [loss-1]: softmax, top-k, slot locations, capacity and the auxiliary loss,
// and the gradient of the logits through the gates and the loss.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace flex::cpu {

namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Selection order of [gate-2]: a beats b when it is larger; NaN loses to
/// every number, so a NaN score never steals a slot from a real one.
bool ranksAbove(float a, float b) {
  if (std::isnan(a))
    return false;
  return std::isnan(b) || a > b;
}

} // namespace

double gateNoiseSample(uint64_t seed, int64_t token, int64_t expert) {
  uint64_t cell = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ull +
                  static_cast<uint64_t>(expert);
  uint64_t h = splitmix64(seed ^ splitmix64(cell));
  constexpr double kTwoPow53 = 0x1p-53;
  double u1 = (static_cast<double>(splitmix64(h) >> 11) + 0.5) * kTwoPow53;
  double u2 = (static_cast<double>(splitmix64(h + 1) >> 11) + 0.5) * kTwoPow53;
  return std::sqrt(-2.0 * std::log(u1)) *
         std::cos(6.283185307179586476925 * u2);
}

void gate(const float *logits, int64_t tokens, int64_t experts,
          const GateAttrs &attrs, const GateOutputs &out) {
  if (experts <= 0)
    return;
  const int64_t k = std::clamp<int64_t>(attrs.topK, 1, experts);
  const bool normalize = attrs.normalize && k > 1;
  const double noiseScale =
      attrs.noise != 0.0 ? attrs.noise / static_cast<double>(experts) : 0.0;

  // Scores, top-k and gates: independent per token.
#pragma omp parallel if (tokens * experts > 8192)
  {
    std::vector<float> noisy(static_cast<size_t>(experts));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const float *logitRow = logits + t * experts;
      float *scoreRow = out.scores + t * experts;
      float maxLogit = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < experts; ++e) {
        float value = logitRow[e];
        if (noiseScale != 0.0)
          value = static_cast<float>(static_cast<double>(value) +
                                     noiseScale *
                                         gateNoiseSample(attrs.seed, t, e));
        noisy[e] = value;
        if (value > maxLogit)
          maxLogit = value;
      }
      // A NaN logit never becomes maxLogit, but exp(NaN) makes the sum and
      // so the whole row NaN, which is what [gate-1] of a NaN means.
      bool anyNaN = false;
      float sum = 0.0f;
      for (int64_t e = 0; e < experts; ++e) {
        anyNaN |= std::isnan(noisy[e]);
        scoreRow[e] = std::exp(noisy[e] - maxLogit);
        sum += scoreRow[e];
      }
      float inverse =
          anyNaN ? std::numeric_limits<float>::quiet_NaN() : 1.0f / sum;
      for (int64_t e = 0; e < experts; ++e)
        scoreRow[e] *= inverse;

      // [gate-2] ranks by the (noisy) logits: softmax is monotonic, and
      // logits do not underflow where fp32 scores of far-behind experts all
      // become 0 and would tie.
      int32_t *indexRow = out.indices + t * k;
      float *gateRow = out.gates + t * k;
      float gateSum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; ++e) {
          if (std::find(indexRow, indexRow + j, static_cast<int32_t>(e)) !=
              indexRow + j)
            continue;
          // Strictly above: ties keep the lower expert index.
          if (best < 0 || ranksAbove(noisy[e], noisy[best]))
            best = e;
        }
        indexRow[j] = static_cast<int32_t>(best);
        gateRow[j] = scoreRow[best];
        gateSum += gateRow[j];
      }
      if (normalize) {
        // std::max(NaN, eps) keeps the NaN.
        float denominator = std::max(gateSum, kGateNormalizeEps);
        for (int64_t j = 0; j < k; ++j)
          gateRow[j] /= denominator;
      }
    }
  }

  // [loss-1] in fp64, in token order: the same bits for any thread count.
  std::vector<double> meanScore(static_cast<size_t>(experts), 0.0);
  std::vector<int64_t> firstChoices(static_cast<size_t>(experts), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float *scoreRow = out.scores + t * experts;
    for (int64_t e = 0; e < experts; ++e)
      meanScore[e] += scoreRow[e];
    ++firstChoices[out.indices[t * k]];
  }
  double lAux = 0.0;
  double tokenCount = static_cast<double>(tokens);
  for (int64_t e = 0; e < experts; ++e)
    lAux += (meanScore[e] / tokenCount) *
            (static_cast<double>(firstChoices[e]) / tokenCount);
  // No tokens: no load to balance.
  *out.lAux = tokens > 0
                  ? static_cast<float>(static_cast<double>(experts) * lAux)
                  : 0.0f;

  // [loc-1] Slot order: choice by choice, tokens in order or by descending
  // max score (the first choice's score), stable.
  std::vector<int64_t> order(static_cast<size_t>(tokens));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (attrs.batchPrioritized) {
    std::vector<float> priority(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t) {
      float top = out.scores[t * experts + out.indices[t * k]];
      priority[t] =
          std::isnan(top) ? -std::numeric_limits<float>::infinity() : top;
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return priority[a] > priority[b];
    });
  }
  std::vector<int64_t> counts(static_cast<size_t>(experts), 0);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t : order) {
      int64_t slot = t * k + j;
      out.locations[slot] = static_cast<int32_t>(counts[out.indices[slot]]++);
    }

  // [cap-1]
  int64_t maxCount = *std::max_element(counts.begin(), counts.end());
  int64_t capacity =
      flex::computeCapacity(attrs.capacityMode, attrs.capacityFactor, tokens,
                            experts, k, maxCount, attrs.capacityAlignment);
  // C beyond i32 only happens with configs verifyLayerConfig rejects; keep
  // the buffer meaningful anyway (no slot reaches it).
  *out.capacity = static_cast<int32_t>(
      std::min<int64_t>(capacity, std::numeric_limits<int32_t>::max()));
  const int64_t align = layoutRowAlignment(attrs.layout);
  int64_t offset = 0;
  for (int64_t e = 0; e < experts; ++e) {
    int64_t rows = std::min(counts[e], capacity);
    out.expertRows[e] = static_cast<int32_t>(rows);
    out.expertOffsets[e] = static_cast<int32_t>(
        attrs.layout == DispatchLayout::Padded ? e * capacity : offset);
    offset += (rows + align - 1) / align * align;
  }
  out.expertOffsets[experts] = static_cast<int32_t>(
      attrs.layout == DispatchLayout::Padded ? experts * capacity : offset);
}

void gateBackward(const float *gradGates, const float *gradLAux,
                  const float *scores, const Routing &routing,
                  const GateBackwardAttrs &attrs, float *gradLogits) {
  const int64_t tokens = routing.tokens;
  const int64_t experts = routing.experts;
  const int64_t k = routing.topK;
  const bool normalize = attrs.normalize && k > 1;

  // d l_aux / d scores[t, e] = E * frac_e / T = E * firstChoices_e / T^2,
  // the same for every token.
  std::vector<float> lossGrad(static_cast<size_t>(experts), 0.0f);
  float lossWeight = gradLAux ? *gradLAux : 0.0f;
  if (lossWeight != 0.0f) {
    std::vector<int64_t> firstChoices(static_cast<size_t>(experts), 0);
    for (int64_t t = 0; t < tokens; ++t)
      ++firstChoices[routing.indices[t * k]];
    double tokenCount = static_cast<double>(tokens);
    for (int64_t e = 0; e < experts; ++e)
      lossGrad[e] = static_cast<float>(
          static_cast<double>(lossWeight) * static_cast<double>(experts) *
          static_cast<double>(firstChoices[e]) / (tokenCount * tokenCount));
  }

#pragma omp parallel if (tokens * experts > 8192)
  {
    std::vector<float> gradScores(static_cast<size_t>(experts));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const float *scoreRow = scores + t * experts;
      const int32_t *indexRow = routing.indices + t * k;
      const float *gradGateRow = gradGates + t * k;
      std::copy(lossGrad.begin(), lossGrad.end(), gradScores.begin());

      if (normalize) {
        // g_j = s_j / max(S, eps): for S > eps,
        // d/ds_j = (dg_j - sum_i dg_i g_i) / S; below eps the denominator
        // is a constant.
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j)
          sum += scoreRow[indexRow[j]];
        if (sum > kGateNormalizeEps) {
          double weighted = 0.0;
          for (int64_t j = 0; j < k; ++j)
            weighted += static_cast<double>(gradGateRow[j]) *
                        (scoreRow[indexRow[j]] / sum);
          for (int64_t j = 0; j < k; ++j)
            gradScores[indexRow[j]] += static_cast<float>(
                (gradGateRow[j] - weighted) / static_cast<double>(sum));
        } else {
          for (int64_t j = 0; j < k; ++j)
            gradScores[indexRow[j]] += gradGateRow[j] / kGateNormalizeEps;
        }
      } else {
        for (int64_t j = 0; j < k; ++j)
          gradScores[indexRow[j]] += gradGateRow[j];
      }

      // Softmax: dl/dz_e = s_e * (dl/ds_e - sum_i dl/ds_i s_i).
      double dot = 0.0;
      for (int64_t e = 0; e < experts; ++e)
        dot += static_cast<double>(gradScores[e]) * scoreRow[e];
      float *gradRow = gradLogits + t * experts;
      for (int64_t e = 0; e < experts; ++e)
        gradRow[e] = static_cast<float>(
            scoreRow[e] * (static_cast<double>(gradScores[e]) - dot));
    }
  }
}

} // namespace flex::cpu
