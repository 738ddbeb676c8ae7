//===- PlanVerifier.cpp - Check a plan, from JSON or built in memory
//--------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the plan verifier: the header (layer, argument table,
// sizes, workspace), every step through StepShapeRules.cpp, the multi-rank
// rules and the data flow of each variant.
//
//===----------------------------------------------------------------------===//

#include "PlanDetail.h"
#include "flex/Runtime/StepFacts.h"
#include "flex/Runtime/StepSchema.h"

#include <algorithm>
#include <limits>
#include <set>

namespace flex {
using namespace plan_detail;
namespace {

void checkBufferSize(const BufferDesc &desc, const std::string &path) {
  int64_t count = 1;
  for (int64_t dim : desc.shape) {
    std::optional<int64_t> next = checkedMul(count, dim);
    if (!next)
      fail(path + ".shape", "buffer '" + desc.name + "' of shape " +
                                shapeString(desc.shape) +
                                " has more elements than fit in int64");
    count = *next;
  }
  if (!checkedMul(count, static_cast<int64_t>(dtypeSize(desc.dtype))))
    fail(path + ".shape", "buffer '" + desc.name + "' of shape " +
                              shapeString(desc.shape) + " and dtype " +
                              std::string(toString(desc.dtype)) +
                              " has a byte size that overflows int64");
}

/// The buffer a step operand names, for the operand's message path.

std::vector<OperandRole> readOutputs(const Step &step) {
  using R = OperandRole;
  switch (step.op) {
  case StepOp::RouterBackward:
    return {R::GradX};
  case StepOp::GroupedGemm:
    return step.attrs.accumulate ? std::vector<R>{R::C} : std::vector<R>{};
  case StepOp::GroupedGemmWgrad:
    return step.attrs.accumulate ? std::vector<R>{R::GradB, R::GradBias}
                                 : std::vector<R>{};
  case StepOp::SyncCapacity:
    return {R::Capacity, R::ExpertOffsets};
  default:
    return {};
  }
}

/// The rules of multi-rank steps over one variant (PlanFormat.md, "Many
/// ranks"): the padded layout, chunks that divide the capacity, and one C
/// on every rank before tokens move.
void verifyRanks(const Plan &plan, size_t v, const Step &gate) {
  const Variant &variant = plan.variants[v];
  const std::string path = "variants[" + std::to_string(v) + "]";
  bool movesTokens = false;
  for (bool backward : {false, true}) {
    const std::vector<Step> &steps =
        backward ? variant.backward : variant.forward;
    for (size_t s = 0; s < steps.size(); ++s) {
      const Step &step = steps[s];
      if (step.op != StepOp::AllToAll && step.op != StepOp::UniformSegments)
        continue;
      movesTokens = true;
      // The chunks split the capacity C, which the gate aligns.
      if (step.attrs.chunks >= 1 &&
          gate.attrs.capacityAlignment % step.attrs.chunks != 0)
        fail(stepPath(v, backward, s) + ".attrs.chunks",
             "op '" + std::string(toString(step.op)) +
                 "' splits the "
                 "capacity into " +
                 std::to_string(step.attrs.chunks) +
                 " chunks, but the gate's capacity_alignment " +
                 std::to_string(gate.attrs.capacityAlignment) +
                 " is not a multiple of it");
    }
  }
  if ((plan.worldSize > 1 || movesTokens) &&
      gate.attrs.layout != DispatchLayout::Padded)
    fail(path + ".forward",
         "the gate's layout is '" + std::string(toString(gate.attrs.layout)) +
             "'; " +
             (plan.worldSize > 1 ? "multi-rank plans"
                                 : "plans with all_to_all or "
                                   "uniform_segments") +
             " use the 'padded' layout (PlanFormat.md, \"Many ranks\")");
  // With a data-dependent C, every rank must use one C before rows move:
  // sync_capacity between the gate and any step reading the gate's
  // capacity or offsets.
  if (!movesTokens || plan.worldSize == 1 ||
      plan.layer.capacityMode == CapacityMode::Fixed)
    return;
  const BufferRef capacity = gate.out(OperandRole::Capacity);
  const BufferRef offsets = gate.out(OperandRole::ExpertOffsets);
  bool afterGate = false;
  for (size_t s = 0; s < variant.forward.size(); ++s) {
    const Step &step = variant.forward[s];
    if (&step == &gate) {
      afterGate = true;
      continue;
    }
    if (!afterGate)
      continue;
    if (step.op == StepOp::SyncCapacity)
      return;
    for (const BufferRef &ref : step.inputs)
      if (ref.isValid() && (ref == capacity || ref == offsets))
        fail(stepPath(v, false, s),
             "op '" + std::string(toString(step.op)) + "' reads '" +
                 plan.getBuffer(ref).name +
                 "' before a 'sync_capacity' step: with capacity_mode '" +
                 std::string(toString(plan.layer.capacityMode)) + "' on " +
                 std::to_string(plan.worldSize) +
                 " ranks, every rank must use one C before tokens move; "
                 "put 'sync_capacity' right after the gate");
  }
  fail(path + ".forward",
       "no 'sync_capacity' step after the gate: with capacity_mode '" +
           std::string(toString(plan.layer.capacityMode)) + "' on " +
           std::to_string(plan.worldSize) +
           " ranks the all_to_all steps need one C on every rank");
}

/// The checks that need no steps: layer, sizes, argument table, workspace.
/// The reader runs them before it resolves step operands, so a missing
/// argument is reported as such, not as an unknown buffer name.
} // namespace

void plan_detail::verifyHeader(const Plan &plan) {
  if (std::optional<std::string> error = verifyLayerConfig(plan.layer))
    fail("layer", *error);
  const LayerConfig &layer = plan.layer;
  const int64_t W = plan.worldSize;
  if (W < 1 || W > (1 << 20))
    fail("world.size", "world size " + std::to_string(W) +
                           " is out of range; allowed: 1 to 2^20");
  // Each rank holds L = E / W whole experts, or one shard of h / s hidden
  // units of an expert shared by s = W / E ranks (PlanFormat.md, "Many
  // ranks").
  if (W > 1 && layer.experts % W != 0 && W % layer.experts != 0)
    fail("world.size",
         std::to_string(W) + " ranks cannot hold the " +
             std::to_string(layer.experts) +
             " experts whole or sharded: a multi-rank plan needs E % W == 0 "
             "(each rank "
             "holds L = E / W experts) or W % E == 0 (each expert sharded "
             "over s = W / E ranks)");
  if (const int64_t s = plan.shards(); s > 1 && layer.hiddenDim % s != 0)
    fail("world.size",
         std::to_string(W) + " ranks shard each of the " +
             std::to_string(layer.experts) + " experts over s = " +
             std::to_string(s) + " ranks, but hidden_dim " +
             std::to_string(layer.hiddenDim) + " is not a multiple of s");

  // Sizes first: every later check multiplies dims.
  for (size_t i = 0; i < plan.arguments.size(); ++i)
    checkBufferSize(plan.arguments[i], "arguments[" + std::to_string(i) + "]");
  for (size_t i = 0; i < plan.workspace.buffers.size(); ++i)
    checkBufferSize(plan.workspace.buffers[i],
                    "workspace.buffers[" + std::to_string(i) + "]");

  // The argument table is fixed by the layer (PlanFormat.md).
  std::vector<Argument> expected =
      getExpectedArguments(layer, plan.training, W);
  std::vector<std::string> expectedNames;
  for (const Argument &arg : expected)
    expectedNames.push_back(arg.name);
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    const Argument &arg = plan.arguments[i];
    std::string path = "arguments[" + std::to_string(i) + "]";
    auto it =
        std::find_if(expected.begin(), expected.end(),
                     [&](const Argument &e) { return e.name == arg.name; });
    if (it == expected.end())
      fail(path + ".name", "argument '" + arg.name +
                               "' is not an argument of this layer" +
                               (plan.training ? "" : " (training is false)") +
                               "; allowed: " + joinNames(expectedNames));
    if (arg.role != it->role)
      fail(path + ".role", "argument '" + arg.name + "' has role '" +
                               std::string(toString(arg.role)) +
                               "'; expected '" +
                               std::string(toString(it->role)) + "'");
    if (arg.dtype != it->dtype)
      fail(path + ".dtype", "argument '" + arg.name + "' has dtype " +
                                std::string(toString(arg.dtype)) +
                                "; the layer needs " +
                                std::string(toString(it->dtype)));
    if (arg.shape != it->shape)
      fail(path + ".shape", "argument '" + arg.name + "' has shape " +
                                shapeString(arg.shape) +
                                ", which disagrees with the layer: expected " +
                                shapeString(it->shape));
  }
  for (const Argument &e : expected)
    if (plan.findArgument(e.name) < 0)
      fail("arguments",
           "argument '" + e.name + "' (role " + std::string(toString(e.role)) +
               ") is missing; this layer needs " + joinNames(expectedNames));

