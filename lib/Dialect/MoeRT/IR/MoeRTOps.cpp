//===- MoeRTOps.cpp - Operations of the moert dialect ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the role-named syntax of the steps and their
// verifiers: every operand of a step has the shape and element type its role
// needs (rules [plan-1] shapes, [plan-2] element types, [plan-3] structure).
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"
#include "flex/Runtime/Core/Capacity.h"
#include "flex/Runtime/Core/KernelArgs.h"
#include "flex/Runtime/RoleShapes.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/OpImplementation.h"
#include "llvm/ADT/StringMap.h"
#include "llvm/ADT/StringSet.h"
#include "llvm/Support/MathExtras.h"

#include <cmath>

using namespace mlir;
using namespace flex::moert;

#include "flex/Dialect/MoeRT/IR/MoeRTInterfaces.cpp.inc"

//===----------------------------------------------------------------------===//
// Role-named operand syntax
//===----------------------------------------------------------------------===//

ParseResult flex::moert::detail::parseStepOperands(
    OpAsmParser &parser, OperationState &result, ArrayRef<StringLiteral> roles,
    unsigned numInputRoles, SmallVectorImpl<int32_t> &segments) {
  // Operands by role index, as parsed.
  SmallVector<std::optional<std::pair<OpAsmParser::UnresolvedOperand, Type>>>
      byRole(roles.size());
  auto parseGroup = [&](StringRef keyword, unsigned first,
                        unsigned last) -> ParseResult {
    if (parser.parseKeyword(keyword) || parser.parseLParen())
      return failure();
    if (succeeded(parser.parseOptionalRParen()))
      return success();
    auto parseOne = [&]() -> ParseResult {
      SMLoc loc = parser.getCurrentLocation();
      std::string role;
      OpAsmParser::UnresolvedOperand operand;
      Type type;
      if (parser.parseKeywordOrString(&role) || parser.parseEqual() ||
          parser.parseOperand(operand) || parser.parseColonType(type))
        return failure();
      for (unsigned i = first; i < last; ++i) {
        if (roles[i].rtrim("?") != role)
          continue;
        if (byRole[i])
          return parser.emitError(loc, "[plan-3] role '")
                 << role << "' given twice";
        byRole[i] = {operand, type};
        return success();
      }
      std::string allowed;
      for (unsigned i = first; i < last; ++i)
        allowed += (i == first ? "" : ", ") + roles[i].str();
      return parser.emitError(loc, "[plan-3] unknown ")
             << keyword << " role '" << role << "'; expected one of "
             << allowed;
    };
    return failure(parser.parseCommaSeparatedList(parseOne) ||
                   parser.parseRParen());
  };
  SMLoc loc = parser.getCurrentLocation();
  if (parseGroup("ins", 0, numInputRoles) ||
      parseGroup("outs", numInputRoles, roles.size()) ||
      parser.parseOptionalAttrDict(result.attributes))
    return failure();
  for (auto [role, operand] : llvm::zip(roles, byRole)) {
    bool optional = role.ends_with("?");
    segments.push_back(operand ? 1 : 0);
    if (!operand) {
      if (!optional)
        return parser.emitError(loc, "[plan-3] missing role '") << role << "'";
      continue;
    }
    if (parser.resolveOperand(operand->first, operand->second, result.operands))
      return failure();
  }
  return success();
}

void flex::moert::detail::printStepOperands(Operation *op,
                                            ArrayRef<StepOperand> operands,
                                            OpAsmPrinter &printer) {
  auto printGroup = [&](StringRef keyword, bool outputs) {
    printer << ' ' << keyword << '(';
    bool first = true;
    for (const StepOperand &operand : operands) {
      if (operand.isOutput != outputs)
        continue;
      if (!first)
        printer << ", ";
      first = false;
      printer << operand.role << " = " << operand.value << " : "
              << operand.value.getType();
    }
    printer << ')';
  };
  printGroup("ins", false);
  printGroup("outs", true);
  printer.printOptionalAttrDict(op->getAttrs(),
                                /*elidedAttrs=*/{"operandSegmentSizes"});
}

