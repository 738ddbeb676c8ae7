//===- StepSchema.h - What each step kind is, from StepKinds.def -*- C++
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the step schema: for each StepOp its operand roles,
// required attributes, traits and how its work is counted, all expanded from
// StepKinds.def. The plan reader, verifier and writer, the backends' kernel
// tables and the cost model read it instead of spelling the steps out again.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STEPSCHEMA_H
#define FLEX_RUNTIME_STEPSCHEMA_H

#include "flex/Runtime/Plan.h"
#include "flex/Runtime/RoleShapes.h"

#include <cstdint>
#include <iterator>
#include <optional>
#include <string_view>
#include <vector>

namespace flex {

/// The declared shape and element type of `role` (StepKinds.def): no dims
/// when they depend on the step kind.
inline const RoleShape &getRoleShape(OperandRole role) {
  static_assert(std::size(kRoleShapes) == size_t(kNumOperandRoles));
  return kRoleShapes[static_cast<size_t>(role)];
}

/// A key of a step's `attrs` object (StepKinds.def, FLEX_STEP_ATTR).
enum class StepAttr : uint8_t {
#define FLEX_STEP_ATTR(Name, spelling, field) Name,
#include "flex/Runtime/StepKinds.def"
};
inline constexpr int kNumStepAttrs = 0
#define FLEX_STEP_ATTR(Name, spelling, field) +1
#include "flex/Runtime/StepKinds.def"
    ;

std::string_view toString(StepAttr attr);
std::optional<StepAttr> parseStepAttr(std::string_view text);

/// Traits of a step kind (bits of StepKindInfo::traits).
enum StepTrait : unsigned {
  /// Talks to other ranks through the communicator (isCollective).
  kStepCollective = 1u << 0,
  /// Runs per group of rows given by expert_offsets / expert_rows: the
  /// routing's experts or a received buffer's local experts.
  kStepSegmentOp = 1u << 1,
  /// Writes a routing (indices, locations, gates, expert offsets) that
  /// later steps read.
  kStepWritesRouting = 1u << 2,
  /// Reads a routing to move tokens between [T, d] and dispatch rows.
  kStepReadsRouting = 1u << 3,
};

/// How a step's work is counted (StepWork): the figures a cost model turns
/// into time with a device profile.
enum class StepCost : uint8_t {
  Memory,        ///< memory-bound: the bytes it reads and writes
  Launch,        ///< a few bytes: launch cost only
  RouterGemm,    ///< [T, d] x [d, E] (and its backward, two of them)
  ExpertGemm,    ///< per group [rows, K] x [K, N] (grouped_gemm_glu: two)
  ExpertWgrad,   ///< per group [K, rows] x [rows, N]
  Exchange,      ///< all_to_all: the chunk's rows leave and arrive
  Gather,        ///< all_gather: the full buffer arrives
  ReduceScatter, ///< reduce_scatter: the full buffer leaves, summed
  Sync,          ///< sync_capacity: one integer all-reduced
};
std::string_view toString(StepCost cost);

/// An operand of a step kind: its role, and whether a step must have it.
struct OperandSpec {
  OperandRole role;
  bool required;
};

/// Everything StepKinds.def says about one step kind.
struct StepKindInfo {
  StepOp op;
  std::string_view name;
  unsigned traits = 0;
  std::vector<OperandSpec> inputs, outputs;
  /// Each one required in the plan file (format version 2).
  std::vector<StepAttr> attrs;
  StepCost cost = StepCost::Memory;

  bool has(StepTrait trait) const { return (traits & trait) != 0; }
  bool takesAttr(StepAttr attr) const;
};

/// The schema entry of `op`.
const StepKindInfo &getStepKind(StepOp op);

/// The output of an expert-GEMM step (StepCost::ExpertGemm) whose buffer
/// holds the product's rows and columns [R, N]: `c`, or `grad_gate_in` for
/// grouped_gemm_glu_backward (which writes two such outputs).
OperandRole gemmProductRole(StepOp op);

/// The work of one step (StepCost says which figures it has). Rows of
/// dispatch-shaped buffers count the rows the step touches: `rows` when
/// given (>= 0, e.g. E * C once the capacity is known), else the buffers'
/// static upper bound.
struct StepWork {
  double flops = 0;
  double bytesRead = 0;
  double bytesWritten = 0;
  /// Bytes a collective sends from this rank (received bytes are equal).
  double bytesExchanged = 0;
};
StepWork getStepWork(const Plan &plan, const Step &step, int64_t rows = -1);

} // namespace flex

#endif // FLEX_RUNTIME_STEPSCHEMA_H