  // Workspace bounds.
  const Workspace &ws = plan.workspace;
  if (ws.bytes < 0)
    fail("workspace.bytes",
         "size " + std::to_string(ws.bytes) + " is negative");
  if (ws.alignment <= 0 || (ws.alignment & (ws.alignment - 1)) != 0)
    fail("workspace.alignment", "alignment " + std::to_string(ws.alignment) +
                                    " is not a power of two");
  for (size_t i = 0; i < ws.buffers.size(); ++i) {
    const WorkspaceBuffer &buffer = ws.buffers[i];
    std::string path = "workspace.buffers[" + std::to_string(i) + "]";
    if (buffer.offset < 0 || buffer.offset % ws.alignment != 0)
      fail(path + ".offset", "offset " + std::to_string(buffer.offset) +
                                 " of buffer '" + buffer.name +
                                 "' is not a non-negative multiple of the " +
                                 "alignment " + std::to_string(ws.alignment));
    if (buffer.bytes < buffer.numBytes())
      fail(path + ".bytes", "buffer '" + buffer.name + "' reserves " +
                                std::to_string(buffer.bytes) +
                                " bytes but its shape " +
                                shapeString(buffer.shape) + " needs " +
                                std::to_string(buffer.numBytes()));
    int64_t end;
    if (__builtin_add_overflow(buffer.offset, buffer.bytes, &end) ||
        end > ws.bytes)
      fail(path, "buffer '" + buffer.name + "' at offset " +
                     std::to_string(buffer.offset) + " with " +
                     std::to_string(buffer.bytes) +
                     " bytes lies outside the workspace [0, " +
                     std::to_string(ws.bytes) + ")");
  }
}