//===----------------------------------------------------------------------===//
// Shape checks
//===----------------------------------------------------------------------===//

namespace {
/// Checks operands against shapes written with named sizes ({"T", "d"}):
/// the first use of a name binds it, later uses must agree. "E+1" is one
/// more than E.
class ShapeMatcher {
public:
  explicit ShapeMatcher(Operation *op) : op(op) {}

  /// `value` (skipped when null) must have `dims` and, when given, `element`.
  LogicalResult expect(StringRef role, Value value, ArrayRef<StringRef> dims,
                       Type element = {}) {
    if (!value)
      return success();
    if (failed(expectElement(role, value, element)))
      return failure();
    auto type = cast<MemRefType>(value.getType());
    if (type.getRank() != int64_t(dims.size()))
      return mismatch(role, type, dims);
    for (auto [size, name] : llvm::zip(type.getShape(), dims)) {
      auto [base, plusOne] = name.split('+');
      int64_t offset = plusOne.empty() ? 0 : 1;
      auto [it, inserted] = sizes.try_emplace(base, size - offset);
      if (!inserted && it->second + offset != size)
        return mismatch(role, type, dims);
    }
    return success();
  }

  /// `value` (skipped when null) has element type `element` (when given).
  LogicalResult expectElement(StringRef role, Value value, Type element) {
    if (!value || !element)
      return success();
    Type actual = cast<MemRefType>(value.getType()).getElementType();
    if (actual == element)
      return success();
    return op->emitOpError("[plan-2] '") << role << "' must have element type "
                                         << element << ", got " << actual;
  }

  /// `value` (skipped when null) has a float element type.
  LogicalResult expectFloat(StringRef role, Value value) {
    if (!value)
      return success();
    Type element = cast<MemRefType>(value.getType()).getElementType();
    if (isa<FloatType>(element))
      return success();
    return op->emitOpError("[plan-2] '")
           << role << "' must have a float element type, got " << element;
  }

  /// Both values have the same element type.
  LogicalResult sameElement(StringRef role, Value value, StringRef otherRole,
                            Value other) {
    if (!value || !other)
      return success();
    Type a = cast<MemRefType>(value.getType()).getElementType();
    Type b = cast<MemRefType>(other.getType()).getElementType();
    if (a == b)
      return success();
    return op->emitOpError("[plan-2] '")
           << role << "' must have the element type of '" << otherRole << "' ("
           << b << "), got " << a;
  }

  int64_t size(StringRef name) const { return sizes.lookup(name); }

private:
  LogicalResult mismatch(StringRef role, MemRefType type,
                         ArrayRef<StringRef> dims) {
    InFlightDiagnostic diag = op->emitOpError("[plan-1] '")
                              << role << "' must be [";
    llvm::interleaveComma(dims, diag, [&](StringRef name) {
      diag << name;
      auto [base, plusOne] = name.split('+');
      if (sizes.count(base))
        diag << " = " << sizes.lookup(base) + (plusOne.empty() ? 0 : 1);
    });
    diag << "], got " << type;
    return diag;
  }

