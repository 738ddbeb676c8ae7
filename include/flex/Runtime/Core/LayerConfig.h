//===- LayerConfig.h - The configuration of one MoE layer -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the plain description of one MoE layer shared by the
// runtime, the plan format and the C API. It has no MLIR in it: the compiler
// converts `moe.layer` attributes to it, and the runtime reads it from plans.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_LAYERCONFIG_H
#define FLEX_RUNTIME_CORE_LAYERCONFIG_H

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace flex {

/// Element types the runtime stores. Accumulation is always fp32 (or fp64 in
/// references).
enum class DType : uint8_t { F32, BF16, F16, I32 };

/// How the per-expert capacity C is chosen ([cap-1] in DESIGN.md).
enum class CapacityMode : uint8_t {
  /// C = k * int(factor * ceil(T/E)); slots past C are dropped.
  Fixed,
  /// No slot is dropped: C = the largest per-expert count.
  Dropless,
  /// C = min(largest count, k * int(factor * ceil(T/E))).
  Bounded,
};

enum class ExpertKind : uint8_t {
  /// y = act(x W1 + b1) W2 + b2.
  FFN,
  /// y = (silu(x W1) * (x W3)) W2 (SwiGLU); no bias.
  Gated,
};

enum class Activation : uint8_t { Relu, Gelu, Silu };

/// One MoE layer on one rank. Shapes: x[T, d], Wg[d, E], W1[E, d, h],
/// b1[E, h], W2[E, h, d], b2[E, d], W3[E, d, h].
struct LayerConfig {
  int64_t tokens = 0;      ///< T, tokens on this rank.
  int64_t modelDim = 0;    ///< d.
  int64_t hiddenDim = 0;   ///< h, per expert.
  int64_t experts = 0;     ///< E, global.
  int64_t topK = 1;        ///< k, 1 <= k <= E.
  CapacityMode capacityMode = CapacityMode::Fixed;
  double capacityFactor = 1.0; ///< > 0 for Fixed and Bounded; unused otherwise.
  ExpertKind expertKind = ExpertKind::FFN;
  Activation activation = Activation::Relu; ///< FFN only.
  bool bias = false;                        ///< FFN only.
  DType dtype = DType::F32;    ///< tokens, expert weights and outputs.
  bool routerFp32 = true;      ///< Wg is fp32 and logits are computed in fp32.
  bool batchPrioritized = false; ///< [loc-1] sort tokens by descending max score.
  bool normalizeGate = true;   ///< [gate-3] for k > 1.
  double gateNoise = 0.0;      ///< stddev of training noise added to logits.
  uint64_t seed = 0;           ///< seed of the gate noise.
};

// The capacity arithmetic of [cap-1] (staticCapacityBound, computeCapacity)
// is in Core/Capacity.h.

/// s, the ranks that share each expert when `experts` experts run on
/// `worldSize` ranks: W / E when E < W and W % E == 0 (each rank holds h / s
/// hidden units of one expert), else 1 (whole experts per rank).
inline int64_t expertShards(int64_t experts, int64_t worldSize) {
  return experts > 0 && worldSize > experts && worldSize % experts == 0
             ? worldSize / experts
             : 1;
}

/// Checks every rule that a configuration must meet; returns a message naming
/// the rule and the values, or std::nullopt when the configuration is valid.
std::optional<std::string> verifyLayerConfig(const LayerConfig &config);

size_t dtypeSize(DType type);
std::string_view toString(DType type);
std::string_view toString(CapacityMode mode);
std::string_view toString(ExpertKind kind);
std::string_view toString(Activation act);
std::optional<DType> parseDType(std::string_view text);
std::optional<CapacityMode> parseCapacityMode(std::string_view text);
std::optional<ExpertKind> parseExpertKind(std::string_view text);
std::optional<Activation> parseActivation(std::string_view text);

} // namespace flex

#endif // FLEX_RUNTIME_CORE_LAYERCONFIG_H