namespace {

/// What the data flow of one variant has seen so far.
struct DataFlow {
  std::vector<bool> written, argWritten;
  /// Per workspace buffer, the roles (bits of OperandRole) steps wrote it in.
  std::vector<uint64_t> writtenAs;
  /// Per workspace buffer, the argument an all_gather gathered into it (a
  /// data-parallel variant's full weights); -1 for none.
  std::vector<int32_t> gatheredFrom;
  /// Per workspace buffer, the first and last step position using it.
  std::vector<std::pair<int64_t, int64_t>> live;
  /// Per workspace buffer written as row_tokens, the expert_offsets buffer
  /// of the routing dispatch_rows mapped; -1 for none.
  std::vector<int32_t> mappedOffsets;

  explicit DataFlow(const Plan &plan)
      : written(plan.workspace.buffers.size(), false),
        argWritten(plan.arguments.size(), false),
        writtenAs(plan.workspace.buffers.size(), 0),
        gatheredFrom(plan.workspace.buffers.size(), -1),
        live(plan.workspace.buffers.size(), {-1, -1}),
        mappedOffsets(plan.workspace.buffers.size(), -1) {}

  /// The argument whose value `ref` holds: itself, or the one gathered
  /// into it; -1 for a value steps computed.
  int32_t sourceArgument(const BufferRef &ref) const {
    if (ref.kind == BufferRef::Kind::Argument)
      return ref.index;
    return ref.kind == BufferRef::Kind::Workspace ? gatheredFrom[ref.index]
                                                  : -1;
  }
};

/// The variant's name, passes and its one gate, which it returns.
const Step &verifyVariantHeader(const Plan &plan, size_t v,
                                std::set<std::string> &variantNames) {
  const Variant &variant = plan.variants[v];
  std::string path = "variants[" + std::to_string(v) + "]";
  if (variant.name.empty())
    fail(path + ".name", "empty variant name");
  if (!variantNames.insert(variant.name).second)
    fail(path + ".name", "variant name '" + variant.name + "' is used twice");
  if (!plan.training && !variant.backward.empty())
    fail(path + ".backward",
         "an inference plan (training false) has no backward steps; got " +
             std::to_string(variant.backward.size()));
  if (plan.training && variant.backward.empty())
    fail(path + ".backward", "a training plan needs backward steps");

  // The layout comes from the gate step; one gate per forward.
  const Step *gate = nullptr;
  for (const Step &step : variant.forward)
    if (step.op == StepOp::Gate) {
      if (gate)
        fail(path + ".forward", "more than one 'gate' step");
      gate = &step;
    }
  if (!gate)
    fail(path + ".forward", "no 'gate' step; every forward routes once");
  for (const Step &step : variant.backward)
    if (step.op == StepOp::Gate)
      fail(path + ".backward", "a 'gate' step belongs in forward");
  return *gate;
}

/// The roles whose value is the same wherever it goes: what a step reads in
/// one of them, a step wrote in the same role (the routing a gate writes is
/// read as routing; `locations` read as `indices` would index out of range).
/// Other values change role on the way (a GEMM's `c` is combine's
/// `expert_out`).
bool isNamedValueRole(OperandRole role) {
  using R = OperandRole;
  switch (role) {
  case R::Logits:
  case R::Scores:
  case R::Indices:
  case R::Locations:
  case R::Gates:
  case R::Capacity:
  case R::ExpertOffsets:
  case R::ExpertRows:
  case R::GradGates:
  case R::GradLogits:
  case R::RowTokens:
    return true;
  default:
    return false;
  }
}

void checkReadAs(const Plan &plan, OperandRole role, const BufferRef &ref,
                 const std::string &at, const DataFlow &flow) {
  if (!isNamedValueRole(role) ||
      (flow.writtenAs[ref.index] >> static_cast<int>(role)) & 1)
    return;
  std::string wroteAs;
  for (int r = 0; r < kNumOperandRoles; ++r)
    if ((flow.writtenAs[ref.index] >> r) & 1)
      wroteAs += (wroteAs.empty() ? "" : ", ") +
                 std::string(toString(static_cast<OperandRole>(r)));
  fail(at + ".in." + std::string(toString(role)),
       "buffer '" + plan.workspace.buffers[ref.index].name + "' is read as " +
           std::string(toString(role)) +
           ", but no earlier step wrote it as one (it was written as " +
           wroteAs + ")");
}

/// A grouped_gemm multiplies by an expert weight and adds an expert bias:
/// its `b` holds w1, w2 or w3 and its `bias` b1 or b2 (the arguments, or
/// what an all_gather gathered from them), never a value steps computed.
/// grouped_gemm_glu's `b` is the gate's weight w1 and its `b_up` the up
/// projection's w3: square experts' w2 has their shape, and would compute
/// another layer.
void checkGemmWeights(const Plan &plan, const Step &step, const std::string &at,
                      const DataFlow &flow) {
  using R = OperandRole;
  struct Source {
    OperandRole role;
    std::vector<std::string_view> names;
    const char *what;
  };
  std::vector<Source> sources;
  if (step.op == StepOp::GroupedGemm || step.op == StepOp::GroupedGemmCombine ||
      step.op == StepOp::GroupedGemmActivationBackward ||
      step.op == StepOp::GroupedGemmGluBackward)
    sources = {{R::B, {"w1", "w2", "w3"}, "an expert weight (w1, w2, w3"},
               {R::Bias, {"b1", "b2"}, "an expert bias (b1, b2"}};
  else if (step.op == StepOp::GroupedGemmGlu)
    sources = {{R::B, {"w1"}, "the gate's expert weight (w1"},
               {R::BUp, {"w3"}, "the up projection's expert weight (w3"}};
  for (const Source &expected : sources) {
    const BufferRef &ref = step.in(expected.role);
    if (!ref.isValid())
      continue;
    const int32_t source = flow.sourceArgument(ref);
    const std::string_view name =
        source >= 0 ? std::string_view(plan.arguments[source].name) : "";
    if (std::find(expected.names.begin(), expected.names.end(), name) ==
        expected.names.end())
      fail(at + ".in." + std::string(toString(expected.role)),
           "buffer '" + plan.getBuffer(ref).name + "' is not " + expected.what +
               ", or what an all_gather gathered from " +
               (expected.names.size() > 1 ? "one)" : "it)"));
  }
}

/// A gather-fused GEMM (row_tokens) reads its A rows from the layer's
/// input: `a` is the argument x.
void checkGatheredRows(const Plan &plan, const Step &step,
                       const std::string &at, const DataFlow &flow) {
  using R = OperandRole;
  if (!step.gathersA())
    return;
  const int32_t source = flow.sourceArgument(step.in(R::A));
  if (source < 0 || plan.arguments[source].name != "x")
    fail(at + ".in.a", "buffer '" + plan.getBuffer(step.in(R::A)).name +
                           "' is not the layer's input x; with row_tokens, "
                           "a grouped GEMM gathers its rows from x");
  // The rows it maps are those of the routing the GEMM's segments follow.
  const BufferRef &rowTokens = step.in(R::RowTokens);
  const BufferRef &offsets = step.in(R::ExpertOffsets);
  if (rowTokens.kind == BufferRef::Kind::Workspace &&
      offsets.kind == BufferRef::Kind::Workspace &&
      flow.mappedOffsets[rowTokens.index] >= 0 &&
      flow.mappedOffsets[rowTokens.index] != offsets.index)
    fail(at + ".in.row_tokens",
         "buffer '" + plan.getBuffer(rowTokens).name +
             "' maps the rows of the routing in '" +
             plan.workspace.buffers[flow.mappedOffsets[rowTokens.index]].name +
             "', but this grouped GEMM's segments follow '" +
             plan.getBuffer(offsets).name + "'");
}

/// The roles that always name one argument of the layer (x is the layer's
/// input wherever a step reads `x`).
void checkArgumentRoles(const Plan &plan, const Step &step,
                        const std::string &at) {
  using R = OperandRole;
  static constexpr std::pair<OperandRole, const char *> kArguments[] = {
      {R::X, "x"},
      {R::Wg, "wg"},
      {R::Out, "out"},
      {R::LAux, "l_aux"},
      {R::GradOut, "grad_out"},
      {R::GradLAux, "grad_l_aux"},
      {R::GradX, "grad_x"},
      {R::GradWg, "grad_wg"}};
  for (auto [role, name] : kArguments)
    for (bool isInput : {true, false}) {
      const BufferRef &ref = isInput ? step.in(role) : step.out(role);
      if (!ref.isValid() || (ref.kind == BufferRef::Kind::Argument &&
                             plan.arguments[ref.index].name == name))
        continue;
      fail(at + (isInput ? ".in." : ".out.") + std::string(toString(role)),
           "role " + std::string(toString(role)) +
               " is the layer's argument '" + name + "', not '" +
               plan.getBuffer(ref).name + "'");
    }
}

/// Data flow of one step: workspace buffers are written before they are
/// read, inputs are never written, outputs are written in the right pass.
void checkStepDataFlow(const Plan &plan, const Step &step,
                       const std::string &at, bool backward, size_t s,
                       int64_t position, DataFlow &flow) {
  // A step that adds into its output (or rewrites it) reads it
  // first: it must hold a value written earlier, not uninitialized
  // memory.
  for (OperandRole accumulated : readOutputs(step)) {
    const BufferRef &target = step.out(accumulated);
    if (!target.isValid())
      continue;
    bool wasWritten = target.kind == BufferRef::Kind::Workspace
                          ? static_cast<bool>(flow.written[target.index])
                          : static_cast<bool>(flow.argWritten[target.index]);
    if (!wasWritten)
      fail(at + ".out." + std::string(toString(accumulated)),
           "op '" + std::string(toString(step.op)) +
               (step.op == StepOp::SyncCapacity ? "' rewrites '"
                                                : "' adds into '") +
               plan.getBuffer(target).name + "', which no earlier step writes");
  }
  for (int32_t waitOn : step.wait)
    if (waitOn >= static_cast<int32_t>(s))
      fail(at + ".wait", "step " + std::to_string(s) + " waits on step " +
                             std::to_string(waitOn) +
                             ", which does not come before it");
  for (int r = 0; r < kNumOperandRoles; ++r) {
    const BufferRef &ref = step.inputs[r];
    if (ref.kind != BufferRef::Kind::Workspace)
      continue;
    if (!flow.written[ref.index])
      fail(at + ".in." + std::string(toString(static_cast<OperandRole>(r))),
           "workspace buffer '" + plan.workspace.buffers[ref.index].name +
               "' is read before any step writes it");
    checkReadAs(plan, static_cast<OperandRole>(r), ref, at, flow);
  }
  for (int r = 0; r < kNumOperandRoles; ++r)
    for (const BufferRef *ref : {&step.inputs[r], &step.outputs[r]})
      if (ref->kind == BufferRef::Kind::Workspace) {
        auto &interval = flow.live[ref->index];
        if (interval.first < 0)
          interval.first = position;
        interval.second = position;
      }
  for (int r = 0; r < kNumOperandRoles; ++r) {
    const BufferRef &ref = step.outputs[r];
    std::string rolePath =
        at + ".out." + std::string(toString(static_cast<OperandRole>(r)));
    if (ref.kind == BufferRef::Kind::Workspace) {
      flow.written[ref.index] = true;
      flow.writtenAs[ref.index] |= uint64_t{1} << r;
      flow.gatheredFrom[ref.index] =
          step.op == StepOp::AllGather
              ? flow.sourceArgument(step.in(OperandRole::Input))
              : -1;
      flow.mappedOffsets[ref.index] =
          step.op == StepOp::DispatchRows &&
                  step.in(OperandRole::ExpertOffsets).kind ==
                      BufferRef::Kind::Workspace
              ? step.in(OperandRole::ExpertOffsets).index
              : -1;
      continue;
    }
    if (ref.kind != BufferRef::Kind::Argument)
      continue;
    const Argument &arg = plan.arguments[ref.index];
    ArgumentRole allowed =
        backward ? ArgumentRole::GradOutput : ArgumentRole::Output;
    if (arg.role != allowed)
      fail(rolePath, "step writes argument '" + arg.name + "' of role '" +
                         std::string(toString(arg.role)) + "'; " +
                         (backward ? "backward" : "forward") +
                         " steps may write only '" +
                         std::string(toString(allowed)) +
                         "' arguments and workspace buffers");
    flow.argWritten[ref.index] = true;
  }
  checkArgumentRoles(plan, step, at);
  checkGemmWeights(plan, step, at, flow);
  checkGatheredRows(plan, step, at, flow);
}

/// Every output argument of the pass is produced, and every argument the
/// pass takes in is read: a layer's parameter (a bias, say) that no step
/// reads would make the plan compute another layer.
void checkPassArguments(const Plan &plan, const std::vector<Step> &steps,
                        const std::string &path, bool backward,
                        const DataFlow &flow) {
  ArgumentRole produced =
      backward ? ArgumentRole::GradOutput : ArgumentRole::Output;
  ArgumentRole taken = backward ? ArgumentRole::GradInput : ArgumentRole::Input;
  std::vector<bool> read(plan.arguments.size(), false);
  std::vector<bool> readValue(plan.arguments.size(), false);
  for (const Step &step : steps)
    for (const BufferRef &ref : step.inputs) {
      if (ref.kind == BufferRef::Kind::Argument)
        read[ref.index] = true;
      if (int32_t source = flow.sourceArgument(ref); source >= 0)
        readValue[source] = true;
    }
  const std::string pass = path + (backward ? ".backward" : ".forward");
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    const Argument &arg = plan.arguments[i];
    if (arg.role == produced && !flow.argWritten[i])
      fail(pass, "argument '" + arg.name + "' (role " +
                     std::string(toString(produced)) +
                     ") is written by no step");
    if (arg.role == taken && !read[i])
      fail(pass, "argument '" + arg.name + "' (role " +
                     std::string(toString(taken)) +
                     ") is read by no step: the layer needs it");
    // The gradients go back through every weight matrix (and grad_wg needs
    // x): a backward that reads one of them nowhere computes another
    // layer's gradients.
    static constexpr std::string_view kMatrices[] = {"x", "wg", "w1", "w2",
                                                     "w3"};
    if (backward && plan.training && !readValue[i] &&
        std::find(std::begin(kMatrices), std::end(kMatrices), arg.name) !=
            std::end(kMatrices))
      fail(pass, "argument '" + arg.name +
                     "' is read by no backward step (directly or gathered): "
                     "the gradients need it");
  }
}