  Operation *op;
  llvm::StringMap<int64_t> sizes;
};

Type i32(Operation *op) { return IntegerType::get(op->getContext(), 32); }
Type f32(Operation *op) { return Float32Type::get(op->getContext()); }

/// [plan-1] / [plan-2] Every operand whose role StepKinds.def gives a
/// shape or element type (flex/Runtime/RoleShapes.h), as the loader checks
/// them. The sizes are symbols unified across the op; on a side that holds
/// the routing over the shards of each expert (`sharded*`), k and E are
/// named ks and Es and the role "in <role>" / "out <role>". Token and Router
/// roles have the element type of the op's first operand of their class.
LogicalResult expectDeclaredRoles(ShapeMatcher &m, Operation *op,
                                  bool shardedIn = false,
                                  bool shardedOut = false) {
  std::pair<std::string, Value> token, router;
  for (const StepOperand &operand :
       cast<StepOpInterface>(op).getStepOperands()) {
    const flex::RoleShape *declared =
        flex::findRoleShape(std::string_view(operand.role));
    if (!declared || declared->dtype == flex::RoleDType::Any)
      continue;
    const bool sharded = operand.isOutput ? shardedOut : shardedIn;
    std::string role = (sharded ? (operand.isOutput ? "out " : "in ") : "") +
                       operand.role.str();
    Type element;
    switch (declared->dtype) {
    case flex::RoleDType::Any:
      break;
    case flex::RoleDType::F32:
      element = f32(op);
      break;
    case flex::RoleDType::I32:
      element = i32(op);
      break;
    case flex::RoleDType::Float:
      if (failed(m.expectFloat(role, operand.value)))
        return failure();
      break;
    case flex::RoleDType::Token:
    case flex::RoleDType::Router: {
      auto &first = declared->dtype == flex::RoleDType::Token ? token : router;
      if (!first.second)
        first = {role, operand.value};
      else if (failed(m.sameElement(role, operand.value, first.first,
                                    first.second)))
        return failure();
      break;
    }
    }
    SmallVector<StringRef, flex::kMaxRoleRank> dims;
    for (size_t i = 0; i < declared->rank; ++i) {
      StringRef dim(declared->dims[i].data(), declared->dims[i].size());
      if (sharded && (dim == "k" || dim == "E"))
        dim = dim == "k" ? "ks" : "Es";
      dims.push_back(dim);
    }
    if (declared->hasFixedDims()
            ? failed(m.expect(role, operand.value, dims, element))
            : failed(m.expectElement(role, operand.value, element)))
      return failure();
  }
  return success();
}

/// Per-expert segments of a grouped step: [G+1] offsets and [G] rows (their
/// i32 element type: expectDeclaredRoles).
LogicalResult expectSegments(ShapeMatcher &m, Value offsets, Value rows) {
  return failure(failed(m.expect("expert_rows", rows, {"G"})) ||
                 failed(m.expect("expert_offsets", offsets, {"G+1"})));
}

/// The A operand of a grouped GEMM: [R, K] rows of the dispatch side, or,
/// with `row_tokens`, the layer's tokens [T, K] it indexes (the
/// gather-fused dispatch of --moert-fuse-dispatch).
LogicalResult expectGemmA(ShapeMatcher &m, Value a, Value rowTokens) {
  return rowTokens ? m.expect("a", a, {"T", "K"})
                   : m.expect("a", a, {"R", "K"});
}

/// A grouped GEMM's `b`: [G, K, N], or [G, N, K] read transposed.
LogicalResult expectGemmB(ShapeMatcher &m, Value b, bool transB) {
  return transB ? m.expect("b", b, {"G", "N", "K"})
                : m.expect("b", b, {"G", "K", "N"});
}

/// [plan-3] A GEMM's bias_scale (absent: 1) is finite and > 0.
LogicalResult expectBiasScale(Operation *op, FloatAttr biasScale) {
  const double scale = biasScale ? biasScale.getValueAsDouble() : 1.0;
  if (std::isfinite(scale) && scale > 0.0)
    return success();
  return op->emitOpError("[plan-3] bias_scale must be finite and > 0, got ")
         << scale;
}

/// With `row_tokens`: it is [R], R the product's rows (bound by `c` or
/// `grad_c` before), and `a`'s T rows are the layer's tokens.
LogicalResult expectRowTokens(ShapeMatcher &m, Operation *op, Value a,
                              Value rowTokens) {
  if (!rowTokens)
    return success();
  if (failed(m.expect("row_tokens", rowTokens, {"R"})))
    return failure();
  auto plan = op->getParentOfType<PlanOp>();
  if (!plan || !plan.getLayerAttr() ||
      m.size("T") == plan.getLayer().getTokens())
    return success();
  return op->emitOpError("[plan-1] with 'row_tokens', 'a' must be the "
                         "layer's tokens [T = ")
         << plan.getLayer().getTokens() << ", K], got " << a.getType();
}

/// The rows of the dispatch buffer of the routing that `offsets` holds at
/// `op` ([plan-1]: what `dispatch` writes and `dispatch_rows` maps), as
/// docs/PlanFormat.md gives them: E * C for the padded layout, min(E * C,
/// T * k) for the ragged one (the aligned one: that with each expert's rows
/// rounded up to kAlignedLayoutRows, alignedLayoutRows), C the layer's
/// capacity bound aligned up as its gate's. E and k are the routing's
/// (`experts` = E * s, `choices` = k * s after shard_routing). The layout is
/// that of the last step of the variant's forward before `op` that writes
/// `offsets`: a gate's `layout`, padded for shard_routing. std::nullopt when no
/// plan or no such step is in view (a step checked on its own).
std::optional<std::pair<int64_t, Layout>>
dispatchRowsOf(Operation *op, Value offsets, int64_t experts, int64_t choices) {
  auto plan = op->getParentOfType<PlanOp>();
  auto variant = op->getParentOfType<VariantOp>();
  if (!plan || !plan.getLayerAttr() || !variant || variant.getForward().empty())
    return std::nullopt;
  std::optional<Layout> layout;
  flex::moe::CapacityAttr capacity = plan.getLayer().getCapacity();
  for (Operation &step : variant.getForward().front()) {
    if (&step == op)
      break;
    if (auto gate = dyn_cast<GateOp>(step)) {
      if (gate.getCapacityAttr())
        capacity = gate.getCapacityAttr();
      if (gate.getExpertOffsets() == offsets && gate.getLayoutAttr())
        layout = gate.getLayout();
    } else if (auto shard = dyn_cast<ShardRoutingOp>(step)) {
      if (shard.getShardOffsets() == offsets)
        layout = Layout::Padded;
    }
  }
  if (!layout || !capacity)
    return std::nullopt;
  LayerAttr layer = plan.getLayer();
  int64_t tokens = layer.getTokens(), bound = tokens;
  if (std::optional<int64_t> fixed = capacity.getCapacityBound(
          tokens, layer.getExperts(), layer.getTopK()))
    bound = capacity.getMode() == flex::moe::CapacityMode::Fixed
                ? *fixed
                : std::min(*fixed, tokens);
  int64_t align = std::max<int64_t>(capacity.getAlignment(), 1);
  int64_t aligned = 0, padded = 0, ragged = 0;
  if (llvm::AddOverflow(bound, align - 1, aligned) ||
      llvm::MulOverflow(experts, aligned / align * align, padded))
    return std::nullopt;
  if (*layout == Layout::Padded)
    return std::pair{padded, *layout};
  if (llvm::MulOverflow(tokens, choices, ragged))
    ragged = padded;
  ragged = std::min(padded, ragged);
  if (*layout == Layout::Aligned)
    return std::pair{flex::alignedLayoutRows(ragged, experts,
                                             aligned / align * align,
                                             flex::kAlignedLayoutRows),
                     *layout};
  return std::pair{ragged, *layout};
}
} // namespace

