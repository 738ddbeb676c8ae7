//===- KernelArgs.h - Argument types of every backend's kernels -*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the types the kernels of every backend take: typed
// buffer views, the routing a gate writes and later steps read, and the
// attributes and options of the step ops. The CPU kernels (Cpu/CpuKernels.h)
// hold host pointers in them, the CUDA kernels (Cuda/CudaKernels.h) device
// pointers. The gate's attributes are one struct shared with the plan
// (StepAttrs is-a GateAttrs), and the dispatch layout and the epilogue are
// the plan's enums, so a backend passes a step's attributes as they are.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_KERNELARGS_H
#define FLEX_RUNTIME_CORE_KERNELARGS_H

#include "flex/Runtime/Core/Capacity.h"
#include "flex/Runtime/Core/LayerConfig.h"

#include <cstdint>

namespace flex {

//===----------------------------------------------------------------------===//
// Enums shared with the plan
//===----------------------------------------------------------------------===//

/// How the gate lays the dispatch buffer out (the `layout` attr of `gate`).
enum class DispatchLayout : uint8_t {
  /// `expertOffsets[e] = e * C`: the capacity-padded layout of [dispatch-1].
  Padded,
  /// `expertOffsets[e] = sum of expertRows before e`: no padding.
  Ragged,
  /// Ragged with every expert's first row a multiple of kAlignedLayoutRows:
  /// `expertOffsets[e] = sum of expertRows before e, each rounded up`. Every
  /// 128-row block of the used rows then belongs to one expert, so a GPU runs
  /// the experts' GEMMs as one batched call over the blocks, sized on the
  /// device (no host read of the counts; a CUDA graph can record it).
  Aligned,
};

/// The row alignment of DispatchLayout::Aligned: one tile of the GEMMs'
/// rows (cuBLAS's and the device kernels' 128-row tiles).
inline constexpr int64_t kAlignedLayoutRows = 128;

/// The multiple every expert's first row is of: C for padded (the caller
/// knows it), kAlignedLayoutRows for aligned, 1 for ragged.
inline constexpr int64_t layoutRowAlignment(DispatchLayout layout) {
  return layout == DispatchLayout::Aligned ? kAlignedLayoutRows : 1;
}

/// The elementwise function applied after a grouped GEMM (the `epilogue` of
/// `grouped_gemm`).
enum class Epilogue : uint8_t { None, Relu, Gelu, Silu };

/// The epilogue that applies an FFN's activation.
constexpr Epilogue toEpilogue(Activation act) {
  switch (act) {
  case Activation::Relu:
    return Epilogue::Relu;
  case Activation::Gelu:
    return Epilogue::Gelu;
  case Activation::Silu:
    return Epilogue::Silu;
  }
  return Epilogue::None;
}

//===----------------------------------------------------------------------===//
// Buffer views
//===----------------------------------------------------------------------===//

/// A typed buffer a kernel reads. `type` is F32, BF16 or F16.
struct ReadBuffer {
  const void *data = nullptr;
  DType type = DType::F32;
};

/// A typed buffer a kernel writes (and, where a kernel accumulates, reads).
struct WriteBuffer {
  void *data = nullptr;
  DType type = DType::F32;
};

/// The row segments of a dispatch-shaped buffer: expert e owns rows
/// `[offsets[e], offsets[e] + rows[e])`.
struct ExpertSegments {
  const int32_t *offsets = nullptr; ///< [experts + 1]
  const int32_t *rows = nullptr;    ///< [experts]
  int64_t experts = 0;
};

/// The routing of one call, as written by `gate`. A slot (t, j) is kept when
/// `locations[t, j] < *capacity`; its row is
/// `expertOffsets[indices[t, j]] + locations[t, j]`.
struct Routing {
  const int32_t *indices = nullptr;       ///< [tokens, topK]
  const int32_t *locations = nullptr;     ///< [tokens, topK]
  const float *gates = nullptr;           ///< [tokens, topK]
  const int32_t *capacity = nullptr;      ///< [1]
  const int32_t *expertOffsets = nullptr; ///< [experts + 1]
  const int32_t *expertRows = nullptr;    ///< [experts]
  int64_t tokens = 0;
  int64_t topK = 0; ///< k after clamping to experts.
  int64_t experts = 0;

  ExpertSegments segments() const {
    return {expertOffsets, expertRows, experts};
  }
};

//===----------------------------------------------------------------------===//
// Gate
//===----------------------------------------------------------------------===//

/// [gate-3] The floor of the normalizing sum: `g /= max(sum_k g, eps)`. It is
/// fp32's machine epsilon, as in Tutel (torch.finfo(float32).eps).
inline constexpr float kGateNormalizeEps = 1.1920928955078125e-7f;

/// The attributes of `gate` (and, for topK and normalize, `gate_backward`).
/// The plan's StepAttrs derives from it, so these fields exist once.
struct GateAttrs {
  /// k; clamped to the number of experts ([gate-2]).
  int64_t topK = 1;
  CapacityMode capacityMode = CapacityMode::Fixed;
  /// f > 0 for Fixed and Bounded.
  double capacityFactor = 1.0;
  /// [gate-3] normalize the k gates of a token (only when k > 1).
  bool normalize = true;
  /// [loc-1] order tokens by descending max score before assigning slots.
  bool batchPrioritized = false;
  /// Standard deviation of the training noise (0 = none); see
  /// cpu::gateNoiseSample.
  double noise = 0.0;
  uint64_t seed = 0;
  DispatchLayout layout = DispatchLayout::Padded;
  /// [cap-1] C is rounded up to a multiple of this (pipelining degree,
  /// sharding); 1 = no rounding.
  int64_t capacityAlignment = 1;
};

/// Where `gate` writes. Every pointer is required.
struct GateOutputs {
  float *scores = nullptr;          ///< [T, E]
  int32_t *indices = nullptr;       ///< [T, k]
  int32_t *locations = nullptr;     ///< [T, k]
  float *gates = nullptr;           ///< [T, k]
  int32_t *capacity = nullptr;      ///< [1]
  int32_t *expertOffsets = nullptr; ///< [E + 1]
  int32_t *expertRows = nullptr;    ///< [E]
  float *lAux = nullptr;            ///< [1]
};

struct GateBackwardAttrs {
  int64_t topK = 1; ///< clamped to experts, as in the forward.
  bool normalize = true;
};

//===----------------------------------------------------------------------===//
// Grouped GEMMs
//===----------------------------------------------------------------------===//

struct GroupedGemmOptions {
  /// b is [E, N, K] and used transposed (b[e]^T).
  bool transB = false;
  Epilogue epilogue = Epilogue::None;
  /// c = epi(c + a @ b[e] + bias[e]): adds to what c holds (backward sums).
  bool accumulate = false;
  /// The bias is added times this (fp32): 1 / s in fc2 of an expert sharded
  /// over s ranks, so that the s partial outputs add b2 once.
  float biasScale = 1.0f;
};

/// The A rows of a gather-fused grouped GEMM (`row_tokens`): row r of the
/// product reads row rowTokens[r] of a, which holds `tokens` rows (the
/// layer's x). rowTokens null: a's own rows, the dispatch layout's.
struct RowGather {
  const int32_t *rowTokens = nullptr;
  int64_t tokens = 0;
};

struct GroupedGemmWgradOptions {
  /// gradB += and gradBias += instead of =: the chunks of a pipelined
  /// backward sum into one gradient.
  bool accumulate = false;
};

} // namespace flex

#endif // FLEX_RUNTIME_CORE_KERNELARGS_H