/// Same op, operands and declared attributes (StepKinds.def).
bool sameStep(const Step &a, const Step &b) {
  if (a.op != b.op || a.inputs != b.inputs || a.outputs != b.outputs)
    return false;
  for (StepAttr attr : getStepKind(a.op).attrs)
    switch (attr) {
#define FLEX_STEP_ATTR(Name, spelling, field)                                  \
  case StepAttr::Name:                                                         \
    if (!(a.attrs.field == b.attrs.field))                                     \
      return false;                                                            \
    break;
#include "flex/Runtime/StepKinds.def"
    }
  return true;
}

/// A step that repeats an earlier one of its pass, with nothing written in
/// between to its operands, computes nothing new, or adds its result twice:
/// either way not the layer.
void checkNoRepeatedStep(const std::vector<Step> &steps, size_t v,
                         bool backward) {
  for (size_t j = 0; j < steps.size(); ++j)
    for (size_t i = j; i-- > 0;) {
      const Step &earlier = steps[i], &step = steps[j];
      if (sameStep(earlier, step))
        fail(stepPath(v, backward, j),
             "op '" + std::string(toString(step.op)) + "' repeats " +
                 stepPath(v, backward, i) +
                 " with the same operands and attributes and nothing "
                 "written to them in between");
      // Stop at the nearest step that writes one of this step's operands.
      bool writesOperand = false;
      for (const BufferRef &out : earlier.outputs)
        if (out.isValid())
          for (int r = 0; r < kNumOperandRoles && !writesOperand; ++r)
            writesOperand = out == step.inputs[r] || out == step.outputs[r];
      if (writesOperand)
        break;
    }
}

