//===- ReferenceMoE.cpp - An fp64 reference of one MoE layer --------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the fp64 reference from DESIGN.md section 3: plain
// loops, a dense dispatch tensor disp[E, C, d], every expert applied to all C
// rows (empty rows are computed and never combined), and a hand-written
// backward pass checked against finite differences in its own test.
//
//===----------------------------------------------------------------------===//

#include "flex/Reference/ReferenceMoE.h"

#include "flex/Runtime/Cpu/CpuKernels.h"
#include "flex/Runtime/Core/Half.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace flex::reference {

namespace {

// [gate-3] eps, fp32's machine epsilon (documented beside the kernels).
constexpr double kNormalizeEps = 1.1920928955078125e-7;

double activate(Activation act, double v) {
  switch (act) {
  case Activation::Relu:
    return v > 0.0 ? v : 0.0;
  case Activation::Gelu:
    return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  case Activation::Silu:
    return v / (1.0 + std::exp(-v));
  }
  return v;
}

double activateDerivative(Activation act, double v) {
  switch (act) {
  case Activation::Relu:
    return v > 0.0 ? 1.0 : 0.0;
  case Activation::Gelu:
    return 0.5 * (1.0 + std::erf(v / std::sqrt(2.0))) +
           v * std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
  case Activation::Silu: {
    double s = 1.0 / (1.0 + std::exp(-v));
    return s + v * s * (1.0 - s);
  }
  }
  return 0.0;
}

double silu(double v) { return activate(Activation::Silu, v); }
double siluDerivative(double v) {
  return activateDerivative(Activation::Silu, v);
}

/// Everything the forward computes that the backward reads.
struct DenseState {
  int64_t T = 0, d = 0, h = 0, E = 0, k = 0, C = 0;
  LayerRouting routing;
  std::vector<double> disp;   // [E, C, d]
  std::vector<double> pre;    // [E, C, h] x W1 + b1 (FFN) or x W1 (gated)
  std::vector<double> up;     // [E, C, h] x W3 (gated)
  std::vector<double> hidden; // [E, C, h] act(pre) or silu(pre) * up
  std::vector<double> y;      // [E, C, d]
  std::vector<double> out;    // [T, d]
  double lAux = 0.0;
};

LayerRouting route(const LayerConfig &config, const LayerInputs &in,
                   const ReferenceOptions &options) {
  const int64_t T = config.tokens, d = config.modelDim, E = config.experts;
  const int64_t k = std::min<int64_t>(std::max<int64_t>(config.topK, 1), E);
  LayerRouting r;
  r.topK = k;

  // [gate-1] logits = x Wg (+ noise * N(0,1) / E in training); softmax.
  r.logits.assign(T * E, 0.0);
  r.scores.assign(T * E, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      double sum = 0.0;
      for (int64_t i = 0; i < d; ++i)
        sum += in.x[t * d + i] * in.wg[i * E + e];
      if (config.gateNoise > 0.0)
        sum += config.gateNoise * cpu::gateNoiseSample(config.seed, t, e) /
               static_cast<double>(E);
      r.logits[t * E + e] = sum;
    }
    double maxLogit = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e)
      maxLogit = std::max(maxLogit, r.logits[t * E + e]);
    double total = 0.0;
    for (int64_t e = 0; e < E; ++e)
      total += std::exp(r.logits[t * E + e] - maxLogit);
    for (int64_t e = 0; e < E; ++e)
      r.scores[t * E + e] = std::exp(r.logits[t * E + e] - maxLogit) / total;
  }

  // [gate-2] top-k, ties to the lower expert; [gate-3] gates.
  r.indices.assign(T * k, -1);
  r.gates.assign(T * k, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<bool> taken(E, false);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] &&
            (best < 0 || r.scores[t * E + e] > r.scores[t * E + best]))
          best = e;
      taken[best] = true;
      r.indices[t * k + j] = static_cast<int32_t>(best);
      r.gates[t * k + j] = r.scores[t * E + best];
    }
    if (config.normalizeGate && k > 1) {
      double sum = 0.0;
      for (int64_t j = 0; j < k; ++j)
        sum += r.gates[t * k + j];
      for (int64_t j = 0; j < k; ++j)
        r.gates[t * k + j] /= std::max(sum, kNormalizeEps);
    }
  }

  // [loc-1] choice by choice; tokens in order or by descending max score.
  std::vector<int64_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  if (config.batchPrioritized)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return r.scores[a * E + r.indices[a * k]] >
             r.scores[b * E + r.indices[b * k]];
    });
  r.counts.assign(E, 0);
  r.locations.assign(T * k, -1);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t : order) {
      int64_t e = r.indices[t * k + j];
      r.locations[t * k + j] = static_cast<int32_t>(r.counts[e]++);
    }

  // [cap-1]
  int64_t spe = (T + E - 1) / E;
  int64_t maxCount = *std::max_element(r.counts.begin(), r.counts.end());
  int64_t fixed =
      k * static_cast<int64_t>(std::floor(config.capacityFactor * spe));
  int64_t C = 0;
  switch (config.capacityMode) {
  case CapacityMode::Fixed:
    C = fixed;
    break;
  case CapacityMode::Dropless:
    C = maxCount;
    break;
  case CapacityMode::Bounded:
    C = std::min(maxCount, fixed);
    break;
  }
  int64_t align = std::max<int64_t>(1, options.capacityAlignment);
  r.capacity = (C + align - 1) / align * align;
  return r;
}