//===----------------------------------------------------------------------===//
// Plan structure
//===----------------------------------------------------------------------===//

LogicalResult PlanOp::verify() {
  llvm::StringSet<> names;
  for (Operation &op : getBody().front()) {
    StringRef name;
    if (auto argument = dyn_cast<ArgumentOp>(op))
      name = argument.getName();
    else if (auto alloc = dyn_cast<AllocOp>(op))
      name = alloc.getName();
    else if (!isa<VariantOp>(op))
      return op.emitOpError("[plan-3] a plan holds only moert.argument, "
                            "moert.alloc and moert.variant");
    if (!name.empty() && !names.insert(name).second)
      return op.emitOpError("[plan-3] buffer name '")
             << name << "' is defined twice in the plan";
  }
  if (getWorkspaceAlignment() < 1 ||
      !llvm::isPowerOf2_64(getWorkspaceAlignment()))
    return emitOpError("[plan-3] workspace alignment must be a power of two, "
                       "got ")
           << getWorkspaceAlignment();
  return success();
}

//===----------------------------------------------------------------------===//
// Steps
//===----------------------------------------------------------------------===//

// The roles StepKinds.def declares (x, the routing buffers, the gradients of
// the router's...) are checked by expectDeclaredRoles; each verifier adds the
// shapes that depend on the op.