/// No two workspace buffers share bytes while both are live. The compiler's
/// memory plan places them so; a corrupted offset would make two values
/// clobber each other, so the loader always checks.
void checkLiveness(const Plan &plan, const Variant &variant,
                   const DataFlow &flow) {
  const Workspace &ws = plan.workspace;
  const auto &live = flow.live;
  for (size_t i = 0; i < ws.buffers.size(); ++i)
    for (size_t j = i + 1; j < ws.buffers.size(); ++j) {
      const WorkspaceBuffer &a = ws.buffers[i], &b = ws.buffers[j];
      if (live[i].first < 0 || live[j].first < 0)
        continue;
      bool bytesOverlap = a.offset < b.offset + b.numBytes() &&
                          b.offset < a.offset + a.numBytes();
      bool timeOverlap =
          live[i].first <= live[j].second && live[j].first <= live[i].second;
      if (bytesOverlap && timeOverlap && a.numBytes() && b.numBytes())
        fail("workspace.buffers[" + std::to_string(j) + "]",
             "buffer '" + b.name + "' [" + std::to_string(b.offset) + ", " +
                 std::to_string(b.offset + b.numBytes()) +
                 ") overlaps buffer '" + a.name + "' [" +
                 std::to_string(a.offset) + ", " +
                 std::to_string(a.offset + a.numBytes()) +
                 ") while both are live in variant '" + variant.name + "'");
    }
}

