//===- Plan.h - The in-memory model of a plan (format v1) -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the plan as the runtime holds it after loading: a layer,
// its arguments, a static workspace and one or more variants, each a forward
// and a backward list of steps over named buffers. docs/PlanFormat.md is the
// specification; PlanLoader.h reads and writes the JSON form.
//
// Buffer names are resolved to BufferRef when a plan is loaded, and operand
// roles to OperandRole, so executing a step does no string lookup.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_PLAN_H
#define FLEX_RUNTIME_PLAN_H

#include "flex/Runtime/Core/KernelArgs.h"
#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/StepFacts.h"

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

/// The plan format version this runtime reads (and writes). Version 2 made
/// every declared attribute of a step required and added each step's
/// compiled facts; a version 1 plan is refused with a message naming it.
inline constexpr int kPlanFormatVersion = 2;
inline constexpr std::string_view kPlanFormatName = "flex-plan";

/// One step op of the plan (one `moert` op); declared in StepKinds.def.
enum class StepOp : uint8_t {
#define FLEX_STEP(Name, spelling, traits, ins, outs, attrs, cost) Name,
#include "flex/Runtime/StepKinds.def"
};
inline constexpr int kNumStepOps = 0
#define FLEX_STEP(Name, spelling, traits, ins, outs, attrs, cost) +1
#include "flex/Runtime/StepKinds.def"
    ;

std::string_view toString(StepOp op);
std::optional<StepOp> parseStepOp(std::string_view text);

/// Whether `op` talks to other ranks through the communicator. Every rank
/// runs the same collective steps in the same order. `uniform_segments` is
/// local and not one of them.
bool isCollective(StepOp op);

/// The role an operand plays in a step: the keys of a step's `in` and `out`
/// objects. One enum for all ops; each op accepts a subset (see
/// getStepSignature). Declared in StepKinds.def.
enum class OperandRole : uint8_t {
#define FLEX_OPERAND_ROLE(Name, spelling, dims, dtype) Name,
#include "flex/Runtime/StepKinds.def"
};
inline constexpr int kNumOperandRoles = 0
#define FLEX_OPERAND_ROLE(Name, spelling, dims, dtype) +1
#include "flex/Runtime/StepKinds.def"
    ;

std::string_view toString(OperandRole role);
std::optional<OperandRole> parseOperandRole(std::string_view text);

/// The operands an op takes: `required` must be present, `optional` may be.
/// Roles outside both are rejected by the loader.
struct StepSignature {
  std::vector<OperandRole> requiredInputs;
  std::vector<OperandRole> optionalInputs;
  std::vector<OperandRole> requiredOutputs;
  std::vector<OperandRole> optionalOutputs;
};
const StepSignature &getStepSignature(StepOp op);

/// Caller-owned argument roles ("role" of an argument).
enum class ArgumentRole : uint8_t { Input, Output, GradInput, GradOutput };
std::string_view toString(ArgumentRole role);
std::optional<ArgumentRole> parseArgumentRole(std::string_view text);

/// The `layout` attr of `gate` (DispatchLayout is in Core/KernelArgs.h).
std::string_view toString(DispatchLayout layout);
std::optional<DispatchLayout> parseDispatchLayout(std::string_view text);

/// The epilogue of `grouped_gemm` (Epilogue is in Core/KernelArgs.h).
std::string_view toString(Epilogue epilogue);
std::optional<Epilogue> parseEpilogue(std::string_view text);

/// Which way `all_to_all` moves rows (PlanFormat.md, "Many ranks").
enum class AllToAllDirection : uint8_t {
  /// Dispatch buffer [W, L, C, *] -> received buffer [D, L, W, Cq, *].
  Dispatch,
  /// The inverse: received-buffer layout back to the dispatch layout.
  Combine,
};
std::string_view toString(AllToAllDirection direction);
std::optional<AllToAllDirection> parseAllToAllDirection(std::string_view text);

/// A buffer: name, element type and static row-major shape.
struct BufferDesc {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;

  /// Product of the dims; the loader has checked it does not overflow.
  int64_t numElements() const;
  /// numElements() * dtypeSize(dtype); checked like numElements().
  int64_t numBytes() const;
};

struct Argument : BufferDesc {
  ArgumentRole role = ArgumentRole::Input;
};

struct WorkspaceBuffer : BufferDesc {
  int64_t offset = 0; ///< from the start of the workspace block
  int64_t bytes = 0;  ///< reserved bytes, >= numBytes()
};

struct Workspace {
  int64_t bytes = 0;
  int64_t alignment = 256; ///< of the block and of every offset
  std::vector<WorkspaceBuffer> buffers;
};

/// Where an operand lives: a caller argument or a workspace buffer, by index.
struct BufferRef {
  enum class Kind : uint8_t { None, Argument, Workspace };
  Kind kind = Kind::None;
  int32_t index = -1;

  bool isValid() const { return kind != Kind::None; }
  friend bool operator==(const BufferRef &, const BufferRef &) = default;
};