DenseState forwardDense(const LayerConfig &config, const LayerInputs &in,
                        const ReferenceOptions &options) {
  DenseState s;
  s.T = config.tokens;
  s.d = config.modelDim;
  s.h = config.hiddenDim;
  s.E = config.experts;
  s.routing = route(config, in, options);
  s.k = s.routing.topK;
  s.C = s.routing.capacity;
  const int64_t T = s.T, d = s.d, h = s.h, E = s.E, k = s.k, C = s.C;
  const bool gated = config.expertKind == ExpertKind::Gated;
  const bool bias = config.bias && !gated;
  const LayerRouting &r = s.routing;

  // [dispatch-1]
  s.disp.assign(E * C * d, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = r.indices[t * k + j], c = r.locations[t * k + j];
      if (c >= C)
        continue;
      for (int64_t i = 0; i < d; ++i)
        s.disp[(e * C + c) * d + i] = in.x[t * d + i];
    }

  // [expert-1] on every row of the dense buffer.
  s.pre.assign(E * C * h, 0.0);
  s.up.assign(gated ? E * C * h : 0, 0.0);
  s.hidden.assign(E * C * h, 0.0);
  s.y.assign(E * C * d, 0.0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < C; ++c) {
      const double *row = &s.disp[(e * C + c) * d];
      for (int64_t n = 0; n < h; ++n) {
        double a = bias ? in.b1[e * h + n] : 0.0, b = 0.0;
        for (int64_t i = 0; i < d; ++i) {
          a += row[i] * in.w1[(e * d + i) * h + n];
          if (gated)
            b += row[i] * in.w3[(e * d + i) * h + n];
        }
        int64_t at = (e * C + c) * h + n;
        s.pre[at] = a;
        if (gated) {
          s.up[at] = b;
          s.hidden[at] = silu(a) * b;
        } else {
          s.hidden[at] = activate(config.activation, a);
        }
      }
      for (int64_t i = 0; i < d; ++i) {
        double v = bias ? in.b2[e * d + i] : 0.0;
        for (int64_t n = 0; n < h; ++n)
          v += s.hidden[(e * C + c) * h + n] * in.w2[(e * h + n) * d + i];
        s.y[(e * C + c) * d + i] = v;
      }
    }

  // [combine-1]
  s.out.assign(T * d, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = r.indices[t * k + j], c = r.locations[t * k + j];
      if (c >= C)
        continue;
      for (int64_t i = 0; i < d; ++i)
        s.out[t * d + i] += r.gates[t * k + j] * s.y[(e * C + c) * d + i];
    }

  // [loss-1]
  double lAux = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    double meanScore = 0.0, firstShare = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      meanScore += r.scores[t * E + e] / T;
      if (r.indices[t * k] == e)
        firstShare += 1.0 / T;
    }
    lAux += meanScore * firstShare;
  }
  s.lAux = E * lAux;
  return s;
}

} // namespace

LayerForward referenceForward(const LayerConfig &config,
                              const LayerInputs &inputs,
                              const ReferenceOptions &options) {
  DenseState s = forwardDense(config, inputs, options);
  return {std::move(s.out), s.lAux, std::move(s.routing)};
}

LayerRouting referenceRouting(const LayerConfig &config,
                              const LayerInputs &inputs,
                              const ReferenceOptions &options) {
  return route(config, inputs, options);
}