/// A variant's `workspace_bytes` holds every buffer its steps use: the
/// runtime runs it on a workspace of just that size.
void checkVariantWorkspace(const Plan &plan, size_t v, const DataFlow &flow) {
  const Variant &variant = plan.variants[v];
  if (!variant.workspaceBytes)
    return;
  const Workspace &ws = plan.workspace;
  const int64_t bytes = *variant.workspaceBytes;
  const std::string path =
      "variants[" + std::to_string(v) + "].workspace_bytes";
  if (bytes < 0 || bytes > ws.bytes)
    fail(path, "variant '" + variant.name + "' needs " + std::to_string(bytes) +
                   " workspace bytes, outside [0, workspace.bytes = " +
                   std::to_string(ws.bytes) + "]");
  for (size_t i = 0; i < ws.buffers.size(); ++i) {
    const WorkspaceBuffer &buffer = ws.buffers[i];
    if (flow.live[i].first < 0 || buffer.offset + buffer.numBytes() <= bytes)
      continue;
    fail(path, "variant '" + variant.name + "' uses buffer '" + buffer.name +
                   "' [" + std::to_string(buffer.offset) + ", " +
                   std::to_string(buffer.offset + buffer.numBytes()) +
                   ") beyond its " + std::to_string(bytes) +
                   " workspace bytes");
  }
}

} // namespace

