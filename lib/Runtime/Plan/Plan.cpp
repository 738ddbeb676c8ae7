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
#include "flex/Runtime/StepSchema.h"
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
constexpr std::string_view kStepOpNames[] = {
#define FLEX_STEP(Name, spelling, traits, ins, outs, attrs, cost) spelling,
#include "flex/Runtime/StepKinds.def"
};

constexpr std::string_view kOperandRoleNames[] = {
#define FLEX_OPERAND_ROLE(Name, spelling, dims, dtype) spelling,
#include "flex/Runtime/StepKinds.def"
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
constexpr std::string_view kLayoutNames[] = {"padded", "ragged", "aligned"};
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
  return getStepKind(op).has(kStepCollective);
}

const StepSignature &getStepSignature(StepOp op) {
  static const std::vector<StepSignature> signatures = [] {
    std::vector<StepSignature> result(kNumStepOps);
    for (int i = 0; i < kNumStepOps; ++i) {
      const StepKindInfo &kind = getStepKind(static_cast<StepOp>(i));
      for (const OperandSpec &spec : kind.inputs)
        (spec.required ? result[i].requiredInputs : result[i].optionalInputs)
            .push_back(spec.role);
      for (const OperandSpec &spec : kind.outputs)
        (spec.required ? result[i].requiredOutputs
                       : result[i].optionalOutputs)
            .push_back(spec.role);
    }
    return result;
  }();
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
