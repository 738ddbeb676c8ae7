//===- ReferenceMoE.h - An fp64 reference of one MoE layer ------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares an independent fp64 reference of a whole MoE layer,
// forward and backward, written with plain loops straight from DESIGN.md
// section 3 in the dense [E, C, d] dispatch formulation. It shares no code
// with the kernels (only gateNoiseSample, which defines the noise), so tests
// of the kernels, the executor, the C API and the GPU backend compare
// against it.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_REFERENCE_REFERENCEMOE_H
#define FLEX_REFERENCE_REFERENCEMOE_H

#include "flex/Runtime/Core/LayerConfig.h"

#include <cstdint>
#include <random>
#include <vector>

namespace flex::reference {

/// Parameters and tokens, row-major: x[T, d], wg[d, E], w1[E, d, h],
/// b1[E, h], w2[E, h, d], b2[E, d], w3[E, d, h]. Absent ones (b1/b2 without
/// bias, w3 for FFN) are empty.
struct LayerInputs {
  std::vector<double> x, wg, w1, b1, w2, b2, w3;
};

struct ReferenceOptions {
  /// [cap-1] C is rounded up to a multiple of this.
  int64_t capacityAlignment = 1;
};

/// The routing of one call, as [gate-1..3], [loc-1], [cap-1] define it.
struct LayerRouting {
  int64_t topK = 0;               ///< k clamped to E.
  std::vector<double> logits;     ///< [T, E] with noise added.
  std::vector<double> scores;     ///< [T, E]
  std::vector<int32_t> indices;   ///< [T, k]
  std::vector<int32_t> locations; ///< [T, k]
  std::vector<double> gates;      ///< [T, k], normalized per [gate-3]
  std::vector<int64_t> counts;    ///< [E] slots routed to e, kept or not
  int64_t capacity = 0;           ///< C
};

struct LayerForward {
  std::vector<double> out; ///< [T, d]
  double lAux = 0.0;
  LayerRouting routing;
};

/// Gradients of loss = <gradOut, out> + gradLAux * l_aux; same shapes as
/// LayerInputs.
struct LayerGradients {
  std::vector<double> x, wg, w1, b1, w2, b2, w3;
};

/// The layer's forward. Noise is added when config.gateNoise > 0 (training).
LayerForward referenceForward(const LayerConfig &config,
                              const LayerInputs &inputs,
                              const ReferenceOptions &options = {});

/// The routing alone ([gate-1..3], [loc-1], [cap-1]): cheap, for tests that
/// search inputs.
LayerRouting referenceRouting(const LayerConfig &config,
                              const LayerInputs &inputs,
                              const ReferenceOptions &options = {});

/// Forward and backward; returns the gradients (and the forward in *forward
/// when not null).
LayerGradients referenceBackward(const LayerConfig &config,
                                 const LayerInputs &inputs,
                                 const std::vector<double> &gradOut,
                                 double gradLAux,
                                 const ReferenceOptions &options = {},
                                 LayerForward *forward = nullptr);

//===----------------------------------------------------------------------===//
// Test helpers
//===----------------------------------------------------------------------===//

/// Random inputs scaled so logits and activations are O(1): x ~ N(0, 1),
/// weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2). Wg is rounded to fp32 when
/// config.routerFp32, else to config.dtype; the others to config.dtype, so
/// the values are exactly representable in the kernels' buffers.
LayerInputs makeRandomInputs(const LayerConfig &config, std::mt19937_64 &rng);

/// Rounds each value to `type` (f32, bf16, f16: round to nearest even).
std::vector<double> roundTo(const std::vector<double> &values, DType type);

/// ||got - want||_2 / max(||want||_2, floor) ([num-1]). Any NaN or
/// infinity in `got` gives +infinity, so NaN never passes; an all-zero
/// `want` with floor 0 compares the absolute norm of `got`. The floor is for
/// quantities whose exact value can cancel to 0 while their terms do not.
double relativeL2(const std::vector<double> &got,
                  const std::vector<double> &want, double floor = 0.0);

double normL2(const std::vector<double> &values);

/// How far the routing is from flipping: the smallest gap between
/// consecutive ones of the top min(k+1, E) noisy logits of each token, and,
/// with batch-prioritized routing, between the sorted max scores of tokens.
/// Random tests resample tokens whose routing is closer to a tie than fp32
/// rounding can resolve.
struct RoutingMargins {
  double logitGap = 0.0;
  int64_t logitGapToken = -1;
  double priorityGap = 0.0;
  int64_t priorityGapToken = -1;
};
RoutingMargins routingMargins(const LayerConfig &config,
                              const LayerRouting &routing);

} // namespace flex::reference

#endif // FLEX_REFERENCE_REFERENCEMOE_H