void plan_detail::verify(const Plan &plan, const PlanCheckOptions &) {
  verifyHeader(plan);
  if (plan.variants.empty())
    fail("variants", "a plan needs at least one variant");
  if (plan.defaultVariant < 0 ||
      plan.defaultVariant >= static_cast<int64_t>(plan.variants.size()))
    fail("default_variant", "index " + std::to_string(plan.defaultVariant) +
                                " is out of range; the plan has " +
                                std::to_string(plan.variants.size()) +
                                " variants");
  std::set<std::string> variantNames;
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    const Variant &variant = plan.variants[v];
    const Step &gate = verifyVariantHeader(plan, v, variantNames);
    verifyRanks(plan, v, gate);
    DataFlow flow(plan);
    int64_t position = 0;
    for (bool backward : {false, true}) {
      const std::vector<Step> &steps =
          backward ? variant.backward : variant.forward;
      for (size_t s = 0; s < steps.size(); ++s, ++position) {
        std::string at = stepPath(v, backward, s);
        checkStepShapes(plan, steps[s], at, gate.attrs, backward);
        checkStepDataFlow(plan, steps[s], at, backward, s, position, flow);
      }
      checkNoRepeatedStep(steps, v, backward);
      checkPassArguments(plan, steps, "variants[" + std::to_string(v) + "]",
                         backward, flow);
    }
    checkLiveness(plan, variant, flow);
    checkVariantWorkspace(plan, v, flow);
  }
  // The facts backends are told (recorded by the compiler or derived by the
  // reader) are the ones the data flow gives.
  try {
    checkStepFacts(plan);
  } catch (const StepFactsError &error) {
    throw PlanError{error.what()};
  }
}