LogicalResult RouterOp::verify() {
  ShapeMatcher m(*this);
  return expectDeclaredRoles(m, *this);
}

LogicalResult GateOp::verify() {
  ShapeMatcher m(*this);
  Operation *op = *this;
  if (failed(expectDeclaredRoles(m, op)) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})) ||
      failed(m.expect("expert_rows", getExpertRows(), {"E"})))
    return failure();
  if (getTopK() != m.size("k"))
    return emitOpError("[plan-1] top_k = ")
           << getTopK() << " must equal k = " << m.size("k")
           << " of the routing buffers";
  return success();
}

LogicalResult DispatchOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})) ||
      failed(m.expect("dispatched", getDispatched(), {"R", "d"})) ||
      failed(m.sameElement("dispatched", getDispatched(), "x", getX())));
}

LogicalResult DispatchRowsOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})) ||
      failed(m.expect("row_tokens", getRowTokens(), {"R"})))
    return failure();
  std::optional<std::pair<int64_t, Layout>> rows =
      dispatchRowsOf(*this, getExpertOffsets(), m.size("E"), m.size("k"));
  if (!rows || rows->first == m.size("R"))
    return success();
  return emitOpError("[plan-1] 'row_tokens' must be [R = ")
         << rows->first << "], the rows of the "
         << stringifyLayout(rows->second) << " dispatch buffer ("
         << (rows->second == Layout::Padded   ? "E * C"
             : rows->second == Layout::Ragged ? "min(E * C, T * k)"
                                              : "min(E * C, T * k), each "
                                                "expert's rows rounded up to "
                                                "128")
         << "), got " << getRowTokens().getType();
}

LogicalResult GroupedGemmOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), getRowTokens())) ||
      failed(expectGemmB(m, getB(), getTransB())) ||
      failed(m.expect("bias", getBias(), {"G", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("c", getC(), {"R", "N"})) ||
      failed(m.expect("pre", getPre(), {"R", "N"})) ||
      failed(expectRowTokens(m, *this, getA(), getRowTokens())) ||
      failed(m.sameElement("b", getB(), "a", getA())) ||
      failed(m.sameElement("c", getC(), "a", getA())))
    return failure();
  if (failed(expectBiasScale(*this, getBiasScaleAttr())))
    return failure();
  return success();
}

LogicalResult ShardRoutingOp::verify() {
  ShapeMatcher m(*this);
  // The out routing is over the shards: [T, ks] over Es virtual experts.
  if (failed(expectDeclaredRoles(m, *this, /*shardedIn=*/false,
                                 /*shardedOut=*/true)) ||
      failed(m.expect("expert_rows", getExpertRows(), {"E"})) ||
      failed(m.expect("out expert_rows", getShardRows(), {"Es"})) ||
      failed(m.expect("out expert_offsets", getShardOffsets(), {"Es+1"})))
    return failure();
  int64_t shards = getShards();
  if (shards < 1)
    return emitOpError("[plan-3] shards must be >= 1, got ") << shards;
  int64_t ks = 0, es = 0;
  if (llvm::MulOverflow(m.size("k"), shards, ks) ||
      llvm::MulOverflow(m.size("E"), shards, es) || m.size("ks") != ks ||
      m.size("Es") != es)
    return emitOpError("[plan-1] the out routing must be [T, k * s] over "
                       "E * s experts: k = ")
           << m.size("k") << ", E = " << m.size("E") << ", s = " << shards
           << ", got k * s = " << m.size("ks")
           << " and E * s = " << m.size("Es");
  return success();
}