LayerGradients
referenceBackward(const LayerConfig &config, const LayerInputs &in,
                  const std::vector<double> &gradOut, double gradLAux,
                  const ReferenceOptions &options, LayerForward *forward) {
  DenseState s = forwardDense(config, in, options);
  const int64_t T = s.T, d = s.d, h = s.h, E = s.E, k = s.k, C = s.C;
  const bool gated = config.expertKind == ExpertKind::Gated;
  const bool bias = config.bias && !gated;
  const LayerRouting &r = s.routing;

  LayerGradients g;
  g.x.assign(T * d, 0.0);
  g.wg.assign(d * E, 0.0);
  g.w1.assign(E * d * h, 0.0);
  g.w2.assign(E * h * d, 0.0);
  if (bias) {
    g.b1.assign(E * h, 0.0);
    g.b2.assign(E * d, 0.0);
  }
  if (gated)
    g.w3.assign(E * d * h, 0.0);

  // Combine: out[t] = sum_j g_tj y[e, c].
  std::vector<double> gradY(E * C * d, 0.0);
  std::vector<double> gradGates(T * k, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = r.indices[t * k + j], c = r.locations[t * k + j];
      if (c >= C)
        continue;
      double dot = 0.0;
      for (int64_t i = 0; i < d; ++i) {
        gradY[(e * C + c) * d + i] += r.gates[t * k + j] * gradOut[t * d + i];
        dot += gradOut[t * d + i] * s.y[(e * C + c) * d + i];
      }
      gradGates[t * k + j] = dot;
    }

  // Experts, row by row of the dense buffer.
  std::vector<double> gradDisp(E * C * d, 0.0);
  std::vector<double> gradHidden(h), gradPre(h), gradUp(h);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < C; ++c) {
      const double *gy = &gradY[(e * C + c) * d];
      const double *row = &s.disp[(e * C + c) * d];
      for (int64_t n = 0; n < h; ++n) {
        double sum = 0.0;
        for (int64_t i = 0; i < d; ++i) {
          g.w2[(e * h + n) * d + i] += s.hidden[(e * C + c) * h + n] * gy[i];
          sum += gy[i] * in.w2[(e * h + n) * d + i];
        }
        gradHidden[n] = sum;
      }
      if (bias)
        for (int64_t i = 0; i < d; ++i)
          g.b2[e * d + i] += gy[i];
      for (int64_t n = 0; n < h; ++n) {
        int64_t at = (e * C + c) * h + n;
        if (gated) {
          gradPre[n] = gradHidden[n] * s.up[at] * siluDerivative(s.pre[at]);
          gradUp[n] = gradHidden[n] * silu(s.pre[at]);
        } else {
          gradPre[n] =
              gradHidden[n] * activateDerivative(config.activation, s.pre[at]);
        }
      }
      for (int64_t i = 0; i < d; ++i) {
        double sum = 0.0;
        for (int64_t n = 0; n < h; ++n) {
          g.w1[(e * d + i) * h + n] += row[i] * gradPre[n];
          sum += gradPre[n] * in.w1[(e * d + i) * h + n];
          if (gated) {
            g.w3[(e * d + i) * h + n] += row[i] * gradUp[n];
            sum += gradUp[n] * in.w3[(e * d + i) * h + n];
          }
        }
        gradDisp[(e * C + c) * d + i] = sum;
      }
      if (bias)
        for (int64_t n = 0; n < h; ++n)
          g.b1[e * h + n] += gradPre[n];
    }

  // Dispatch: each kept slot copied x[t].
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = r.indices[t * k + j], c = r.locations[t * k + j];
      if (c >= C)
        continue;
      for (int64_t i = 0; i < d; ++i)
        g.x[t * d + i] += gradDisp[(e * C + c) * d + i];
    }

  // Gates -> scores: [gate-3] and [loss-1] (frac_e is piecewise constant).
  std::vector<double> gradScores(T * E, 0.0);
  std::vector<double> firstShare(E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    firstShare[r.indices[t * k]] += 1.0 / T;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e)
      gradScores[t * E + e] = gradLAux * E * firstShare[e] / T;
    if (config.normalizeGate && k > 1) {
      double sum = 0.0;
      for (int64_t j = 0; j < k; ++j)
        sum += r.scores[t * E + r.indices[t * k + j]];
      if (sum > kNormalizeEps) {
        // g_j = s_j / sum: d g_j / d s_i = (delta_ij - g_j) / sum.
        for (int64_t i = 0; i < k; ++i) {
          double v = 0.0;
          for (int64_t j = 0; j < k; ++j)
            v += gradGates[t * k + j] *
                 ((i == j ? 1.0 : 0.0) - r.gates[t * k + j]) / sum;
          gradScores[t * E + r.indices[t * k + i]] += v;
        }
      } else {
        for (int64_t j = 0; j < k; ++j)
          gradScores[t * E + r.indices[t * k + j]] +=
              gradGates[t * k + j] / kNormalizeEps;
      }
    } else {
      for (int64_t j = 0; j < k; ++j)
        gradScores[t * E + r.indices[t * k + j]] += gradGates[t * k + j];
    }
  }

  // Softmax (the noise is additive), then logits = x Wg.
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> gradLogits(E, 0.0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t f = 0; f < E; ++f) {
        double jacobian =
            r.scores[t * E + f] * ((e == f ? 1.0 : 0.0) - r.scores[t * E + e]);
        gradLogits[e] += gradScores[t * E + f] * jacobian;
      }
    for (int64_t i = 0; i < d; ++i)
      for (int64_t e = 0; e < E; ++e) {
        g.x[t * d + i] += gradLogits[e] * in.wg[i * E + e];
        g.wg[i * E + e] += in.x[t * d + i] * gradLogits[e];
      }
  }

  if (forward)
    *forward = {std::move(s.out), s.lAux, std::move(s.routing)};
  return g;
}

