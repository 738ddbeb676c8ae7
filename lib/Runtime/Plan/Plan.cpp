//===- Plan.cpp - The in-memory model of a plan ---------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the names of the plan enums, the operand signature of
// each step op and the lookups of Plan.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Plan.h"
#include "flex/Runtime/Status.h"

#include <cassert>

namespace flex {

const char *toString(StatusCode code) {
  switch (code) {
  case StatusCode::Ok: return "ok";
  case StatusCode::InvalidArgument: return "invalid argument";
  case StatusCode::NotFound: return "not found";
  case StatusCode::OutOfRange: return "out of range";
  case StatusCode::FailedPrecondition: return "failed precondition";
  case StatusCode::Unavailable: return "unavailable";
  case StatusCode::NumericError: return "numeric error";
  case StatusCode::IOError: return "I/O error";
  case StatusCode::InvalidPlan: return "invalid plan";
  case StatusCode::Internal: return "internal error";
  case StatusCode::CommunicationError: return "communication error";
  }
  return "unknown status";
}

namespace {
// Names indexed by enum value; the parse functions search them.
constexpr std::string_view kStepOpNames[kNumStepOps] = {
    "router",
    "gate",
    "dispatch",
    "grouped_gemm",
    "glu",
    "combine",
    "combine_backward",
    "grouped_gemm_wgrad",
    "activation_backward",
    "glu_backward",
    "dispatch_backward",
    "gate_backward",
    "router_backward",
    "sync_capacity",
    "all_to_all",
    "uniform_segments",
    "all_gather",
    "reduce_scatter",
    "shard_routing",
    "shard_routing_backward",
};

constexpr std::string_view kOperandRoleNames[kNumOperandRoles] = {
    "x",           "wg",           "logits",
    "scores",      "indices",      "locations",
    "gates",       "capacity",     "expert_offsets",
    "expert_rows", "l_aux",        "dispatched",
    "a",           "b",            "bias",
    "c",           "gate_in",      "up_in",
    "expert_out",  "out",          "grad_out",
    "grad_expert_out", "grad_gates", "grad_c",
    "grad_b",      "grad_bias",    "pre",
    "grad",        "grad_pre",     "grad_gate_in",
    "grad_up_in",  "grad_dispatched", "grad_x",
    "grad_l_aux",  "grad_logits",  "grad_wg",
    "input",       "output",
};

template <typename Enum, size_t N>
std::optional<Enum> parseByName(const std::string_view (&names)[N],
                                std::string_view text) {
  for (size_t i = 0; i < N; ++i)
    if (names[i] == text)
      return static_cast<Enum>(i);
  return std::nullopt;
}

constexpr std::string_view kArgumentRoleNames[] = {"input", "output",
                                                   "grad_input", "grad_output"};
constexpr std::string_view kLayoutNames[] = {"padded", "ragged"};
constexpr std::string_view kEpilogueNames[] = {"none", "relu", "gelu", "silu"};
constexpr std::string_view kDirectionNames[] = {"dispatch", "combine"};
} // namespace

std::string_view toString(StepOp op) {
  return kStepOpNames[static_cast<int>(op)];
}
std::optional<StepOp> parseStepOp(std::string_view text) {
  return parseByName<StepOp>(kStepOpNames, text);
}
std::string_view toString(OperandRole role) {
  return kOperandRoleNames[static_cast<int>(role)];
}
std::optional<OperandRole> parseOperandRole(std::string_view text) {
  return parseByName<OperandRole>(kOperandRoleNames, text);
}
std::string_view toString(ArgumentRole role) {
  return kArgumentRoleNames[static_cast<int>(role)];
}
std::optional<ArgumentRole> parseArgumentRole(std::string_view text) {
  return parseByName<ArgumentRole>(kArgumentRoleNames, text);
}
std::string_view toString(DispatchLayout layout) {
  return kLayoutNames[static_cast<int>(layout)];
}
std::optional<DispatchLayout> parseDispatchLayout(std::string_view text) {
  return parseByName<DispatchLayout>(kLayoutNames, text);
}
std::string_view toString(Epilogue epilogue) {
  return kEpilogueNames[static_cast<int>(epilogue)];
}
std::optional<Epilogue> parseEpilogue(std::string_view text) {
  return parseByName<Epilogue>(kEpilogueNames, text);
}
std::string_view toString(AllToAllDirection direction) {
  return kDirectionNames[static_cast<int>(direction)];
}
std::optional<AllToAllDirection>
parseAllToAllDirection(std::string_view text) {
  return parseByName<AllToAllDirection>(kDirectionNames, text);
}

bool isCollective(StepOp op) {
  switch (op) {
  case StepOp::SyncCapacity:
  case StepOp::AllToAll:
  case StepOp::AllGather:
  case StepOp::ReduceScatter:
    return true;
  default:
    return false;
  }
}

const StepSignature &getStepSignature(StepOp op) {
  using R = OperandRole;
  // "routing" in PlanFormat.md: the kernels need the roles listed as
  // required; the other routing buffers may be passed and are ignored.
  static const StepSignature signatures[kNumStepOps] = {
      /*router*/ {{R::X, R::Wg}, {}, {R::Logits}, {}},
      /*gate*/
      {{R::Logits},
       {},
       {R::Scores, R::Indices, R::Locations, R::Gates, R::Capacity,
        R::ExpertOffsets, R::ExpertRows, R::LAux},
       {}},
      /*dispatch*/
      {{R::X, R::Indices, R::Locations, R::Capacity, R::ExpertOffsets},
       {R::Gates, R::ExpertRows},
       {R::Dispatched},
       {}},
      /*grouped_gemm*/
      // `pre` (an extension of format v1, optional): the value before the
      // epilogue, kept for activation_backward so training needs one GEMM.
      {{R::A, R::B, R::ExpertOffsets, R::ExpertRows}, {R::Bias}, {R::C},
       {R::Pre}},
      /*glu*/
      {{R::GateIn, R::UpIn, R::ExpertOffsets, R::ExpertRows}, {}, {R::C}, {}},
      /*combine*/
      {{R::ExpertOut, R::Indices, R::Locations, R::Gates, R::Capacity,
        R::ExpertOffsets},
       {R::ExpertRows},
       {R::Out},
       {}},
      /*combine_backward*/
      {{R::GradOut, R::ExpertOut, R::Indices, R::Locations, R::Gates,
        R::Capacity, R::ExpertOffsets},
       {R::ExpertRows},
       {R::GradExpertOut, R::GradGates},
       {}},
      /*grouped_gemm_wgrad*/
      {{R::A, R::GradC, R::ExpertOffsets, R::ExpertRows},
       {},
       {R::GradB},
       {R::GradBias}},
      /*activation_backward*/
      {{R::Pre, R::Grad, R::ExpertOffsets, R::ExpertRows}, {}, {R::GradPre},
       {}},
      /*glu_backward*/
      {{R::GateIn, R::UpIn, R::Grad, R::ExpertOffsets, R::ExpertRows},
       {},
       {R::GradGateIn, R::GradUpIn},
       {}},
      /*dispatch_backward*/
      {{R::GradDispatched, R::Indices, R::Locations, R::Capacity,
        R::ExpertOffsets},
       {R::Gates, R::ExpertRows},
       {R::GradX},
       {}},
      /*gate_backward*/
      {{R::GradGates, R::GradLAux, R::Scores, R::Indices},
       {R::Locations, R::Gates, R::Capacity, R::ExpertOffsets, R::ExpertRows},
       {R::GradLogits},
       {}},
      /*router_backward*/
      {{R::X, R::Wg, R::GradLogits}, {}, {R::GradX, R::GradWg}, {}},
      // sync_capacity reads and rewrites its outputs (the gate's).
      /*sync_capacity*/ {{}, {}, {R::Capacity, R::ExpertOffsets}, {}},
      /*all_to_all*/ {{R::Input, R::Capacity}, {}, {R::Output}, {}},
      /*uniform_segments*/
      {{R::Capacity}, {}, {R::ExpertOffsets, R::ExpertRows}, {}},
      /*all_gather*/ {{R::Input}, {}, {R::Output}, {}},
      /*reduce_scatter*/ {{R::Input}, {}, {R::Output}, {}},
      // The gate's routing in, the routing over E * s virtual experts out.
      /*shard_routing*/
      {{R::Indices, R::Locations, R::Gates, R::Capacity, R::ExpertRows},
       {R::ExpertOffsets},
       {R::Indices, R::Locations, R::Gates, R::ExpertOffsets, R::ExpertRows},
       {}},
      /*shard_routing_backward*/ {{R::GradGates}, {}, {R::GradGates}, {}},
  };
  return signatures[static_cast<int>(op)];
}

int64_t BufferDesc::numElements() const {
  int64_t count = 1;
  for (int64_t dim : shape)
    count *= dim;
  return count;
}

int64_t BufferDesc::numBytes() const {
  return numElements() * static_cast<int64_t>(dtypeSize(dtype));
}

BufferRef Plan::findBuffer(std::string_view name) const {
  for (size_t i = 0; i < arguments.size(); ++i)
    if (arguments[i].name == name)
      return {BufferRef::Kind::Argument, static_cast<int32_t>(i)};
  for (size_t i = 0; i < workspace.buffers.size(); ++i)
    if (workspace.buffers[i].name == name)
      return {BufferRef::Kind::Workspace, static_cast<int32_t>(i)};
  return {};
}

const BufferDesc &Plan::getBuffer(BufferRef ref) const {
  assert(ref.isValid() && "no buffer behind an absent operand");
  if (ref.kind == BufferRef::Kind::Argument)
    return arguments[ref.index];
  return workspace.buffers[ref.index];
}

int64_t Plan::findArgument(std::string_view name) const {
  for (size_t i = 0; i < arguments.size(); ++i)
    if (arguments[i].name == name)
      return static_cast<int64_t>(i);
  return -1;
}

int64_t Plan::findVariant(std::string_view name) const {
  for (size_t i = 0; i < variants.size(); ++i)
    if (variants[i].name == name)
      return static_cast<int64_t>(i);
  return -1;
}

} // namespace flex
