//===- MoeRTSchemaTest.cpp - The moert steps against StepKinds.def --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file keeps the moert dialect's step ops and the runtime's step schema
// (StepKinds.def, the source of truth) from drifting: one moert op per step
// kind, with the schema's operand roles and an attribute for every attribute
// the schema declares. A kind added on one side only fails here, naming it.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"
#include "flex/Runtime/StepSchema.h"

#include "mlir/IR/MLIRContext.h"

#include "llvm/ADT/STLExtras.h"
#include "llvm/ADT/StringMap.h"

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <utility>

using namespace mlir;
using namespace flex;

namespace {

/// Every moert step op; the count check below (registered step ops ==
/// kNumStepOps == this list's size) makes the list complete.
template <typename... Ops> struct OpList {};
using StepOps = OpList<
    moert::RouterOp, moert::GateOp, moert::DispatchOp, moert::DispatchRowsOp,
    moert::GroupedGemmOp, moert::GroupedGemmGluOp, moert::GluOp,
    moert::CombineOp, moert::GroupedGemmCombineOp, moert::CombineBackwardOp,
    moert::GroupedGemmWgradOp, moert::GroupedGemmActivationBackwardOp,
    moert::GroupedGemmGluBackwardOp, moert::ActivationBackwardOp,
    moert::GluBackwardOp, moert::DispatchBackwardOp, moert::GateBackwardOp,
    moert::RouterBackwardOp, moert::SyncCapacityOp, moert::AllToAllOp,
    moert::UniformSegmentsOp, moert::ShardRoutingOp,
    moert::ShardRoutingBackwardOp, moert::AllGatherOp, moert::ReduceScatterOp>;

template <typename... Ops> constexpr size_t size(OpList<Ops...>) {
  return sizeof...(Ops);
}

/// (role, required) pairs of one side of a step.
using RoleSet = std::set<std::pair<std::string, bool>>;

/// Roles the runtime accepts as optional and the moert op does not have,
/// on purpose: the routing kernels ignore the extra routing buffers, which
/// a hand-written plan may pass (docs/PlanFormat.md, "routing"); the
/// compiler never emits them. Keyed by "op.in" / "op.out". Each entry must
/// still be optional in the schema and absent from the op (checked below).
const std::map<std::string, std::set<std::string>> kSchemaOnlyRoles = {
    {"dispatch.in", {"gates", "expert_rows"}},
    {"dispatch_rows.in", {"gates", "expert_rows"}},
    {"combine.in", {"expert_rows"}},
    {"combine_backward.in", {"expert_rows"}},
    {"dispatch_backward.in", {"gates", "expert_rows"}},
    {"gate_backward.in",
     {"locations", "gates", "capacity", "expert_offsets", "expert_rows"}},
    // The gate's padded offsets are rebuilt; a plan may still pass them.
    {"shard_routing.in", {"expert_offsets"}},
};

/// Schema attributes a moert op carries under another name (op.attr ->
/// the op's attribute). The gate's `#moe.capacity<mode factor, align = n>`
/// holds three of them (PlanEmitter's readStepAttrs splits it). The other
/// attributes have the schema's name; where the moert attribute is optional
/// or a unit attribute the emitter writes the schema's default (e.g.
/// grouped_gemm: `epilogue` absent is none, `bias_scale` absent is 1.0).
const std::map<std::string, std::string> kRenamedAttrs = {
    {"gate.capacity_mode", "capacity"},
    {"gate.capacity_factor", "capacity"},
    {"gate.capacity_alignment", "capacity"},
};

RoleSet toRoleSet(const std::vector<OperandSpec> &specs) {
  RoleSet set;
  for (const OperandSpec &spec : specs)
    set.insert({std::string(toString(spec.role)), spec.required});
  return set;
}

/// Compares one side ("in" or "out") of op `name`: ODS roles against the
/// schema's, allowing only the documented schema-only optional roles.
void compareRoles(llvm::StringRef name, llvm::StringRef side,
                  const RoleSet &ods, const RoleSet &schema) {
  std::string key = (name + "." + side).str();
  auto allowedIt = kSchemaOnlyRoles.find(key);
  std::set<std::string> allowed;
  if (allowedIt != kSchemaOnlyRoles.end())
    allowed = allowedIt->second;

  for (const auto &[role, required] : ods) {
    EXPECT_TRUE(parseOperandRole(role).has_value())
        << "moert." << name.str() << " " << side.str() << " role '" << role
        << "' is not an operand role of StepKinds.def";
    EXPECT_TRUE(schema.count({role, required}))
        << "moert." << name.str() << " " << side.str() << " role '" << role
        << "' (" << (required ? "required" : "optional")
        << ") is not in the schema with that requiredness";
  }
  for (const auto &[role, required] : schema) {
    if (ods.count({role, required}))
      continue;
    bool inOds = ods.count({role, !required}) != 0;
    if (!required && !inOds && allowed.count(role))
      continue;
    // A differing requiredness was reported by the loop above.
    EXPECT_TRUE(inOds) << "schema " << name.str() << " " << side.str()
                       << " role '" << role << "' ("
                       << (required ? "required" : "optional")
                       << ") has no operand in moert." << name.str();
  }
  // A stale allowance hides nothing: it must name a role that is optional in
  // the schema and that the op lacks.
  for (const std::string &role : allowed)
    EXPECT_TRUE(schema.count({role, false}) && !ods.count({role, false}) &&
                !ods.count({role, true}))
        << "kSchemaOnlyRoles entry " << key << " '" << role
        << "' is no longer an optional schema-only role";
}

/// Checks one op class: its kind, its roles and its attributes.
template <typename OpTy> void checkOp(std::set<StepOp> &seen) {
  llvm::StringRef name =
      OpTy::getOperationName().drop_front(llvm::StringRef("moert.").size());
  SCOPED_TRACE(("moert." + name).str());
  std::optional<StepOp> kind = parseStepOp(std::string_view(name));
  ASSERT_TRUE(kind.has_value())
      << "moert." << name.str() << " is not a step kind of StepKinds.def";
  EXPECT_TRUE(seen.insert(*kind).second)
      << "two moert ops for step kind " << name.str();
  const StepKindInfo &info = getStepKind(*kind);

  // Roles: kRoles, inputs first; a trailing `?` marks an optional operand.
  RoleSet odsIns, odsOuts;
  for (auto [index, literal] : llvm::enumerate(OpTy::kRoles)) {
    llvm::StringRef role = literal;
    bool required = !role.consume_back("?");
    (index < OpTy::kNumInputRoles ? odsIns : odsOuts)
        .insert({role.str(), required});
  }
  compareRoles(name, "in", odsIns, toRoleSet(info.inputs));
  compareRoles(name, "out", odsOuts, toRoleSet(info.outputs));

  // Attributes, both ways: a schema attribute the op cannot carry would be
  // written as its default forever; an op attribute the schema lacks would
  // be dropped by the emitter.
  std::set<std::string> odsAttrs;
  for (llvm::StringRef attr : OpTy::getAttributeNames())
    if (attr != "operandSegmentSizes")
      odsAttrs.insert(attr.str());
  std::set<std::string> carried;
  for (StepAttr attr : info.attrs) {
    std::string schemaName(toString(attr));
    auto renamed = kRenamedAttrs.find((name + "." + schemaName).str());
    std::string odsName =
        renamed != kRenamedAttrs.end() ? renamed->second : schemaName;
    EXPECT_TRUE(odsAttrs.count(odsName))
        << "schema attribute '" << schemaName << "' of " << name.str()
        << " has no attribute '" << odsName << "' in moert." << name.str()
        << " (add it, or a documented mapping to kRenamedAttrs)";
    carried.insert(odsName);
  }
  for (const std::string &attr : odsAttrs)
    EXPECT_TRUE(carried.count(attr))
        << "moert." << name.str() << " attribute '" << attr
        << "' carries no schema attribute of " << name.str();
}

template <typename... Ops>
void checkOps(OpList<Ops...>, std::set<StepOp> &seen) {
  (checkOp<Ops>(seen), ...);
}

TEST(MoeRTSchemaTest, EveryStepOpIsAStepKind) {
  MLIRContext context;
  context.loadDialect<moert::MoeRTDialect>();
  int numStepOps = 0;
  for (RegisteredOperationName name : context.getRegisteredOperations()) {
    if (name.getDialectNamespace() !=
            moert::MoeRTDialect::getDialectNamespace() ||
        !name.hasInterface<moert::StepOpInterface>())
      continue;
    ++numStepOps;
    llvm::StringRef mnemonic = name.stripDialect();
    EXPECT_TRUE(parseStepOp(std::string_view(mnemonic)).has_value())
        << name.getStringRef().str()
        << " implements StepOpInterface but is no step kind of "
           "StepKinds.def";
  }
  EXPECT_EQ(numStepOps, kNumStepOps)
      << "moert step ops and StepKinds.def's kinds differ in number";
  EXPECT_EQ(size(StepOps{}), static_cast<size_t>(kNumStepOps))
      << "StepOps in this test misses an op";
}

TEST(MoeRTSchemaTest, RolesAndAttributesMatchTheSchema) {
  std::set<StepOp> seen;
  checkOps(StepOps{}, seen);
  EXPECT_EQ(seen.size(), static_cast<size_t>(kNumStepOps));
}

} // namespace
