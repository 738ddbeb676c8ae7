//===- StepSchema.cpp - The step schema, expanded from StepKinds.def ------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file builds the table of step kinds from StepKinds.def and counts the
// work of a step from its operands' shapes.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/StepSchema.h"

#include <algorithm>

namespace flex {
namespace {

constexpr std::string_view kStepAttrNames[] = {
#define FLEX_STEP_ATTR(Name, spelling, field) spelling,
#include "flex/Runtime/StepKinds.def"
};

#define FLEX_UNPAREN(...) __VA_ARGS__
#define FLEX_REQ(Role)                                                         \
  OperandSpec { OperandRole::Role, true }
#define FLEX_OPT(Role)                                                         \
  OperandSpec { OperandRole::Role, false }
#define FLEX_ATTR(Name) StepAttr::Name

const std::vector<StepKindInfo> &stepKinds() {
  static const std::vector<StepKindInfo> kinds = {
#define FLEX_STEP(Name, spelling, traits, ins, outs, attrs, cost)              \
  StepKindInfo{StepOp::Name,                                                   \
               spelling,                                                       \
               (traits),                                                       \
               {FLEX_UNPAREN ins},                                             \
               {FLEX_UNPAREN outs},                                            \
               {FLEX_UNPAREN attrs},                                           \
               cost},
#include "flex/Runtime/StepKinds.def"
  };
  return kinds;
}

#undef FLEX_UNPAREN
#undef FLEX_REQ
#undef FLEX_OPT
#undef FLEX_ATTR

/// The roles whose buffers hold rows of experts: the rows a step touches
/// are fewer than the buffer's once the capacity is known.
bool holdsExpertRows(OperandRole role) {
  using R = OperandRole;
  switch (role) {
  case R::Dispatched:
  case R::A:
  case R::C:
  case R::Pre:
  case R::GateIn:
  case R::UpIn:
  case R::ExpertOut:
  case R::GradExpertOut:
  case R::GradC:
  case R::Grad:
  case R::GradPre:
  case R::GradGateIn:
  case R::GradUpIn:
  case R::GradDispatched:
  case R::RowTokens:
  case R::Input:
  case R::Output:
    return true;
  default:
    return false;
  }
}

/// The rows of `desc` a step touches: `rows` (clamped) for expert rows.
int64_t touchedRows(const BufferDesc &desc, OperandRole role, int64_t rows) {
  if (desc.shape.empty())
    return 1;
  if (rows >= 0 && holdsExpertRows(role))
    return std::min(rows, desc.shape.front());
  return desc.shape.front();
}

double touchedBytes(const BufferDesc &desc, OperandRole role, int64_t rows) {
  if (desc.shape.empty() || desc.shape.front() == 0)
    return static_cast<double>(desc.numBytes());
  return static_cast<double>(desc.numBytes()) /
         static_cast<double>(desc.shape.front()) *
         static_cast<double>(touchedRows(desc, role, rows));
}

} // namespace

std::string_view toString(StepAttr attr) {
  return kStepAttrNames[static_cast<int>(attr)];
}

std::optional<StepAttr> parseStepAttr(std::string_view text) {
  for (int i = 0; i < kNumStepAttrs; ++i)
    if (kStepAttrNames[i] == text)
      return static_cast<StepAttr>(i);
  return std::nullopt;
}

std::string_view toString(StepCost cost) {
  switch (cost) {
  case StepCost::Memory:
    return "memory";
  case StepCost::Launch:
    return "launch";
  case StepCost::RouterGemm:
    return "router_gemm";
  case StepCost::ExpertGemm:
    return "expert_gemm";
  case StepCost::ExpertWgrad:
    return "expert_wgrad";
  case StepCost::Exchange:
    return "exchange";
  case StepCost::Gather:
    return "gather";
  case StepCost::ReduceScatter:
    return "reduce_scatter";
  case StepCost::Sync:
    return "sync";
  }
  return "unknown";
}

OperandRole gemmProductRole(StepOp op) {
  return op == StepOp::GroupedGemmGluBackward ? OperandRole::GradGateIn
                                              : OperandRole::C;
}

bool StepKindInfo::takesAttr(StepAttr attr) const {
  return std::find(attrs.begin(), attrs.end(), attr) != attrs.end();
}

const StepKindInfo &getStepKind(StepOp op) {
  return stepKinds()[static_cast<int>(op)];
}

StepWork getStepWork(const Plan &plan, const Step &step, int64_t rows) {
  using R = OperandRole;
  StepWork work;
  for (int r = 0; r < kNumOperandRoles; ++r) {
    auto role = static_cast<OperandRole>(r);
    if (step.inputs[r].isValid())
      work.bytesRead +=
          touchedBytes(plan.getBuffer(step.inputs[r]), role, rows);
    if (step.outputs[r].isValid())
      work.bytesWritten +=
          touchedBytes(plan.getBuffer(step.outputs[r]), role, rows);
  }
  auto buffer = [&](const BufferRef &ref) -> const BufferDesc & {
    return plan.getBuffer(ref);
  };
  const LayerConfig &layer = plan.layer;
  const int64_t groupW = step.attrs.groupRanks(plan.worldSize);
  switch (getStepKind(step.op).cost) {
  case StepCost::RouterGemm: {
    double gemm = 2.0 * static_cast<double>(layer.tokens) *
                  static_cast<double>(layer.modelDim) *
                  static_cast<double>(layer.experts);
    // The backward is two GEMMs: grad_x and grad_wg.
    work.flops = step.op == StepOp::RouterBackward ? 2 * gemm : gemm;
    break;
  }
  case StepCost::ExpertGemm: {
    // The product's rows are c's: a is x [T, K] when row_tokens gathers.
    // grouped_gemm_glu computes two products (gate and up) of c's shape.
    const BufferDesc &a = buffer(step.in(R::A)),
                     &c = buffer(step.out(gemmProductRole(step.op)));
    const double products = step.op == StepOp::GroupedGemmGlu ? 2.0 : 1.0;
    work.flops =
        products * 2.0 *
        static_cast<double>(touchedRows(c, gemmProductRole(step.op), rows)) *
        static_cast<double>(a.shape.back()) *
        static_cast<double>(c.shape.back());
    break;
  }
  case StepCost::ExpertWgrad: {
    const BufferDesc &a = buffer(step.in(R::A));
    const BufferDesc &gradC = buffer(step.in(R::GradC));
    work.flops = 2.0 * static_cast<double>(touchedRows(gradC, R::GradC, rows)) *
                 static_cast<double>(a.shape.back()) *
                 static_cast<double>(gradC.shape.back());
    break;
  }
  case StepCost::Exchange: {
    // One chunk of the rows; 1 / W of them stay on this rank.
    const BufferDesc &input = buffer(step.in(R::Input));
    double chunk = touchedBytes(input, R::Input, rows) /
                   static_cast<double>(std::max<int64_t>(1, step.attrs.chunks));
    work.bytesExchanged =
        chunk * static_cast<double>(groupW - 1) / static_cast<double>(groupW);
    break;
  }
  case StepCost::Gather:
    work.bytesExchanged =
        static_cast<double>(buffer(step.in(R::Input)).numBytes()) *
        static_cast<double>(groupW - 1);
    break;
  case StepCost::ReduceScatter:
    work.bytesExchanged =
        static_cast<double>(buffer(step.out(R::Output)).numBytes()) *
        static_cast<double>(groupW - 1);
    break;
  case StepCost::Sync:
    work.bytesExchanged = sizeof(int32_t);
    break;
  case StepCost::Memory:
  case StepCost::Launch:
    break;
  }
  return work;
}

} // namespace flex