//===----------------------------------------------------------------------===//
// Test helpers
//===----------------------------------------------------------------------===//

std::vector<double> roundTo(const std::vector<double> &values, DType type) {
  std::vector<double> rounded(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    float v = static_cast<float>(values[i]);
    switch (type) {
    case DType::BF16:
      v = bf16ToFloat(floatToBf16(v));
      break;
    case DType::F16:
      v = f16ToFloat(floatToF16(v));
      break;
    default:
      break;
    }
    rounded[i] = v;
  }
  return rounded;
}

LayerInputs makeRandomInputs(const LayerConfig &config, std::mt19937_64 &rng) {
  const int64_t T = config.tokens, d = config.modelDim, h = config.hiddenDim,
                E = config.experts;
  auto normal = [&](int64_t count, double stddev) {
    std::normal_distribution<double> dist(0.0, stddev);
    std::vector<double> values(count);
    for (double &v : values)
      v = dist(rng);
    return values;
  };
  const bool gated = config.expertKind == ExpertKind::Gated;
  LayerInputs in;
  in.x = roundTo(normal(T * d, 1.0), config.dtype);
  in.wg = roundTo(normal(d * E, 1.0 / std::sqrt(double(d))),
                  config.routerFp32 ? DType::F32 : config.dtype);
  in.w1 = roundTo(normal(E * d * h, 1.0 / std::sqrt(double(d))), config.dtype);
  in.w2 = roundTo(normal(E * h * d, 1.0 / std::sqrt(double(h))), config.dtype);
  if (config.bias && !gated) {
    in.b1 = roundTo(normal(E * h, 0.1), config.dtype);
    in.b2 = roundTo(normal(E * d, 0.1), config.dtype);
  }
  if (gated)
    in.w3 =
        roundTo(normal(E * d * h, 1.0 / std::sqrt(double(d))), config.dtype);
  return in;
}

double normL2(const std::vector<double> &values) {
  double sum = 0.0;
  for (double v : values)
    sum += v * v;
  return std::sqrt(sum);
}

double relativeL2(const std::vector<double> &got,
                  const std::vector<double> &want, double floor) {
  if (got.size() != want.size())
    return std::numeric_limits<double>::infinity();
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]))
      return std::numeric_limits<double>::infinity();
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  double denominator = std::max(std::sqrt(norm), floor);
  return denominator > 0.0 ? std::sqrt(diff) / denominator : std::sqrt(diff);
}

RoutingMargins routingMargins(const LayerConfig &config,
                              const LayerRouting &routing) {
  const int64_t T = config.tokens, E = config.experts, k = routing.topK;
  RoutingMargins margins;
  margins.logitGap = std::numeric_limits<double>::infinity();
  margins.priorityGap = std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> row(routing.logits.begin() + t * E,
                            routing.logits.begin() + (t + 1) * E);
    std::sort(row.begin(), row.end(), std::greater<>());
    int64_t ranked = std::min(k + 1, E);
    for (int64_t j = 0; j + 1 < ranked; ++j)
      if (row[j] - row[j + 1] < margins.logitGap) {
        margins.logitGap = row[j] - row[j + 1];
        margins.logitGapToken = t;
      }
  }
  if (config.batchPrioritized) {
    std::vector<std::pair<double, int64_t>> priority(T);
    for (int64_t t = 0; t < T; ++t)
      priority[t] = {routing.scores[t * E + routing.indices[t * k]], t};
    std::sort(priority.begin(), priority.end());
    for (int64_t t = 0; t + 1 < T; ++t)
      if (priority[t + 1].first - priority[t].first < margins.priorityGap) {
        margins.priorityGap = priority[t + 1].first - priority[t].first;
        margins.priorityGapToken = priority[t + 1].second;
      }
  }
  return margins;
}

} // namespace flex::reference