std::string plan_detail::stepPath(size_t variant, bool backward, size_t index) {
  return "variants[" + std::to_string(variant) + "]." +
         (backward ? "backward[" : "forward[") + std::to_string(index) + "]";
}

/// The outputs a step reads before writing: accumulation targets, and what

std::vector<Argument> getExpectedArguments(const LayerConfig &layer,
                                           bool training, int64_t worldSize) {
  const int64_t T = layer.tokens, d = layer.modelDim, h = layer.hiddenDim,
                E = layer.experts;
  // Expert parameters are the rank's L = E / W experts, or its shard of
  // h / s hidden units of one expert (b2 whole) when E < W.
  const int64_t s = expertShards(E, worldSize);
  const int64_t L = s > 1 ? 1 : worldSize > 1 ? E / worldSize : E;
  const int64_t hl = h / s;
  const DType dt = layer.dtype;
  const DType routerType = layer.routerFp32 ? DType::F32 : dt;
  const bool ffn = layer.expertKind == ExpertKind::FFN;
  const bool bias = ffn && layer.bias;
  const bool gated = layer.expertKind == ExpertKind::Gated;
  std::vector<Argument> args;
  auto add = [&](const char *name, ArgumentRole role, DType dtype,
                 std::vector<int64_t> shape) {
    Argument arg;
    arg.name = name;
    arg.role = role;
    arg.dtype = dtype;
    arg.shape = std::move(shape);
    args.push_back(std::move(arg));
  };
  using AR = ArgumentRole;
  struct Param {
    const char *name, *gradName;
    DType dtype;
    std::vector<int64_t> shape;
    bool present;
  };
  std::vector<Param> params = {
      {"x", "grad_x", dt, {T, d}, true},
      {"wg", "grad_wg", routerType, {d, E}, true},
      {"w1", "grad_w1", dt, {L, d, hl}, true},
      {"b1", "grad_b1", dt, {L, hl}, bias},
      {"w2", "grad_w2", dt, {L, hl, d}, true},
      {"b2", "grad_b2", dt, {L, d}, bias},
      {"w3", "grad_w3", dt, {L, d, hl}, gated},
  };
  for (const Param &p : params)
    if (p.present)
      add(p.name, AR::Input, p.dtype, p.shape);
  add("out", AR::Output, dt, {T, d});
  add("l_aux", AR::Output, DType::F32, {1});
  if (training) {
    add("grad_out", AR::GradInput, dt, {T, d});
    add("grad_l_aux", AR::GradInput, DType::F32, {1});
    for (const Param &p : params)
      if (p.present)
        add(p.gradName, AR::GradOutput, p.dtype, p.shape);
  }
  return args;
}

Status verifyPlan(const Plan &plan, const PlanCheckOptions &options) {
  try {
    verify(plan, options);
  } catch (const PlanError &error) {
    return Status(StatusCode::InvalidPlan, error.message);
  } catch (const std::exception &error) {
    return Status(StatusCode::InvalidPlan,
                  std::string("plan rejected: ") + error.what());
  }
  return Status::ok();
}

} // namespace flex