/// Attributes of a step. Which ones an op reads is in PlanFormat.md; the
/// loader fills the ones present and checks those the op requires. The
/// attributes of gate and gate_backward are the kernels' GateAttrs
/// (Core/KernelArgs.h), so a backend passes them as they are.
struct StepAttrs : GateAttrs {
  // grouped_gemm
  bool transB = false;
  Epilogue epilogue = Epilogue::None;
  /// The bias is added times this (1 / s in fc2 of experts sharded over s
  /// ranks, so the s partial outputs add b2 once).
  double biasScale = 1.0;
  /// grouped_gemm: c += instead of c = (a backward sums two products into
  /// one buffer). grouped_gemm_wgrad: grad_b += (and grad_bias +=), so the
  /// chunks of a pipelined backward sum into one gradient.
  bool accumulate = false;
  // all_to_all, uniform_segments
  AllToAllDirection direction = AllToAllDirection::Dispatch;
  int64_t chunks = 1; ///< D: the capacity is split into D chunks
  int64_t chunk = 0;  ///< q in [0, D)
  // all_to_all
  /// N > 0: the ranks are on nodes of N ranks and the exchange runs as the
  /// two-phase hierarchical (2DH) all-to-all; 0: flat. Same result either way.
  int64_t ranksPerNode = 0;
  // uniform_segments
  int64_t groups = 0; ///< G: local experts of the received buffer
  int64_t ranks = 0;  ///< W
  // activation_backward
  Activation activation = Activation::Relu;
  // shard_routing, shard_routing_backward
  int64_t shards = 1; ///< s: the ranks that share each expert
  // all_to_all, all_gather, reduce_scatter (PlanFormat.md, "Groups of ranks")
  /// > 0: the collective runs among groups of this many ranks,
  /// `groupStride` apart (RankGroups in Comm/Communicator.h); 0: all W.
  int64_t groupSize = 0;
  int64_t groupStride = 1;
  /// The ranks one collective runs among: groupSize, or W.
  int64_t groupRanks(int64_t worldSize) const {
    return groupSize > 0 ? groupSize : worldSize;
  }
};

struct Step {
  StepOp op = StepOp::Router;
  /// Operands by role; BufferRef::Kind::None where the role is absent.
  std::array<BufferRef, kNumOperandRoles> inputs{};
  std::array<BufferRef, kNumOperandRoles> outputs{};
  StepAttrs attrs;
  int32_t stream = 0;         ///< reserved for the CUDA backend
  std::vector<int32_t> wait;  ///< step indices; reserved for the CUDA backend
  /// What the lowering derived for backends (StepFacts.h).
  StepFacts facts;

  const BufferRef &in(OperandRole role) const {
    return inputs[static_cast<int>(role)];
  }
  const BufferRef &out(OperandRole role) const {
    return outputs[static_cast<int>(role)];
  }
  /// A grouped GEMM whose A rows are gathered through row_tokens (a
  /// gather-fused variant's). grouped_gemm_combine's row_tokens maps its
  /// product's rows for the combine and gathers nothing.
  bool gathersA() const {
    return in(OperandRole::RowTokens).isValid() &&
           op != StepOp::GroupedGemmCombine;
  }
};

struct Variant {
  std::string name;
  std::vector<Step> forward;
  std::vector<Step> backward;
  /// The cost model's prediction and measurement, in microseconds.
  std::optional<double> predictedUs;
  std::optional<double> measuredUs;
  /// The free-form `parallel` object, kept as JSON text ("" when absent).
  std::string parallelJson;
  /// The workspace bytes this variant's buffers occupy (from offset 0, a
  /// multiple of the alignment, <= workspace.bytes): a workspace this large
  /// runs it (`workspace_bytes`). Absent: the whole workspace
  /// (Plan::variantWorkspaceBytes).
  std::optional<int64_t> workspaceBytes;
};

struct Plan {
  int version = kPlanFormatVersion;
  std::string producer;
  LayerConfig layer;
  /// W, the ranks the plan runs on (`world.size`; 1 when absent). With
  /// E >= W each rank holds L = E / W experts: w1, w2, w3, b1, b2 and their
  /// gradients are [L, ...]. With E < W (W % E == 0) each expert is sharded
  /// over s = W / E ranks and each rank holds one shard ([1, ...], h / s
  /// hidden units; b2 whole).
  int64_t worldSize = 1;
  bool training = false;
  std::vector<Argument> arguments;
  Workspace workspace;
  std::vector<Variant> variants;
  int64_t defaultVariant = 0;

  /// The workspace bytes variant `v` needs (its `workspace_bytes`, else
  /// the whole workspace).
  int64_t variantWorkspaceBytes(size_t v) const {
    return variants[v].workspaceBytes.value_or(workspace.bytes);
  }
  /// s, the ranks that share each expert: W / E when E < W, else 1.
  int64_t shards() const { return expertShards(layer.experts, worldSize); }
  /// E * s: the experts the routing after `shard_routing` (and every
  /// dispatch-shaped buffer) counts; E without sharding.
  int64_t virtualExperts() const { return layer.experts * shards(); }
  /// L, the (virtual) experts each rank holds: E / W, or 1 when sharded.
  int64_t localExperts() const {
    return worldSize > 0 ? virtualExperts() / worldSize : layer.experts;
  }

  /// Index of the argument or workspace buffer named `name`.
  BufferRef findBuffer(std::string_view name) const;
  const BufferDesc &getBuffer(BufferRef ref) const;
  int64_t findArgument(std::string_view name) const; ///< -1 when absent
  int64_t findVariant(std::string_view name) const;  ///< -1 when absent
};

} // namespace flex

#endif // FLEX_RUNTIME_PLAN_H
