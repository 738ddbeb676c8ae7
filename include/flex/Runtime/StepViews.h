//===- StepViews.h - Kernel buffer views of step operands -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the small conversions every backend makes from a step's
// operand views (TensorView) to the buffer views its kernels take (the
// backend-neutral types of Core/KernelArgs.h), so the CPU and CUDA backends
// share them. A gate step's attributes need no conversion: StepAttrs is-a
// GateAttrs, and the plan's Epilogue is the kernels'.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STEPVIEWS_H
#define FLEX_RUNTIME_STEPVIEWS_H

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Core/KernelArgs.h"

#include <algorithm>

namespace flex::step_views {

/// Short for the roles a backend looks a step's operands up by:
/// `ops.in(R::X)`.
using R = OperandRole;

/// The column count of a [R, N] operand.
inline int64_t cols(const TensorView &view) { return view.desc->shape.back(); }

/// A typed read view of an operand; empty for an absent optional operand.
inline ReadBuffer read(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

/// A typed write view of an operand; empty for an absent optional operand.
inline WriteBuffer write(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

/// The operand as an array of `T` (routing buffers have fixed types).
template <typename T> const T *readAs(const TensorView &view) {
  return static_cast<const T *>(view.data);
}
template <typename T> T *writeAs(const TensorView &view) {
  return static_cast<T *>(view.data);
}

/// The routing a step reads, from the layer and whichever routing operands
/// it has. After shard_routing the routing counts k * s choices over E * s
/// (virtual) experts: k and E come from the buffers when present (the loader
/// checked that they agree).
inline Routing routingOf(const LayerConfig &layer, const StepOperands &ops) {
  Routing routing;
  routing.indices = readAs<int32_t>(ops.in(OperandRole::Indices));
  routing.locations = readAs<int32_t>(ops.in(OperandRole::Locations));
  routing.gates = readAs<float>(ops.in(OperandRole::Gates));
  routing.capacity = readAs<int32_t>(ops.in(OperandRole::Capacity));
  routing.expertOffsets = readAs<int32_t>(ops.in(OperandRole::ExpertOffsets));
  routing.expertRows = readAs<int32_t>(ops.in(OperandRole::ExpertRows));
  routing.tokens = layer.tokens;
  routing.topK = std::min(layer.topK, layer.experts);
  routing.experts = layer.experts;
  if (ops.in(OperandRole::Indices).isPresent())
    routing.topK = ops.in(OperandRole::Indices).desc->shape[1];
  if (ops.in(OperandRole::ExpertOffsets).isPresent())
    routing.experts = ops.in(OperandRole::ExpertOffsets).desc->shape[0] - 1;
  return routing;
}

/// What the kernels of a step take besides its operands, on every backend:
/// the layer's sizes, the routing it reads and the row groups of a segment
/// op.
struct LayerArgs {
  int64_t T, d, E, k;
  Routing routing;
  ExpertSegments segments;

  LayerArgs(const Plan &plan, const StepOperands &ops)
      : T(plan.layer.tokens), d(plan.layer.modelDim), E(plan.layer.experts),
        k(std::min(plan.layer.topK, plan.layer.experts)),
        // Routing is read from whichever side of the step holds it.
        routing(routingOf(plan.layer, ops)), segments(routing.segments()) {
    // The row groups of a segment op: the gate's E experts, or the L local
    // experts of a received buffer (uniform_segments).
    if (ops.in(OperandRole::ExpertRows).isPresent())
      segments.experts = ops.in(OperandRole::ExpertRows).desc->shape[0];
  }
};

/// The A rows of a grouped GEMM or its weight gradient: the row -> token
/// map of a gather-fused variant over the layer's T tokens, or none.
inline RowGather rowGather(const StepOperands &ops, const LayerArgs &x) {
  return RowGather{readAs<int32_t>(ops.in(OperandRole::RowTokens)), x.T};
}

/// The gate step's routing outputs as the gate kernels take them.
inline GateOutputs gateOutputs(const StepOperands &ops) {
  using R = OperandRole;
  GateOutputs out;
  out.scores = writeAs<float>(ops.out(R::Scores));
  out.indices = writeAs<int32_t>(ops.out(R::Indices));
  out.locations = writeAs<int32_t>(ops.out(R::Locations));
  out.gates = writeAs<float>(ops.out(R::Gates));
  out.capacity = writeAs<int32_t>(ops.out(R::Capacity));
  out.expertOffsets = writeAs<int32_t>(ops.out(R::ExpertOffsets));
  out.expertRows = writeAs<int32_t>(ops.out(R::ExpertRows));
  out.lAux = writeAs<float>(ops.out(R::LAux));
  return out;
}

/// A grouped_gemm step's options as the GEMM kernels take them.
inline GroupedGemmOptions gemmOptions(const StepAttrs &a) {
  GroupedGemmOptions options;
  options.transB = a.transB;
  options.accumulate = a.accumulate;
  options.epilogue = a.epilogue;
  // 1 / s in fc2 of a sharded expert: the s partial outputs add b2 once.
  options.biasScale = static_cast<float>(a.biasScale);
  return options;
}

/// A gate_backward step's attributes as the gate kernels take them.
inline GateBackwardAttrs gateBackwardAttrs(const StepAttrs &a) {
  GateBackwardAttrs attrs;
  attrs.topK = a.topK;
  attrs.normalize = a.normalize;
  return attrs;
}

} // namespace flex::step_views

#endif // FLEX_RUNTIME_STEPVIEWS_H