LogicalResult ShardRoutingBackwardOp::verify() {
  ShapeMatcher m(*this);
  // 'in grad_gates' is [T, ks], over the shards of each expert.
  if (failed(expectDeclaredRoles(m, *this, /*shardedIn=*/true)))
    return failure();
  int64_t shards = getShards();
  if (shards < 1)
    return emitOpError("[plan-3] shards must be >= 1, got ") << shards;
  int64_t ks = 0;
  if (llvm::MulOverflow(m.size("k"), shards, ks) || m.size("ks") != ks)
    return emitOpError("[plan-1] 'in grad_gates' must be [T, k * s]: k = ")
           << m.size("k") << ", s = " << shards
           << ", got k * s = " << m.size("ks");
  return success();
}

LogicalResult GluOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("gate_in", getGateIn(), {"R", "N"})) ||
      failed(m.expect("up_in", getUpIn(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("c", getC(), {"R", "N"})));
}

LogicalResult GroupedGemmGluOp::verify() {
  ShapeMatcher m(*this);
  // b and b_up bind the same G, K, N: one shape. Every float operand has
  // a's element type (the products are rounded to c's, which gate_in and
  // up_in hold).
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), getRowTokens())) ||
      failed(m.expect("b", getB(), {"G", "K", "N"})) ||
      failed(m.expect("b_up", getBUp(), {"G", "K", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("c", getC(), {"R", "N"})) ||
      failed(m.expect("gate_in", getGateIn(), {"R", "N"})) ||
      failed(m.expect("up_in", getUpIn(), {"R", "N"})) ||
      failed(expectRowTokens(m, *this, getA(), getRowTokens())) ||
      failed(m.sameElement("b", getB(), "a", getA())) ||
      failed(m.sameElement("b_up", getBUp(), "a", getA())) ||
      failed(m.sameElement("c", getC(), "a", getA())) ||
      failed(m.sameElement("gate_in", getGateIn(), "a", getA())) ||
      failed(m.sameElement("up_in", getUpIn(), "a", getA())))
    return failure();
  if (bool(getGateIn()) != bool(getUpIn()))
    return emitOpError("[plan-3] 'gate_in' and 'up_in' are given both or "
                       "neither, got only '")
           << (getGateIn() ? "gate_in" : "up_in") << "'";
  return success();
}

LogicalResult CombineOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("expert_out", getExpertOut(), {"R", "d"})) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})) ||
      failed(m.sameElement("out", getOut(), "expert_out", getExpertOut())));
}

LogicalResult GroupedGemmCombineOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), Value())) ||
      failed(expectGemmB(m, getB(), getTransB())) ||
      failed(m.expect("bias", getBias(), {"G", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("c", getC(), {"R", "N"})) ||
      failed(m.expect("out", getOut(), {"T", "N"})) ||
      failed(m.expect("row_tokens", getRowTokens(), {"R"})) ||
      failed(m.sameElement("b", getB(), "a", getA())) ||
      failed(m.sameElement("c", getC(), "a", getA())) ||
      failed(m.sameElement("out", getOut(), "a", getA())))
    return failure();
  if (failed(expectBiasScale(*this, getBiasScaleAttr())))
    return failure();
  // Its tiles store c, and sum finished tokens into out, while others
  // still read a, b and the bias.
  for (auto [outName, output] :
       {std::pair<StringRef, Value>{"c", getC()}, {"out", getOut()}})
    for (auto [name, operand] : {std::pair<StringRef, Value>{"a", getA()},
                                 {"b", getB()},
                                 {"bias", getBias()}})
      if (operand == output)
        return emitOpError("[plan-3] '")
               << outName << "' must not be its '" << name
               << "': the step writes its outputs apart from what it reads";
  return success();
}

LogicalResult CombineBackwardOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("expert_out", getExpertOut(), {"R", "d"})) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})) ||
      failed(m.expect("grad_expert_out", getGradExpertOut(), {"R", "d"})));
}

LogicalResult GroupedGemmWgradOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), getRowTokens())) ||
      failed(m.expect("grad_c", getGradC(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("grad_b", getGradB(), {"G", "K", "N"})) ||
      failed(m.expect("grad_bias", getGradBias(), {"G", "N"})) ||
      failed(expectRowTokens(m, *this, getA(), getRowTokens())));
}

LogicalResult GroupedGemmActivationBackwardOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), Value())) ||
      failed(expectGemmB(m, getB(), getTransB())) ||
      failed(m.expect("pre", getPre(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("c", getC(), {"R", "N"})) ||
      failed(m.sameElement("b", getB(), "a", getA())) ||
      failed(m.sameElement("pre", getPre(), "a", getA())) ||
      failed(m.sameElement("c", getC(), "a", getA())))
    return failure();
  // Its tiles store c while others still read a, b and pre.
  for (auto [name, operand] : {std::pair<StringRef, Value>{"a", getA()},
                               {"b", getB()},
                               {"pre", getPre()}})
    if (operand == getC())
      return emitOpError("[plan-3] 'c' must not be its '")
             << name << "': the step writes c apart from what it reads";
  return success();
}

LogicalResult GroupedGemmGluBackwardOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectGemmA(m, getA(), Value())) ||
      failed(expectGemmB(m, getB(), getTransB())) ||
      failed(m.expect("gate_in", getGateIn(), {"R", "N"})) ||
      failed(m.expect("up_in", getUpIn(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("grad_gate_in", getGradGateIn(), {"R", "N"})) ||
      failed(m.expect("grad_up_in", getGradUpIn(), {"R", "N"})) ||
      failed(m.sameElement("b", getB(), "a", getA())) ||
      failed(m.sameElement("gate_in", getGateIn(), "a", getA())) ||
      failed(m.sameElement("up_in", getUpIn(), "a", getA())) ||
      failed(m.sameElement("grad_gate_in", getGradGateIn(), "a", getA())) ||
      failed(m.sameElement("grad_up_in", getGradUpIn(), "a", getA())))
    return failure();
  // Its tiles store the gradients while others still read the inputs.
  for (auto [outName, output] :
       {std::pair<StringRef, Value>{"grad_gate_in", getGradGateIn()},
        {"grad_up_in", getGradUpIn()}})
    for (auto [name, operand] : {std::pair<StringRef, Value>{"a", getA()},
                                 {"b", getB()},
                                 {"gate_in", getGateIn()},
                                 {"up_in", getUpIn()}})
      if (operand == output)
        return emitOpError("[plan-3] '")
               << outName << "' must not be its '" << name
               << "': the step writes its outputs apart from what it reads";
  if (getGradGateIn() == getGradUpIn())
    return emitOpError("[plan-3] 'grad_gate_in' and 'grad_up_in' must be "
                       "two buffers");
  return success();
}

LogicalResult ActivationBackwardOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("pre", getPre(), {"R", "N"})) ||
      failed(m.expect("grad", getGrad(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("grad_pre", getGradPre(), {"R", "N"})));
}

LogicalResult GluBackwardOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("gate_in", getGateIn(), {"R", "N"})) ||
      failed(m.expect("up_in", getUpIn(), {"R", "N"})) ||
      failed(m.expect("grad", getGrad(), {"R", "N"})) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())) ||
      failed(m.expect("grad_gate_in", getGradGateIn(), {"R", "N"})) ||
      failed(m.expect("grad_up_in", getGradUpIn(), {"R", "N"})));
}

LogicalResult DispatchBackwardOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("grad_dispatched", getGradDispatched(), {"R", "d"})) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})));
}

LogicalResult GateBackwardOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)))
    return failure();
  if (getTopK() != m.size("k"))
    return emitOpError("[plan-1] top_k = ")
           << getTopK() << " must equal k = " << m.size("k")
           << " of the routing buffers";
  return success();
}

LogicalResult RouterBackwardOp::verify() {
  ShapeMatcher m(*this);
  return expectDeclaredRoles(m, *this);
}

LogicalResult SyncCapacityOp::verify() {
  ShapeMatcher m(*this);
  return failure(
      failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("expert_offsets", getExpertOffsets(), {"E+1"})));
}

/// group_size / group_stride of a collective (PlanFormat.md, "Groups of
/// ranks"): 0 and 1 (all ranks), or a group of >= 1 ranks >= 1 apart.
static LogicalResult verifyGroup(Operation *op, int64_t size, int64_t stride) {
  if (size < 0 || stride < 1 || (size == 0 && stride != 1))
    return op->emitOpError("[plan-3] group_size must be 0 (all ranks) or >= 1 "
                           "with group_stride >= 1, got group_size = ")
           << size << ", group_stride = " << stride;
  return success();
}

LogicalResult AllToAllOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(m.expect("input", getInput(), {"R", "d"})) ||
      failed(m.expect("output", getOutput(), {"R", "d"})) ||
      failed(m.sameElement("output", getOutput(), "input", getInput())))
    return failure();
  if (getChunks() < 1 || getChunk() < 0 || getChunk() >= getChunks())
    return emitOpError("[plan-3] chunk ")
           << getChunk() << " must be in [0, chunks = " << getChunks() << ")";
  return verifyGroup(*this, getGroupSize(), getGroupStride());
}

LogicalResult UniformSegmentsOp::verify() {
  ShapeMatcher m(*this);
  if (failed(expectDeclaredRoles(m, *this)) ||
      failed(expectSegments(m, getExpertOffsets(), getExpertRows())))
    return failure();
  if (getGroups() != m.size("G"))
    return emitOpError("[plan-1] groups = ")
           << getGroups() << " must equal G = " << m.size("G")
           << " of the segment buffers";
  if (getRanks() < 1 || getChunks() < 1 || getChunk() < 0 ||
      getChunk() >= getChunks())
    return emitOpError("[plan-3] ranks >= 1 and 0 <= chunk < chunks, got "
                       "ranks = ")
           << getRanks() << ", chunk = " << getChunk()
           << ", chunks = " << getChunks();
  return success();
}

/// `gathered` is [W*L, ...] of `local` [L, ...] for some W.
static LogicalResult verifyGathered(Operation *op, Value local,
                                    Value gathered) {
  auto localType = cast<MemRefType>(local.getType());
  auto fullType = cast<MemRefType>(gathered.getType());
  // Rank 0 or an empty first dimension has no [L, ...] blocks to gather.
  if (localType.getRank() < 1 || fullType.getRank() < 1 ||
      localType.getDimSize(0) < 1 || fullType.getDimSize(0) < 1 ||
      localType.getElementType() != fullType.getElementType() ||
      localType.getRank() != fullType.getRank() ||
      localType.getShape().drop_front() != fullType.getShape().drop_front() ||
      fullType.getDimSize(0) % localType.getDimSize(0) != 0)
    return op->emitOpError("[plan-1] the full buffer must be [W * L, ...] of "
                           "the local one ")
           << localType << ", got " << fullType;
  return success();
}

LogicalResult AllGatherOp::verify() {
  return failure(
      failed(verifyGroup(*this, getGroupSize(), getGroupStride())) ||
      failed(verifyGathered(*this, getInput(), getOutput())));
}

LogicalResult ReduceScatterOp::verify() {
  return failure(
      failed(verifyGroup(*this, getGroupSize(), getGroupStride())) ||
      failed(verifyGathered(*this, getOutput(), getInput())));
}

#define GET_OP_CLASSES
#include "flex/Dialect/MoeRT/IR/MoeRTOps.cpp.inc"
